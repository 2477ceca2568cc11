package relay

import (
	"io"
	"net/http"
	"net/http/httptest"
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
