package relay

import (
	"errors"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestIdleTimeout: on every datapath, a tunnel with no traffic is closed after the idle timeout with a
// FIN to both sides (a clean end), while a tunnel with traffic more often than that lives on.
func TestIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			quiet, quietUp := openTunnel(t, r.Addr, up, nil, nil)
			busy, busyUp := openTunnel(t, r.Addr, up, nil, nil)
			stop := make(chan struct{})
			defer close(stop)
			go r.enforceTunnelTimeouts(idle, 0, 20*time.Millisecond, stop)

			// The busy tunnel sends a byte each way every 100 ms for 4 idle periods.
			buf := make([]byte, 1)
			for i := range 12 {
				if _, err := busy.Write([]byte{byte(i)}); err != nil {
					t.Fatalf("busy tunnel, write %d: %v", i, err)
				}
				if _, err := io.ReadFull(busyUp.R, buf); err != nil {
					t.Fatalf("busy tunnel, upstream read %d: %v", i, err)
				}
				if _, err := busyUp.Write(buf); err != nil {
					t.Fatalf("busy tunnel, upstream write %d: %v", i, err)
				}
				if _, err := io.ReadFull(busy.R, buf); err != nil {
					t.Fatalf("busy tunnel, client read %d: %v", i, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
			// By now the quiet one has been closed cleanly: EOF, not a reset, on both sides.
			for name, rd := range map[string]struct {
				c interface{ SetReadDeadline(time.Time) error }
				r io.Reader
			}{"client": {quiet, quiet.R}, "upstream": {quietUp, quietUp.R}} {
				rd.c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if n, err := rd.r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
					t.Errorf("quiet tunnel's %s read: %d, %v; want EOF (a clean close)", name, n, err)
				}
			}
			if len(r.Tunnels().Tunnels()) != 1 {
				t.Errorf("%d tunnels live, want only the busy one", len(r.Tunnels().Tunnels()))
			}
			if m := scrape(t, r); !strings.Contains(m, `sockrelay_tunnels_closed_total{listener="default",pool="default",reason="idle_timeout"} 1`) {
				t.Errorf("idle close not counted:\n%s", grepLines(m, "closed_total"))
			}
			if !strings.Contains(r.Log.String(), `msg="tunnel idle, closing it"`) {
				t.Error("idle close not logged")
			}
		})
	}
}

// TestTunnelLifetime: a tunnel is reset when it reaches the lifetime, however busy it is.
func TestTunnelLifetime(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, _ := openTunnel(t, r.Addr, up, nil, nil)
			stop := make(chan struct{})
			defer close(stop)
			go r.enforceTunnelTimeouts(0, 200*time.Millisecond, 20*time.Millisecond, stop)
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err := c.R.Read(make([]byte, 1))
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("client read after the lifetime: %v; want a reset", err)
			}
			waitTunnelsGone(t, r)
			if m := scrape(t, r); !strings.Contains(m, `sockrelay_tunnels_closed_total{listener="default",pool="default",reason="lifetime"} 1`) {
				t.Errorf("lifetime close not counted:\n%s", grepLines(m, "closed_total"))
			}
		})
	}
}

func TestTimeoutTickAndLimits(t *testing.T) {
	for _, tc := range []struct{ idle, life, want time.Duration }{
		{time.Hour, 0, 10 * time.Second},
		{30 * time.Second, 0, 3 * time.Second},
		{2 * time.Second, 0, 200 * time.Millisecond},
		{0, 1500 * time.Millisecond, 150 * time.Millisecond},
		{time.Second, 5 * time.Second, 100 * time.Millisecond},
		{10 * time.Second, 2 * time.Second, 200 * time.Millisecond},
	} {
		if got := timeoutTick(tc.idle, tc.life); got != tc.want {
			t.Errorf("timeoutTick(%v, %v) = %v, want %v", tc.idle, tc.life, got, tc.want)
		}
	}
	_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathCopy, TunnelIdleTimeout: 500 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "tunnel idle timeout 500ms: 0 (off) or at least 1s") {
		t.Errorf("NewServer with a 500 ms idle timeout: %v", err)
	}
}
