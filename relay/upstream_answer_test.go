package relay

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// endlessHeadUpstream is an upstream that answers every request with a response head that never ends
// (up to 64 MiB); written receives how much it wrote before its writes failed.
func endlessHeadUpstream(t *testing.T) (addr string, written <-chan int64) {
	const sendAtMost = 64 << 20 // the fake stops here; unbounded, the relay would read all of it
	w := make(chan int64, 1)
	addr = serveEach(t, nil, func(c net.Conn) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		_ = c.(*net.TCPConn).SetWriteBuffer(64 << 10) // so that what it wrote is close to what the relay read
		status := "200 OK"
		if req.Header.Get("Upgrade") != "" {
			status = "101 Switching Protocols"
		}
		n, _ := c.Write([]byte("HTTP/1.1 " + status + "\r\nX-Endless: "))
		total := int64(n)
		chunk := bytes.Repeat([]byte("a"), 32<<10)
		for total < sendAtMost {
			n, err := c.Write(chunk)
			total += int64(n)
			if err != nil {
				break
			}
		}
		w <- total
		if total >= sendAtMost {
			_, _ = c.Read(make([]byte, 1)) // hold the connection: the relay must give up by itself
		}
	})
	return addr, w
}

// checkEndlessHeadCut: the endless upstream's writes failed soon after the relay had read its cap of 16 KiB.
func checkEndlessHeadCut(t *testing.T, written <-chan int64) {
	t.Helper()
	select {
	case n := <-written:
		// What the relay did not read sits in socket buffers: its receive buffer, which never grew past
		// its start since the relay stopped reading, and the fake's 64 KiB send buffer.
		t.Logf("the upstream wrote %d bytes before the relay closed", n)
		if n > 1<<20 {
			t.Errorf("the upstream wrote %d bytes before the relay closed; the cap is 16 KiB", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream's writes never failed: the relay kept its connection open")
	}
}

// TestUpstreamEndlessHeadRefused: an upstream whose response head never ends is refused with 502 once
// the relay has read max header bytes of it, instead of being read until the response timeout (and grown
// into the relay's memory all that time).
func TestUpstreamEndlessHeadRefused(t *testing.T) {
	addr, written := endlessHeadUpstream(t)
	r := startRelay(t, DatapathCopy, []string{addr}, func(c *Config) {
		c.MaxHeaderBytes = 16 << 10
		c.UpstreamResponseTimeout = 3 * time.Second
	})
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", c.Resp.StatusCode)
	}
	if body := readBody(t, c.Resp); !strings.Contains(body, "larger than 16384 bytes") {
		t.Errorf("body %q should say the response head passed 16384 bytes", body)
	}
	if got := r.failures(FailUpstreamError); got != 1 {
		t.Errorf("handshakes_failed{reason=upstream_error} = %v, want 1", got)
	}
	checkEndlessHeadCut(t, written)
}

// TestPlainEndlessHeadRefused: the same cap holds for a plain (reverse-proxied) request's response head,
// which net/http's transport would otherwise read up to 10 MB of.
func TestPlainEndlessHeadRefused(t *testing.T) {
	addr, written := endlessHeadUpstream(t)
	r := startRelay(t, DatapathCopy, []string{addr}, func(c *Config) {
		c.MaxHeaderBytes = 16 << 10
		c.UpstreamResponseTimeout = 3 * time.Second
	})
	resp, err := http.Get("http://" + r.Addr + "/page")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", resp.StatusCode)
	}
	if !strings.Contains(r.Log.String(), "exceeded 16384 bytes") {
		t.Errorf("the log does not say the response head passed 16384 bytes:\n%s", r.Log)
	}
	checkEndlessHeadCut(t, written)
}

// TestUpstreamInterimResponsesSkipped: interim responses (100 Continue, 103 Early Hints) before the 101
// are skipped, and the tunnel behind them carries both streams exactly; too many of them, or heads past
// max header bytes together, are a 502.
func TestUpstreamInterimResponsesSkipped(t *testing.T) {
	const (
		continue100 = "HTTP/1.1 100 Continue\r\n\r\n"
		hints103    = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
	)
	bigHints := "HTTP/1.1 103 Early Hints\r\nLink: </" + strings.Repeat("x", 3000) + ">; rel=preload\r\n\r\n"
	cases := []struct {
		name    string
		interim string
		status  int
	}{
		{"100 continue", continue100, http.StatusSwitchingProtocols},
		{"103 early hints", hints103, http.StatusSwitchingProtocols},
		{"100 then 103", continue100 + hints103, http.StatusSwitchingProtocols},
		{"as many as allowed", strings.Repeat(continue100, upstream.MaxInterimResponses), http.StatusSwitchingProtocols},
		{"one too many", strings.Repeat(continue100, upstream.MaxInterimResponses+1), http.StatusBadGateway},
		{"heads past the cap together", strings.Repeat(bigHints, 3), http.StatusBadGateway},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.MaxHeaderBytes = 8 << 10 })
			tr := newTransfer(duplexCase{toUpstream: 100_000, toClient: 100_000, pipelined: 1000, with101: 1000}, 7)
			uc := make(chan *upstreamConn, 1)
			go func() {
				u := <-up.Conns
				// Interim responses, the 101 and the first tunnel bytes in one write: the relay must
				// find the tunnel's bytes behind all the heads.
				_, _ = u.Write([]byte(tc.interim + switchResponse(u.Req) + string(tr.toClient[:1000])))
				uc <- u
			}()
			c := dialRelay(t, r.Addr, upgradeRequest("/"), tr.toUpstream[:1000])
			u := <-uc
			t.Cleanup(func() { u.Close() })
			if c.Resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", c.Resp.StatusCode, tc.status)
			}
			if tc.status != http.StatusSwitchingProtocols {
				if got := r.failures(FailUpstreamError); got != 1 {
					t.Errorf("handshakes_failed{reason=upstream_error} = %v, want 1", got)
				}
				return
			}
			for _, err := range tr.run(c, u) {
				t.Error(err)
			}
		})
	}
}

// TestLocalResourceErrorsNotBlamedOnServer: when the relay's own socket calls fail (out of descriptors,
// buffers, memory or local ports), the client gets 503 local_resources and the server is not marked
// down: once the relay recovers, the server takes tunnels at once.
func TestLocalResourceErrorsNotBlamedOnServer(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.EADDRNOTAVAIL} {
		t.Run(errno.Error(), func(t *testing.T) {
			up := startUpstream(t)
			acceptAll(t, up)
			pool := newPool(t, "p", []string{up.Addr}, func(s *upstream.PoolSpec) {
				s.Passive = upstream.DefaultPassiveHealth()
			})
			var failing atomic.Bool
			failing.Store(true)
			r := startRelay(t, DatapathCopy, nil, func(c *Config) {
				c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
				c.dialControl = func(string, string, syscall.RawConn) error {
					if failing.Load() {
						return errno
					}
					return nil
				}
			})
			tries := upstream.DefaultPassiveHealth().Failures + 1 // enough to take the server down if blamed
			for i := range tries {
				c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
				if c.Resp.StatusCode != http.StatusServiceUnavailable {
					t.Fatalf("handshake %d: status %d, want 503", i, c.Resp.StatusCode)
				}
				if body := readBody(t, c.Resp); !strings.Contains(body, "out of resources") {
					t.Errorf("handshake %d: body %q should say the relay is out of resources", i, body)
				}
			}
			if got := r.failures(FailLocalResources); got != float64(tries) {
				t.Errorf("handshakes_failed{reason=local_resources} = %v, want %d", got, tries)
			}
			if !strings.Contains(r.Log.String(), errno.Error()) {
				t.Errorf("the log does not give the cause %q", errno.Error())
			}
			if st := serverState(t, pool, up.Addr); st.State != upstream.StateUp || st.Failures != 0 {
				t.Errorf("server after the relay's own failures: state %s, %d failures; want up with none", st.State, st.Failures)
			}
			failing.Store(false)
			c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
			if c.Resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("after the relay recovered: status %d, want 101", c.Resp.StatusCode)
			}
		})
	}
}

// TestSlowUpstreamGetsItsUpstreamTimeout: a retry timeout shorter than the upstream timeout does not cut
// the try under way: an upstream answering after the retry timeout, within its upstream timeout, opens
// the tunnel (--upstream-timeout 30s with an upstream answering after 20s, scaled down). The retry
// timeout still stops further tries: a silent server is not followed by another.
func TestSlowUpstreamGetsItsUpstreamTimeout(t *testing.T) {
	const retryTimeout, answerAfter, upstreamTimeout = 200 * time.Millisecond, 600 * time.Millisecond, 3 * time.Second
	t.Run("slow answer", func(t *testing.T) {
		up := startUpstream(t)
		go func() {
			u := <-up.Conns
			time.Sleep(answerAfter)
			_, _ = u.Write([]byte(switchResponse(u.Req))) // fails, past the test, where the relay gave up
		}()
		pool := newPool(t, "p", []string{up.Addr}, func(s *upstream.PoolSpec) { s.Retry.Timeout = retryTimeout })
		r := startRelay(t, DatapathCopy, nil, func(c *Config) {
			c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
			c.UpstreamResponseTimeout = upstreamTimeout
		})
		if c := dialRelay(t, r.Addr, upgradeRequest("/"), nil); c.Resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status %d, want 101 from an upstream answering after %v with a %v upstream timeout",
				c.Resp.StatusCode, answerAfter, upstreamTimeout)
		}
	})
	t.Run("no try after the retry timeout", func(t *testing.T) {
		silent, other := startUpstream(t), startUpstream(t) // neither answers
		pool := newPool(t, "p", []string{silent.Addr, other.Addr}, func(s *upstream.PoolSpec) {
			s.Retry.Timeout = retryTimeout
			s.Passive.Failures = 0
		})
		r := startRelay(t, DatapathCopy, nil, func(c *Config) {
			c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
			c.UpstreamResponseTimeout = answerAfter // the silent server's try ends past the retry timeout
		})
		c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
		if c.Resp.StatusCode != http.StatusGatewayTimeout {
			t.Fatalf("status %d, want 504", c.Resp.StatusCode)
		}
		if n := silent.Accepted() + other.Accepted(); n != 1 {
			t.Errorf("%d servers tried, want 1: the first try ended past the retry timeout", n)
		}
	})
}

// TestMaxHeaderBytesExact: a request head of exactly max header bytes passes; one byte more is a 431
// (net/http alone would let 4096 more through). Under 4097 bytes, where net/http has no limit, the
// limit is 4097, as docs/configuration.md says.
func TestMaxHeaderBytesExact(t *testing.T) {
	const ok, tooLarge = http.StatusSwitchingProtocols, http.StatusRequestHeaderFieldsTooLarge
	cases := []struct {
		limit, size, status int
	}{
		{8 << 10, 8 << 10, ok},
		{8 << 10, 8<<10 + 1, tooLarge},
		{8 << 10, 8<<10 + 4096, tooLarge},
		{DefaultMaxHeaderBytes, DefaultMaxHeaderBytes, ok},
		{DefaultMaxHeaderBytes, DefaultMaxHeaderBytes + 1, tooLarge},
		{2048, 4097, ok},
		{2048, 4098, tooLarge},
	}
	for _, tc := range cases {
		up := startUpstream(t)
		acceptAll(t, up)
		r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.MaxHeaderBytes = tc.limit })
		if c := dialRelay(t, r.Addr, requestOfSize(t, tc.size), nil); c.Resp.StatusCode != tc.status {
			t.Errorf("max header bytes %d, head of %d bytes: status %d, want %d", tc.limit, tc.size, c.Resp.StatusCode, tc.status)
		}
	}
}

// requestOfSize is a valid handshake whose head (request line to blank line) is exactly size bytes.
func requestOfSize(t *testing.T, size int) string {
	t.Helper()
	base := upgradeRequest("/")
	const pad = "X-Pad: \r\n"
	n := size - len(base) - len(pad)
	if n < 0 {
		t.Fatalf("no handshake is as short as %d bytes", size)
	}
	req := strings.TrimSuffix(base, "\r\n") + "X-Pad: " + strings.Repeat("p", n) + "\r\n\r\n"
	if len(req) != size {
		t.Fatalf("built a %d-byte head, want %d", len(req), size)
	}
	return req
}

// TestPlainLocalResourceErrors: a plain request whose connect fails for want of the relay's own resources
// is a 503, as a handshake is, not a 502 that blames the upstream; the log gives the cause.
func TestPlainLocalResourceErrors(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) {
		c.dialControl = func(string, string, syscall.RawConn) error { return syscall.EMFILE }
	})
	resp, err := http.Get("http://" + r.Addr + "/page")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503", resp.StatusCode)
	}
	if !strings.Contains(r.Log.String(), syscall.EMFILE.Error()) {
		t.Errorf("the log does not give the cause %q:\n%s", syscall.EMFILE.Error(), r.Log)
	}
}
