package relay

import (
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// checkStillServes opens a tunnel through r and moves a few bytes both ways: bad input before it must not
// have hurt the relay.
func checkStillServes(t *testing.T, r *testRelay, up *fakeUpstream) {
	t.Helper()
	runDuplex(t, r, up, duplexCase{toUpstream: 10_000, toClient: 10_000}, 99)
}

func TestSlowClientHeaders(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.ClientHeaderTimeout = 300 * time.Millisecond })
	c, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")) // and never the rest
	// A well-behaved client is served while the slow one dawdles.
	checkStillServes(t, r, up)
	start := time.Now()
	if _, err := readAllWithin(c, c, 10*time.Second); err != nil && !isReset(err) {
		t.Fatalf("slow client not disconnected: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("slow client held its connection for %v with a 300ms header timeout", d)
	}
	if up.Accepted() != 1 {
		t.Errorf("upstream saw %d connections, want only the good client's", up.Accepted())
	}
}

func TestBadRequests(t *testing.T) {
	cases := []struct {
		name    string
		request string
		status  int
	}{
		{"garbage request line", "HELLO\r\n\r\n", 400},
		{"bad header line", "GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400},
		{"no host", "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400},
		{"oversized headers", "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Big: " +
			strings.Repeat("a", 64<<10) + "\r\n\r\n", 431},
	}
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.MaxHeaderBytes = 8 << 10 })
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRelay(t, r.Addr, tc.request, nil)
			if c.Resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", c.Resp.StatusCode, tc.status)
			}
		})
	}
	if up.Accepted() != 0 {
		t.Errorf("upstream saw %d connections from bad requests", up.Accepted())
	}
	checkStillServes(t, r, up)
}

func TestUnreachableUpstream(t *testing.T) {
	// A port nothing listens on: connect is refused at once.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()

	r := startRelay(t, DatapathCopy, []string{dead})
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", c.Resp.StatusCode)
	}
	if body := readBody(t, c.Resp); !strings.Contains(body, dead) || !strings.Contains(body, "refused") {
		t.Errorf("body %q should name the upstream and say the connection was refused", body)
	}
	if got := r.failures(FailUpstreamUnreachable); got != 1 {
		t.Errorf("handshakes_failed{reason=upstream_unreachable} = %v, want 1", got)
	}
}

// blackholeListener returns the address of a listening socket whose accept queue is full: Linux drops the
// SYNs of further connects (tcp_conn_request: sk_acceptq_is_full), so a connect to it hangs, as to a
// firewalled host.
func blackholeListener(t *testing.T) string {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*unix.SockaddrInet4).Port}).String()
	// Fill the queue (backlog 0 admits one) and one more in SYN-received, never accepted.
	for range 2 {
		d := net.Dialer{Timeout: 200 * time.Millisecond}
		if c, err := d.Dial("tcp", addr); err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}
	return addr
}

func TestConnectTimeout(t *testing.T) {
	addr := blackholeListener(t)
	d := net.Dialer{Timeout: 300 * time.Millisecond}
	if c, err := d.Dial("tcp", addr); err == nil {
		c.Close()
		t.Skip("this kernel completed a connect to a full accept queue; cannot make a hanging upstream this way")
	}
	r := startRelay(t, DatapathCopy, []string{addr}, func(c *Config) { c.ConnectTimeout = 300 * time.Millisecond })
	start := time.Now()
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", c.Resp.StatusCode)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("502 came after %v with a 300ms connect timeout", d)
	}
	if got := r.failures(FailUpstreamUnreachable); got != 1 {
		t.Errorf("handshakes_failed{reason=upstream_unreachable} = %v, want 1", got)
	}
}

func TestUpstreamNeverAnswers(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.UpstreamResponseTimeout = 300 * time.Millisecond })
	go func() {
		u := <-up.Conns
		io.Copy(io.Discard, u.R) // accepts the request, never answers
	}()
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want 504", c.Resp.StatusCode)
	}
	if got := r.failures(FailUpstreamTimeout); got != 1 {
		t.Errorf("handshakes_failed{reason=upstream_timeout} = %v, want 1", got)
	}
	checkStillServes(t, r, up)
}

// TestClientGoneDuringHandshake: the client resets while the upstream is thinking. The relay must not open
// a tunnel, and must let the upstream go.
func TestClientGoneDuringHandshake(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, err := net.Dial("tcp", r.Addr)
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte(upgradeRequest("/")))
			u := up.next(t)
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			time.Sleep(50 * time.Millisecond) // let the reset land before the 101
			u.accept(t, nil)
			// Whatever the relay did, the upstream's connection must end and no tunnel may stay.
			if _, err := readAllWithin(u.TCPConn, u.R, 10*time.Second); err != nil && !isReset(err) && !errors.Is(err, unix.EPIPE) {
				t.Errorf("upstream connection not ended: %v", err)
			}
			waitTunnelsGone(t, r)
			checkStillServes(t, r, up)
		})
	}
}
