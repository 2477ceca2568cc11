package relay

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/upstream"
)

// pathRecorder is a plain HTTP upstream that answers 200 "ok" and remembers each request's target.
type pathRecorder struct {
	*httptest.Server
	mu      sync.Mutex
	targets []string
}

func startPathRecorder(t testing.TB) *pathRecorder {
	t.Helper()
	p := &pathRecorder{}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		p.mu.Lock()
		p.targets = append(p.targets, r.RequestURI)
		p.mu.Unlock()
		io.WriteString(w, "ok")
	}))
	t.Cleanup(p.Close)
	return p
}

// Targets returns the request targets received so far.
func (p *pathRecorder) Targets() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.targets...)
}

// TestConnectRefused: CONNECT asks a forward proxy for a tunnel; a reverse proxy has none to give.
// Proxied, it reached the upstream as a request for "/" with the client's tunnel bytes behind it.
func TestConnectRefused(t *testing.T) {
	up := startPathRecorder(t)
	r := startRelay(t, DatapathCopy, []string{up.Listener.Addr().String()})
	c := dialRelay(t, r.Addr, "CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n",
		[]byte("SSH-2.0-OpenSSH_9.2\r\n"))
	if c.Resp.StatusCode != http.StatusNotImplemented {
		t.Errorf("CONNECT: status %d, want 501", c.Resp.StatusCode)
	}
	if body := readBody(t, c.Resp); !strings.Contains(body, "CONNECT is not supported") {
		t.Errorf("CONNECT: body %q does not say why", body)
	}
	if rest, err := readAllWithin(c.TCPConn, c.R, 5*time.Second); err != nil && !isReset(err) {
		t.Errorf("connection not closed after refusing CONNECT: %v (read %q)", err, rest)
	}
	if got := up.Targets(); len(got) != 0 {
		t.Errorf("the upstream got %q", got)
	}
}

// TestChunkedWithContentLengthCloses: a request with both Transfer-Encoding and Content-Length may be
// framed differently by a proxy in front; whatever follows it on the connection must not be served
// (RFC 9112 section 6.1): the relay answers it and closes.
func TestChunkedWithContentLengthCloses(t *testing.T) {
	up := startPathRecorder(t)
	r := startRelay(t, DatapathCopy, []string{up.Listener.Addr().String()})
	const smuggled = "GET /smuggled HTTP/1.1\r\nHost: relay.test\r\n\r\n"
	c := dialRelay(t, r.Addr, "POST /form HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 48\r\n"+
		"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", []byte(smuggled))
	if c.Resp.StatusCode != http.StatusOK && c.Resp.StatusCode != http.StatusBadRequest {
		t.Errorf("status %d, want 200 (served, then closed) or 400", c.Resp.StatusCode)
	}
	readBody(t, c.Resp)
	rest, err := readAllWithin(c.TCPConn, c.R, 5*time.Second)
	if err != nil && !isReset(err) {
		t.Errorf("connection kept open after a request with both Content-Length and Transfer-Encoding: %v", err)
	}
	if strings.Contains(string(rest), "HTTP/1.1") {
		t.Errorf("the pipelined request was answered: %q", rest)
	}
	for _, target := range up.Targets() {
		if target == "/smuggled" {
			t.Errorf("the pipelined request reached the upstream (it got %q)", up.Targets())
		}
	}
}

// TestUnderscoreIdentityHeadersDropped: X_Forwarded_For and the like are X-Forwarded-For to CGI-style
// upstreams (HTTP_X_FORWARDED_FOR); beside the relay's own they would let a client name its address.
// They are dropped on the WebSocket and the plain path; other underscore headers pass.
func TestUnderscoreIdentityHeadersDropped(t *testing.T) {
	const spoofed = "X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nx_forwarded_proto: https\r\n" +
		"X_FORWARDED_HOST: evil.example\r\nX-Forwarded_For: 6.6.6.6\r\nX_Custom: kept\r\n\r\n"
	for _, tc := range []struct {
		name, request string
		answer        func(*upstreamConn) string
	}{
		{"websocket", upgradeRequest("/ws"), func(u *upstreamConn) string { return switchResponse(u.Req) }},
		{"plain", "GET /page HTTP/1.1\r\nHost: relay.test\r\n\r\n",
			func(*upstreamConn) string { return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, DatapathCopy, []string{up.Addr})
			got := make(chan http.Header, 1)
			go func() {
				u := up.next(t)
				got <- u.Req.Header
				u.Write([]byte(tc.answer(u)))
			}()
			c := dialRelay(t, r.Addr, strings.TrimSuffix(tc.request, "\r\n")+spoofed, nil)
			if c.Resp.StatusCode >= 300 {
				t.Fatalf("status %d", c.Resp.StatusCode)
			}
			h := <-got
			for name, v := range h {
				if strings.Contains(name, "_") && name != "X_custom" {
					t.Errorf("upstream got %s: %q", name, v)
				}
			}
			if h.Get("X_Custom") != "kept" {
				t.Errorf("X_Custom, not an identity header, was dropped: %v", h)
			}
			if got := h.Values("X-Forwarded-For"); len(got) != 1 || got[0] != "127.0.0.1" {
				t.Errorf("X-Forwarded-For %q, want the relay's 127.0.0.1 alone", got)
			}
		})
	}
}

// listenerRouter routes as `sockrelay run --config` does: by config.Listener.Match.
type listenerRouter struct {
	l     config.Listener
	pools map[string]*upstream.Pool
}

func (lr listenerRouter) Route(_ string, r *http.Request) (Route, bool) {
	rt, ok := lr.l.Match(r.Host, r.URL.Path)
	if !ok {
		return Route{}, false
	}
	return Route{Pool: lr.pools[rt.Pool], Origins: rt.Origins}, true
}

func (lr listenerRouter) Pools() []*upstream.Pool {
	var out []*upstream.Pool
	for _, p := range lr.pools {
		out = append(out, p)
	}
	return out
}

// TestPathVariantsKeepTheirRoute: with a route for /admin that allows one Origin and a catch-all that
// allows any, no spelling of /admin that an upstream may serve as /admin reaches it from another site
// through the catch-all: merged slashes and their encoded form are a 400, ";parameters" are left out of
// matching, and a case variant must pass /admin's allow-list too (matching itself stays case-sensitive).
// Plain requests are routed alike.
func TestPathVariantsKeepTheirRoute(t *testing.T) {
	admin, public := startUpstream(t), startUpstream(t)
	acceptAll(t, admin)
	acceptAll(t, public)
	adminHTTP, publicHTTP := startPathRecorder(t), startPathRecorder(t)
	route := func(admin, public string) listenerRouter {
		return listenerRouter{
			l: config.Listener{Routes: []config.Route{
				{PathPrefix: "/admin", Origins: []string{"https://admin.example"}, Pool: "admin"},
				{PathPrefix: "/", Pool: "public"},
			}},
			pools: map[string]*upstream.Pool{"admin": newPool(t, "admin", []string{admin}, nil),
				"public": newPool(t, "public", []string{public}, nil)},
		}
	}
	ws := startRelay(t, DatapathCopy, nil, func(c *Config) { c.Router = route(admin.Addr, public.Addr) })
	plain := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = route(adminHTTP.Listener.Addr().String(), publicHTTP.Listener.Addr().String())
	})
	for _, tc := range []struct {
		path     string
		status   int    // of a handshake from https://evil.example
		plainsTo string // where a plain GET goes: "admin", "public", or "" for a 400
	}{
		{"/admin", http.StatusForbidden, "admin"},
		{"/admin/", http.StatusForbidden, "admin"},
		{"//admin", http.StatusBadRequest, ""},
		{"/x//admin", http.StatusBadRequest, ""},
		{"/%2fadmin", http.StatusBadRequest, ""},
		{"/%2Fadmin", http.StatusBadRequest, ""},
		{"/admin;x", http.StatusForbidden, "admin"},
		{"/admin;jsessionid=1/x", http.StatusForbidden, "admin"},
		{"/..;/admin", http.StatusBadRequest, ""},
		{"/;x/admin", http.StatusBadRequest, ""},
		{"/%61dmin", http.StatusForbidden, "admin"},
		{"/Admin", http.StatusForbidden, "public"},
		{"/ADMIN/x", http.StatusForbidden, "public"},
		{"/Admin;x", http.StatusForbidden, "public"},
		{"/administrator", http.StatusSwitchingProtocols, "public"},
		{"/public/", http.StatusSwitchingProtocols, "public"},
		{"/Public", http.StatusSwitchingProtocols, "public"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			req := strings.Replace(upgradeRequest(tc.path), "\r\n\r\n", "\r\nOrigin: https://evil.example\r\n\r\n", 1)
			c := dialRelay(t, ws.Addr, req, nil)
			if c.Resp.StatusCode != tc.status {
				t.Errorf("handshake for %s from another site: status %d, want %d", tc.path, c.Resp.StatusCode, tc.status)
			}
			c.Close()

			beforeAdmin, beforePublic := len(adminHTTP.Targets()), len(publicHTTP.Targets())
			c = dialRelay(t, plain.Addr, "GET "+tc.path+" HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n", nil)
			readBody(t, c.Resp)
			c.Close()
			got := ""
			switch {
			case len(adminHTTP.Targets()) > beforeAdmin:
				got = "admin"
			case len(publicHTTP.Targets()) > beforePublic:
				got = "public"
			}
			if got != tc.plainsTo || (got == "" && c.Resp.StatusCode != http.StatusBadRequest) {
				t.Errorf("GET %s: status %d, reached %q; want %q (400 when none)", tc.path, c.Resp.StatusCode, got, tc.plainsTo)
			}
		})
	}
}

// TestPlainRequestIdleCut: a plain request through which nothing moves for the HTTP idle timeout is cut,
// and both its connections are closed: a POST whose body stops coming (408), a client that stops
// reading a large response, an upstream that stops sending one. Before, each held the client and the
// upstream connection for ever.
func TestPlainRequestIdleCut(t *testing.T) {
	const idle = 300 * time.Millisecond
	for _, tc := range []struct {
		name    string
		request string
		// upstream answers u; it returns when its connection is closed, or fails after 10 s.
		upstream func(t *testing.T, u *upstreamConn) error
		status   int // 0: any, or none (net/http drops a response head it has not flushed when the copy fails)
	}{
		{name: "stalled body", request: "POST /upload HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 1000\r\n\r\nfirst bytes",
			upstream: func(t *testing.T, u *upstreamConn) error {
				_, err := readAllWithin(u.TCPConn, u.R, 10*time.Second)
				return err
			}, status: http.StatusRequestTimeout},
		{name: "client stops reading", request: "GET /big HTTP/1.1\r\nHost: relay.test\r\n\r\n",
			upstream: func(t *testing.T, u *upstreamConn) error {
				u.SetWriteDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(u, "HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n"); err != nil {
					return err
				}
				chunk := make([]byte, 64<<10)
				for {
					if _, err := u.Write(chunk); err != nil {
						if isTimeout(err) {
							return err
						}
						return nil // the relay closed it
					}
				}
			}, status: http.StatusOK},
		{name: "upstream stops sending", request: "GET /partial HTTP/1.1\r\nHost: relay.test\r\n\r\n",
			upstream: func(t *testing.T, u *upstreamConn) error {
				if _, err := io.WriteString(u, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial"); err != nil {
					return err
				}
				_, err := readAllWithin(u.TCPConn, u.R, 10*time.Second)
				return err
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.HTTPIdleTimeout = idle })
			upstreamDone := make(chan error, 1)
			go func() { upstreamDone <- tc.upstream(t, up.next(t)) }()
			c, err := net.Dial("tcp", r.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, tc.request)
			br := bufio.NewReader(c)
			if tc.status != 0 {
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("read response: %v", err)
				}
				if resp.StatusCode != tc.status {
					t.Errorf("status %d, want %d", resp.StatusCode, tc.status)
				}
			}
			// The client reads nothing more until the upstream connection is over.
			select {
			case err := <-upstreamDone:
				if err != nil {
					t.Errorf("upstream connection not closed by the relay: %v", err)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("upstream still busy after 15 s")
			}
			if _, err := readAllWithin(c, br, 10*time.Second); err != nil && !isReset(err) {
				t.Errorf("client connection not closed by the relay: %v", err)
			}
			if !strings.Contains(r.Log.String(), "plain request cut") {
				t.Errorf("the cut is not logged")
			}
		})
	}
}

// TestPlainRequestSlowBodyNotCut: a body that keeps coming, slowly, is not idle, however long it takes.
func TestPlainRequestSlowBodyNotCut(t *testing.T) {
	const idle = 500 * time.Millisecond
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.HTTPIdleTimeout = idle })
	const pieces, piece = 12, "0123456789"
	go func() {
		u := up.next(t)
		body, err := io.ReadAll(u.Req.Body)
		if err != nil {
			u.Close()
			return
		}
		io.WriteString(u, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+string(body))
	}()
	c, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "POST /slow HTTP/1.1\r\nHost: relay.test\r\nContent-Length: "+strconv.Itoa(pieces*len(piece))+"\r\n\r\n")
	for range pieces { // 1.2 s in all, more than twice the idle timeout
		time.Sleep(idle / 5)
		if _, err := io.WriteString(c, piece); err != nil {
			t.Fatalf("sending the body: %v", err)
		}
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	if body := readBody(t, resp); resp.StatusCode != http.StatusOK || body != strings.Repeat(piece, pieces) {
		t.Errorf("status %d, body %q: the slow body was cut", resp.StatusCode, body)
	}
}

// TestHTTPIdleTimeoutValidated: a negative HTTP idle timeout is refused with the accepted range.
func TestHTTPIdleTimeoutValidated(t *testing.T) {
	_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathCopy, HTTPIdleTimeout: -time.Second})
	if err == nil || !strings.Contains(err.Error(), "HTTPIdleTimeout: -1s is out of range; accepted more than 0s") {
		t.Errorf("NewServer with a negative HTTP idle timeout: %v; want the accepted range", err)
	}
}

// TestPlainRequestUpstreamNotReadingCut: an upstream that reads none of a large request body (nginx's
// proxy_send_timeout) stops the request as surely as a client that sends none: it is cut, and both
// connections are closed.
func TestPlainRequestUpstreamNotReadingCut(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.HTTPIdleTimeout = 300 * time.Millisecond })
	c, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const size = 64 << 20 // far more than the socket buffers on the way hold
	go func() {
		io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: relay.test\r\nContent-Length: "+strconv.Itoa(size)+"\r\n\r\n")
		c.Write(make([]byte, size)) // fails once the relay closes the connection
	}()
	u := up.next(t) // it reads the request head, then no byte of the body
	if _, err := readAllWithin(c, c, 10*time.Second); err != nil && !isReset(err) {
		t.Errorf("client connection not closed by the relay: %v", err)
	}
	if _, err := readAllWithin(u.TCPConn, u.R, 10*time.Second); err != nil && !isReset(err) {
		t.Errorf("upstream connection not closed by the relay: %v", err)
	}
}
