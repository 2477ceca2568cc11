package relay

import (
	"bufio"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestHandshakeRateBucket(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLimiter(Limits{HandshakesPerIP: 2, HandshakeBurstPerIP: 3})
	l.now = func() time.Time { return now }
	take := func() (time.Duration, bool) {
		end, err := l.beginHandshake("192.0.2.1")
		if err != nil {
			if err.status != http.StatusTooManyRequests || err.reason != FailLimitRate {
				t.Fatalf("refusal %+v; want 429 %s", err, FailLimitRate)
			}
			return err.retryAfter, false
		}
		end()
		return 0, true
	}
	for i := range 3 {
		if _, ok := take(); !ok {
			t.Fatalf("handshake %d of a burst of 3 refused", i+1)
		}
	}
	if wait, ok := take(); ok || wait != 500*time.Millisecond {
		t.Fatalf("4th handshake: ok %v, retry after %v; want refused, 500ms (rate 2/s)", ok, wait)
	}
	now = now.Add(250 * time.Millisecond)
	if wait, ok := take(); ok || wait != 250*time.Millisecond {
		t.Fatalf("after 250ms: ok %v, retry after %v; want refused, 250ms", ok, wait)
	}
	now = now.Add(250 * time.Millisecond)
	if _, ok := take(); !ok {
		t.Fatal("after 500ms: refused; a token should be back")
	}
	// Another address has its own bucket.
	if end, err := l.beginHandshake("192.0.2.2"); err != nil {
		t.Fatalf("another address refused: %+v", err)
	} else {
		end()
	}
	// Buckets that refilled are forgotten by a sweep.
	now = now.Add(time.Hour)
	l.mu.Lock()
	l.sweepLocked(now, 3)
	n := len(l.buckets)
	l.mu.Unlock()
	if n != 0 {
		t.Errorf("%d buckets kept after they refilled, want 0", n)
	}
	if b := newLimiter(Limits{HandshakesPerIP: 2.5}); b.lim.HandshakeBurstPerIP != 3 {
		t.Errorf("default burst for 2.5/s = %d, want 3", b.lim.HandshakeBurstPerIP)
	}
}

func TestConcurrencyLimits(t *testing.T) {
	relayWide := newLimiter(Limits{MaxTunnels: 3})
	listener := newLimiter(Limits{MaxTunnelsPerIP: 2, MaxConcurrentHandshakes: 10})
	both := []*limiter{relayWide, listener}
	var releases []func()
	for i, ip := range []string{"a", "a", "b"} {
		end, release, err := admit(both, ip)
		if err != nil {
			t.Fatalf("tunnel %d from %s refused: %+v", i, ip, err)
		}
		end()
		releases = append(releases, release)
	}
	if _, _, err := admit(both, "a"); err == nil || err.reason != FailLimitTunnels {
		t.Fatalf("4th tunnel: %+v; want the relay-wide max_tunnels", err)
	}
	releases[2]() // b leaves: one slot relay-wide
	if _, _, err := admit(both, "a"); err == nil || err.reason != FailLimitTunnelsPerIP || err.status != http.StatusServiceUnavailable {
		t.Fatalf("3rd tunnel from a: %+v; want 503 max_tunnels_per_ip", err)
	}
	// The refusal by the listener gave back the relay-wide slot it had taken.
	if relayWide.tunnels != 2 || listener.handshakes != 0 || relayWide.handshakes != 0 {
		t.Errorf("after a refusal: relay-wide tunnels %d, handshakes %d/%d; want 2, 0/0",
			relayWide.tunnels, relayWide.handshakes, listener.handshakes)
	}
	releases[0]()
	releases[0]() // twice: counted once
	end, release, err := admit(both, "a")
	if err != nil {
		t.Fatalf("after a's tunnel ended: %+v", err)
	}
	end()
	release()
	if len(listener.perIP) != 1 || listener.perIP["a"] != 1 {
		t.Errorf("per-IP counts %v; want a:1", listener.perIP)
	}

	busy := newLimiter(Limits{MaxConcurrentHandshakes: 1})
	end, _, err = admit([]*limiter{busy}, "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := admit([]*limiter{busy}, "y"); err == nil || err.reason != FailLimitHandshakes {
		t.Errorf("second concurrent handshake: %+v; want %s", err, FailLimitHandshakes)
	}
	end()
	if _, _, err := admit([]*limiter{busy}, "y"); err != nil {
		t.Errorf("after the first handshake ended: %+v", err)
	}
}

// dialFrom sends a handshake to the relay from the loopback address local, and returns the response.
func dialFrom(t *testing.T, local, relayAddr string) (*http.Response, net.Conn) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", relayAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte(upgradeRequest("/")))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("handshake from %s: %v", local, err)
	}
	return resp, c
}

// TestLimitsFloodFromOneAddress: a flood of handshakes from one address is limited (429 with
// Retry-After, then 503 past its tunnels) while another address is served.
func TestLimitsFloodFromOneAddress(t *testing.T) {
	up := startUpstream(t)
	acceptAll(t, up)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) {
		// One token per 5 s: however slow this machine, the flood gets no new token.
		c.Limits = Limits{HandshakesPerIP: 0.2, HandshakeBurstPerIP: 5}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeListenerWith(ln, ListenerOptions{Name: "edge", Limits: Limits{MaxTunnelsPerIP: 3}})
	codes := map[int]int{}
	for range 20 {
		resp, _ := dialFrom(t, "127.0.0.2", ln.Addr().String())
		codes[resp.StatusCode]++
		if ra, _ := strconv.Atoi(resp.Header.Get("Retry-After")); resp.StatusCode == http.StatusTooManyRequests && (ra < 1 || ra > 5) {
			t.Errorf("429 with Retry-After %q, want 1 to 5 (seconds to the next token)", resp.Header.Get("Retry-After"))
		}
		if resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "" {
			t.Error("503 without Retry-After")
		}
	}
	// 5 handshakes of the burst: 3 tunnels, then 2 refused by the listener's max_tunnels_per_ip; the
	// other 15 by the rate.
	if codes[101] != 3 || codes[503] != 2 || codes[429] != 15 {
		t.Errorf("answers to a flood of 20 from one address: %v; want 3×101, 2×503, 15×429", codes)
	}
	if resp, _ := dialFrom(t, "127.0.0.3", ln.Addr().String()); resp.StatusCode != http.StatusSwitchingProtocols {
		t.Errorf("another address during the flood: %d, want 101", resp.StatusCode)
	}
	m := scrape(t, r)
	for _, want := range []string{`reason="limit_handshake_rate"} 15`, `reason="limit_tunnels_per_ip"} 2`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(m, "handshakes_failed"))
		}
	}
}
