package relay

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
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
	// The half-close timeouts count too; negative (off) ones do not.
	if got := timeoutTick(time.Hour, 0, 5*time.Second, -1); got != 500*time.Millisecond {
		t.Errorf("timeoutTick(1h, 0, 5s, -1) = %v, want 500ms", got)
	}
	for _, tc := range []struct {
		edit func(*Config)
		want string
	}{
		{func(c *Config) { c.TunnelIdleTimeout = 500 * time.Millisecond }, "TunnelIdleTimeout: 500ms is out of range; accepted 0s (off) or 1s or more"},
		{func(c *Config) { c.HalfClosedTimeout = 500 * time.Millisecond }, "HalfClosedTimeout: 500ms is out of range; accepted 0s (off) or 1s or more (here a negative value is off, 0 the default)"},
		{func(c *Config) { c.TCPHalfClosedTimeout = 10 * time.Millisecond }, "TCPHalfClosedTimeout: 10ms is out of range; accepted 0s (off) or 1s or more (here a negative value is off, 0 the default)"},
	} {
		cfg := Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathCopy}
		tc.edit(&cfg)
		if _, err := NewServer(cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewServer: %v; want %q", err, tc.want)
		}
	}
}

// TestHalfClosedTimeout: on every datapath and for both kinds of listener, once the upstream has sent its
// last bytes and its FIN and the client stays silent without closing, the tunnel ends after the listener
// kind's half-close timeout (half_closed), having delivered those bytes and the FIN, and gives back its
// lease and its place under max_tunnels: a new client gets in. Before, such a tunnel lived for ever.
func TestHalfClosedTimeout(t *testing.T) {
	const timeout = time.Second
	lastWords := stream(7, 100_000)
	for _, kind := range []string{"websocket", "tcp"} {
		for _, dp := range testDatapaths {
			t.Run(kind+"/"+string(dp), func(t *testing.T) {
				// The upstream sends its last words and its FIN, then waits for the relay to close.
				var upAddr string
				if kind == "tcp" {
					upAddr = serveEach(t, nil, func(c net.Conn) {
						c.Write(lastWords)
						c.(*net.TCPConn).CloseWrite()
						io.Copy(io.Discard, c)
					})
				} else {
					up := startUpstream(t)
					upAddr = up.Addr
					go func() {
						for u := range up.Conns {
							u.accept(t, nil)
							u.Write(lastWords)
							u.CloseWrite()
							go io.Copy(io.Discard, u)
						}
					}()
				}
				pool := newPool(t, "p", []string{upAddr}, nil)
				r := startRelay(t, dp, nil, func(c *Config) {
					c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
					c.Limits = Limits{MaxTunnels: 1}
					if kind == "tcp" {
						c.TCPHalfClosedTimeout = timeout
					} else {
						c.HalfClosedTimeout = timeout
					}
				})
				dial := func() (net.Conn, io.Reader) {
					if kind == "tcp" {
						c, err := net.Dial("tcp", serveTCP(t, r, ListenerOptions{Name: "tcp"}, nil))
						if err != nil {
							t.Fatal(err)
						}
						t.Cleanup(func() { c.Close() })
						return c, c
					}
					c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
					if c.Resp.StatusCode != http.StatusSwitchingProtocols {
						t.Fatalf("status %d, want 101", c.Resp.StatusCode)
					}
					return c, c.R
				}
				c, rd := dial()
				got, err := readAllWithin(c, rd, 10*time.Second)
				eof := time.Now()
				if err != nil || !bytes.Equal(got, lastWords) {
					t.Fatalf("client read %d of %d bytes, then %v; want them all, then EOF", len(got), len(lastWords), err)
				}
				tuns := r.Tunnels().Tunnels()
				if len(tuns) != 1 {
					t.Fatalf("%d tunnels live after the upstream's FIN, want 1", len(tuns))
				}
				tun := tuns[0]
				// The client neither sends nor closes: the tunnel is half-closed and silent.
				select {
				case <-tun.Done():
				case <-time.After(timeout + 3*time.Second):
					t.Fatalf("the half-closed tunnel still lives %v after the upstream's FIN", timeout+3*time.Second)
				}
				if since := time.Since(eof); since < timeout/2 {
					t.Errorf("the tunnel ended %v after the FIN, before the %v half-close timeout", since, timeout)
				}
				if tun.Reason() != ReasonHalfClosed {
					t.Errorf("reason %q, want %q", tun.Reason(), ReasonHalfClosed)
				}
				waitTunnelsGone(t, r)
				if st := serverState(t, pool, upAddr); st.LiveTunnels != 0 {
					t.Errorf("the server still counts %d live tunnels: the lease was kept", st.LiveTunnels)
				}
				if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": ReasonHalfClosed}); n != 1 {
					t.Errorf("sockrelay_tunnels_closed_total{reason=%q} = %v, want 1", ReasonHalfClosed, n)
				}
				if !strings.Contains(r.Log.String(), `msg="tunnel half-closed and quiet, closing it"`) {
					t.Error("half-close end not logged")
				}
				// max_tunnels is 1: the next client gets in only if the dead tunnel gave its place back.
				c2, rd2 := dial()
				if got, err := readAllWithin(c2, rd2, 10*time.Second); err != nil || !bytes.Equal(got, lastWords) {
					t.Errorf("next client read %d bytes, %v; want a tunnel and the upstream's %d bytes", len(got), err, len(lastWords))
				}
			})
		}
	}
}

// TestHalfClosedButBusyLivesOn: the half-close timeout counts from the last byte, not from the FIN (as
// HAProxy's client-fin and server-fin are inactivity timeouts): a client that half-closes after its
// request while the upstream streams its answer for longer than the timeout gets the whole answer and a
// clean end.
func TestHalfClosedButBusyLivesOn(t *testing.T) {
	const timeout, every, chunks = time.Second, 250 * time.Millisecond, 10
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr}, func(c *Config) { c.HalfClosedTimeout = timeout })
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			tun := r.Tunnels().Tunnels()[0]
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if got, err := readAllWithin(u.TCPConn, u.R, 5*time.Second); err != nil || len(got) != 0 {
				t.Fatalf("upstream read %d bytes, %v; want the client's FIN", len(got), err)
			}
			want := stream(9, chunks*1000)
			go func() {
				for i := range chunks { // 2.5 s of answer, a chunk every 250 ms
					if _, err := u.Write(want[i*1000 : (i+1)*1000]); err != nil {
						return
					}
					time.Sleep(every)
				}
				u.CloseWrite()
			}()
			got, err := readAllWithin(c.TCPConn, c.R, 10*time.Second)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("client read %d of %d bytes, then %v", len(got), len(want), err)
			}
			<-tun.Done()
			if tun.Reason() != ReasonClosed {
				t.Errorf("reason %q, want %q: a half-closed tunnel that moves bytes must not time out", tun.Reason(), ReasonClosed)
			}
		})
	}
}
