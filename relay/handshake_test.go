package relay

import (
	"bufio"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestAcceptKey(t *testing.T) {
	// The worked example of RFC 6455 section 1.3.
	if got, want := AcceptKey("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="; got != want {
		t.Fatalf("AcceptKey = %q, want %q", got, want)
	}
}

// TestUpgradeValidation sends handshakes that break RFC 6455 through a relay: each gets its status, is
// counted under its reason, and the upstream never sees a connection.
func TestUpgradeValidation(t *testing.T) {
	const okHeaders = "Host: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + testKey + "\r\nSec-WebSocket-Version: 13\r\n"
	cases := []struct {
		name    string
		request string
		status  int
		reason  string
		body    string // a substring of the error body the client gets
	}{
		{"post", "POST / HTTP/1.1\r\n" + okHeaders + "\r\n", 400, FailBadRequest, "must use GET"},
		{"http/1.0", "GET / HTTP/1.0\r\n" + okHeaders + "\r\n", 400, FailBadRequest, "HTTP/1.1"},
		{"upgrade h2c", "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + testKey +
			"\r\nSec-WebSocket-Version: 13\r\n\r\n", 400, FailBadRequest, "only websocket upgrades"},
		{"no connection upgrade", "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\nSec-WebSocket-Key: " +
			testKey + "\r\nSec-WebSocket-Version: 13\r\n\r\n", 400, FailBadRequest, "Connection header"},
		{"connection upgrade without upgrade header", "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n",
			400, FailBadRequest, "Upgrade header"},
		{"body", "GET / HTTP/1.1\r\n" + okHeaders + "Content-Length: 5\r\n\r\nhello", 400, FailBadRequest, "body"},
		{"chunked body", "GET / HTTP/1.1\r\n" + okHeaders + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, FailBadRequest, "body"},
		{"version 8", strings.Replace("GET / HTTP/1.1\r\n"+okHeaders+"\r\n", "Version: 13", "Version: 8", 1), 426, FailBadVersion, "must be 13"},
		{"no version", strings.Replace("GET / HTTP/1.1\r\n"+okHeaders+"\r\n", "Sec-WebSocket-Version: 13\r\n", "", 1), 426, FailBadVersion, "must be 13"},
		{"no key", strings.Replace("GET / HTTP/1.1\r\n"+okHeaders+"\r\n", "Sec-WebSocket-Key: "+testKey+"\r\n", "", 1), 400, FailBadRequest, "Sec-WebSocket-Key"},
		{"short key", strings.Replace("GET / HTTP/1.1\r\n"+okHeaders+"\r\n", testKey, "c2hvcnQ=", 1), 400, FailBadRequest, "16 bytes"},
		{"key not base64", strings.Replace("GET / HTTP/1.1\r\n"+okHeaders+"\r\n", testKey, "!!!!not-base64!!!!!!!==", 1), 400, FailBadRequest, "16 bytes"},
		{"two keys", "GET / HTTP/1.1\r\n" + okHeaders + "Sec-WebSocket-Key: " + testKey + "\r\n\r\n", 400, FailBadRequest, "exactly one"},
	}
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := r.failures(tc.reason)
			c := dialRelay(t, r.Addr, tc.request, nil)
			if c.Resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", c.Resp.StatusCode, tc.status)
			}
			body := readBody(t, c.Resp)
			if !strings.Contains(body, tc.body) {
				t.Errorf("body %q does not say %q", body, tc.body)
			}
			if tc.status == 426 && c.Resp.Header.Get("Sec-WebSocket-Version") != "13" {
				t.Errorf("426 without Sec-WebSocket-Version: 13 (headers %v)", c.Resp.Header)
			}
			if !c.Resp.Close {
				t.Errorf("refused handshake left the client connection open")
			}
			if got := r.failures(tc.reason); got != before+1 {
				t.Errorf("handshakes_failed{reason=%q} = %v, want %v", tc.reason, got, before+1)
			}
		})
	}
	if n := up.Accepted(); n != 0 {
		t.Fatalf("upstream saw %d connections from invalid handshakes, want 0", n)
	}
}

func readBody(t testing.TB, resp *http.Response) string {
	t.Helper()
	var b strings.Builder
	_, err := bufio.NewReader(resp.Body).WriteTo(&b)
	if err != nil {
		t.Fatalf("read response body: %v", err)
	}
	return b.String()
}

// TestForwardedRequest checks what the upstream receives: the client's target and Host, end-to-end
// headers, no hop-by-hop headers but the upgrade, and X-Forwarded-* that describe the real client.
func TestForwardedRequest(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	req := "GET /chat/room?id=7&x=%2F HTTP/1.1\r\nHost: app.example:8443\r\n" +
		"Upgrade: websocket\r\nConnection: keep-alive, Upgrade, X-Secret-Hop\r\n" +
		"X-Secret-Hop: must not pass\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\n" +
		"Sec-WebSocket-Key: " + testKey + "\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n" +
		"Origin: https://app.example\r\nCookie: session=abc\r\n" +
		"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n\r\n"

	got := make(chan *http.Request, 1)
	go func() {
		u := <-up.Conns
		got <- u.Req
		u.Write([]byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Up-Hop\r\n" +
			"X-Up-Hop: drop me\r\nKeep-Alive: timeout=1\r\nSec-WebSocket-Accept: " + AcceptKey(testKey) + "\r\n" +
			"Sec-WebSocket-Protocol: chat\r\nSet-Cookie: seen=1\r\n\r\n"))
	}()
	c := dialRelay(t, r.Addr, req, nil)
	if c.Resp.StatusCode != 101 {
		t.Fatalf("status %d, want 101", c.Resp.StatusCode)
	}
	var fwd *http.Request
	select {
	case fwd = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("upstream got no request")
	}

	if fwd.RequestURI != "/chat/room?id=7&x=%2F" {
		t.Errorf("request target %q, want the client's", fwd.RequestURI)
	}
	if fwd.Host != "app.example:8443" {
		t.Errorf("Host %q, want the client's app.example:8443", fwd.Host)
	}
	want := map[string]string{
		"Upgrade":                  "websocket",
		"Connection":               "Upgrade",
		"Sec-Websocket-Key":        testKey,
		"Sec-Websocket-Version":    "13",
		"Sec-Websocket-Protocol":   "chat, superchat",
		"Sec-Websocket-Extensions": "permessage-deflate",
		"Origin":                   "https://app.example",
		"Cookie":                   "session=abc",
		"X-Forwarded-For":          "127.0.0.1",
		"X-Forwarded-Host":         "app.example:8443",
		"X-Forwarded-Proto":        "http",
	}
	for k, v := range want {
		if got := strings.Join(fwd.Header.Values(k), ", "); got != v {
			t.Errorf("upstream header %s = %q, want %q", k, got, v)
		}
	}
	for _, k := range []string{"X-Secret-Hop", "Keep-Alive", "Proxy-Authorization", "Te", "Forwarded"} {
		if v := fwd.Header.Values(k); len(v) > 0 {
			t.Errorf("hop-by-hop or spoofable header %s = %q reached the upstream", k, v)
		}
	}

	// And what the client gets back: the upstream's end-to-end headers, not its hop-by-hop ones.
	for k, v := range map[string]string{"Sec-Websocket-Protocol": "chat", "Set-Cookie": "seen=1", "Upgrade": "websocket", "Connection": "Upgrade"} {
		if got := c.Resp.Header.Get(k); got != v {
			t.Errorf("client header %s = %q, want %q", k, got, v)
		}
	}
	for _, k := range []string{"X-Up-Hop", "Keep-Alive"} {
		if v := c.Resp.Header.Values(k); len(v) > 0 {
			t.Errorf("upstream hop-by-hop header %s = %q reached the client", k, v)
		}
	}
}
