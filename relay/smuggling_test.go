package relay

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestNoBytesToUpstreamThatRefused is the WebSocket request smuggling case: a client sends its upgrade with
// raw bytes pipelined behind it, and more after the answer. When the upstream does not accept the upgrade
// with a valid 101, the client gets an ordinary response (or 502) and the upstream gets no byte past the
// request: not the pipelined ones, not the later ones.
func TestNoBytesToUpstreamThatRefused(t *testing.T) {
	// A smuggled request as an attacker would pipeline it behind the upgrade.
	const smuggled = "GET /internal/admin HTTP/1.1\r\nHost: localhost\r\n\r\n"
	cases := []struct {
		name     string
		answer   func(req *http.Request) string
		status   int
		reason   string
		bodyHas  string
		headerOK func(http.Header) bool
	}{
		{name: "200", answer: func(*http.Request) string {
			return "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: yes\r\n\r\nhello"
		}, status: 200, reason: FailUpstreamRefused, bodyHas: "hello",
			headerOK: func(h http.Header) bool { return h.Get("X-App") == "yes" }},
		{name: "403", answer: func(*http.Request) string {
			return "HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden"
		}, status: 403, reason: FailUpstreamRefused, bodyHas: "forbidden"},
		{name: "401 chunked", answer: func(*http.Request) string {
			return "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nauth\r\n0\r\n\r\n"
		}, status: 401, reason: FailUpstreamRefused, bodyHas: "auth",
			headerOK: func(h http.Header) bool { return h.Get("WWW-Authenticate") == "Bearer" }},
		{name: "101 wrong accept", answer: func(*http.Request) string {
			return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
				AcceptKey("c29tZW9uZSBlbHNlcyBrZXk=") + "\r\n\r\n"
		}, status: 502, reason: FailUpstreamBadSwitch, bodyHas: "Sec-WebSocket-Accept"},
		{name: "101 no accept", answer: func(*http.Request) string {
			return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
		}, status: 502, reason: FailUpstreamBadSwitch, bodyHas: "Sec-WebSocket-Accept"},
		{name: "101 to h2c", answer: func(r *http.Request) string {
			return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
				AcceptKey(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
		}, status: 502, reason: FailUpstreamBadSwitch, bodyHas: "Upgrade: websocket"},
		{name: "101 no connection upgrade", answer: func(r *http.Request) string {
			return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: " +
				AcceptKey(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
		}, status: 502, reason: FailUpstreamBadSwitch, bodyHas: "Connection: upgrade"},
		{name: "100 continue then 403", answer: func(*http.Request) string {
			return "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden"
		}, status: 403, reason: FailUpstreamRefused, bodyHas: "forbidden"},
		{name: "not http", answer: func(*http.Request) string {
			return "SSH-2.0-OpenSSH_9.2\r\n"
		}, status: 502, reason: FailUpstreamError, bodyHas: "malformed"},
		{name: "closes without answer", answer: func(*http.Request) string { return "" },
			status: 502, reason: FailUpstreamError, bodyHas: "EOF"},
	}
	for _, dp := range testDatapaths {
		for _, tc := range cases {
			t.Run(string(dp)+"/"+tc.name, func(t *testing.T) {
				up := startUpstream(t)
				r := startRelay(t, dp, []string{up.Addr})
				before := r.failures(tc.reason)

				// The upstream answers, then records every byte it gets until the relay closes.
				extra := make(chan string, 1)
				go func() {
					u := <-up.Conns
					defer u.Close()
					ans := tc.answer(u.Req)
					if ans == "" {
						u.CloseWrite()
					} else {
						u.Write([]byte(ans))
					}
					got, _ := readAllWithin(u.TCPConn, u.R, 5*time.Second)
					extra <- string(got)
				}()
				c := dialRelay(t, r.Addr, upgradeRequest("/ws"), []byte(smuggled))
				if c.Resp.StatusCode != tc.status {
					t.Fatalf("client got status %d, want %d", c.Resp.StatusCode, tc.status)
				}
				if body := readBody(t, c.Resp); !strings.Contains(body, tc.bodyHas) {
					t.Errorf("client body %q does not contain %q", body, tc.bodyHas)
				}
				if tc.headerOK != nil && !tc.headerOK(c.Resp.Header) {
					t.Errorf("the upstream's headers did not reach the client: %v", c.Resp.Header)
				}
				// The client keeps talking; nothing of it may reach the upstream either.
				c.Write([]byte("\x81\x05hello" + smuggled))

				select {
				case got := <-extra:
					if got != "" {
						t.Fatalf("upstream that refused the upgrade received %d raw client bytes: %q", len(got), got)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("relay kept the refused upstream connection open")
				}
				// The relay closes the client after a failed upgrade: its pipelined frames are never parsed as HTTP.
				if rest, err := readAllWithin(c.TCPConn, c.R, 5*time.Second); err != nil && !isReset(err) {
					t.Errorf("client connection not closed after the refusal: %v", err)
				} else if strings.Contains(string(rest), "HTTP/1.1") {
					t.Errorf("relay answered the pipelined bytes as HTTP: %q", rest)
				}
				if up.Accepted() != 1 {
					t.Errorf("upstream saw %d connections, want 1", up.Accepted())
				}
				if got := r.failures(tc.reason); got != before+1 {
					t.Errorf("handshakes_failed{reason=%q} = %v, want %v", tc.reason, got, before+1)
				}
				if n := r.Tunnels().Len(); n != 0 {
					t.Errorf("%d tunnels opened for a refused upgrade", n)
				}
			})
		}
	}
}

// TestRefusalBodyIsBounded: an upstream that refuses and then never finishes its body cannot hold the
// handler; the client gets the headers and a truncated body when the response timeout runs out.
func TestRefusalBodyIsBounded(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.UpstreamResponseTimeout = 300 * time.Millisecond })
	go func() {
		u := <-up.Conns
		u.Write([]byte("HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\npartial"))
		io.Copy(io.Discard, u.R)
	}()
	start := time.Now()
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != 403 {
		t.Fatalf("status %d, want 403", c.Resp.StatusCode)
	}
	if _, err := readAllWithin(c.TCPConn, c.Resp.Body, 10*time.Second); err == nil {
		t.Errorf("truncated body read as complete")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("handler held the client for %v", d)
	}
}
