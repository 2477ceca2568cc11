package relay

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// pathRouter routes by path prefix, in order, for every listener; "" as a listener name matches any.
type pathRouter struct {
	routes []pathRoute
	pools  []*upstream.Pool
}

type pathRoute struct {
	listener, prefix string
	pool             *upstream.Pool
	origins          []string
	sendProxy        string
	upstreamTLS      func(string) *tls.Config
}

func (p *pathRouter) Route(listener string, r *http.Request) (Route, bool) {
	for _, rt := range p.routes {
		if (rt.listener == "" || rt.listener == listener) && strings.HasPrefix(r.URL.Path, rt.prefix) {
			return Route{Pool: rt.pool, Origins: rt.origins, SendProxy: rt.sendProxy, UpstreamTLS: rt.upstreamTLS}, true
		}
	}
	return Route{}, false
}

func (p *pathRouter) Pools() []*upstream.Pool { return p.pools }

// newPool builds a pool over addrs with the defaults and the changes edit makes.
func newPool(t testing.TB, name string, addrs []string, edit func(*upstream.PoolSpec)) *upstream.Pool {
	t.Helper()
	spec := upstream.PoolSpec{Name: name, Balance: upstream.RoundRobin}
	for _, a := range addrs {
		spec.Servers = append(spec.Servers, upstream.ServerSpec{Address: a})
	}
	spec = spec.WithDefaults()
	if edit != nil {
		edit(&spec)
	}
	p, err := upstream.New(spec, upstream.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// acceptAll answers every handshake up receives with a 101 and echoes nothing; it runs until the test ends.
func acceptAll(t testing.TB, up *fakeUpstream) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case c := <-up.Conns:
				c.Write([]byte(switchResponse(c.Req)))
			}
		}
	}()
}

// closedPort returns a loopback address nothing listens on: connecting to it is refused.
func closedPort(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// silentUpstream accepts connections and reads them, but never answers.
func silentUpstream(t testing.TB) string {
	return serveEach(t, nil, func(c net.Conn) { io.Copy(io.Discard, c) })
}

func serverState(t testing.TB, p *upstream.Pool, addr string) upstream.ServerState {
	t.Helper()
	for _, s := range p.Snapshot().Servers {
		if s.Address == addr {
			return s
		}
	}
	t.Fatalf("pool %s has no server %s", p.Name(), addr)
	return upstream.ServerState{}
}

// TestFailoverNoClientSeesAnError: of three upstreams one refuses connections and one never answers
// its handshake; with retries every client still gets its tunnel, and passive health takes the two bad
// servers out of the pool, so that later clients no longer wait for them. When the refusing server comes
// back, the active health check brings it back up and it takes tunnels again.
func TestFailoverNoClientSeesAnError(t *testing.T) {
	good := startUpstream(t)
	acceptAll(t, good)
	refused, silent := closedPort(t), silentUpstream(t)
	pool := newPool(t, "p", []string{refused, silent, good.Addr}, func(s *upstream.PoolSpec) {
		s.Passive = upstream.DefaultPassiveHealth()
		// Fall is high so that passive health, not the check, takes the servers down here. A websocket
		// check, since the silent server accepts connections: a tcp check would bring it back.
		s.Active = &upstream.ActiveHealthSpec{Type: upstream.CheckWebSocket, Path: "/", ExpectStatus: 101,
			Interval: 100 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 2, Fall: 100}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := pool.Start(ctx); err != nil {
		t.Fatal(err)
	}
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
		c.UpstreamResponseTimeout = 200 * time.Millisecond
	})
	for i := range 12 {
		c := dialRelay(t, r.Addr, upgradeRequest("/chat"), nil)
		if c.Resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("client %d: status %d, want 101", i, c.Resp.StatusCode)
		}
		c.Close()
	}
	for _, addr := range []string{refused, silent} {
		if st := serverState(t, pool, addr); st.State != upstream.StateDown || st.Failures < 3 {
			t.Errorf("server %s: state %s after %d failures; want down after 3", addr, st.State, st.Failures)
		}
	}
	if st := serverState(t, pool, good.Addr); st.State != upstream.StateUp || st.TotalTunnels != 12 {
		t.Errorf("good server: %+v; want up with all 12 tunnels", st)
	}
	if m := scrape(t, r); !strings.Contains(m, "sockrelay_upstream_retries_total ") || strings.Contains(m, "sockrelay_upstream_retries_total 0") {
		t.Errorf("retries not counted:\n%s", grepLines(m, "retries"))
	}

	// The refusing server comes back: the check passes Rise times, and it is up before its passive
	// down time (30 s) would have ended.
	back := serveUpgradesOn(t, refused)
	for deadline := time.Now().Add(5 * time.Second); serverState(t, pool, refused).State != upstream.StateUp; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("server %s still %s 5 s after it came back", refused, serverState(t, pool, refused).State)
		}
	}
	for range 4 {
		c := dialRelay(t, r.Addr, upgradeRequest("/chat"), nil)
		if c.Resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status %d after the server came back, want 101", c.Resp.StatusCode)
		}
		c.Close()
	}
	if st := serverState(t, pool, refused); st.TotalTunnels == 0 || back.Accepted() == 0 {
		t.Errorf("the server that came back got no tunnel: %+v", st)
	}
}

// serveUpgradesOn listens on addr and answers every handshake with a 101.
func serveUpgradesOn(t testing.TB, addr string) *fakeUpstream {
	t.Helper()
	up := startUpstreamOn(t, addr)
	acceptAll(t, up)
	return up
}

// TestRetryBounded: with tries: 1 a refused connection is the client's 502 at once, and when every
// server fails the client gets the last failure's status.
func TestRetryBounded(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tries  int
		status int
	}{
		{"one try", 1, http.StatusBadGateway},
		{"every server tried", 5, http.StatusBadGateway},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pool := newPool(t, "p", []string{closedPort(t), closedPort(t)}, func(s *upstream.PoolSpec) {
				s.Retry.Tries = tc.tries
				s.Passive.Failures = 0
			})
			r := startRelay(t, DatapathCopy, nil, func(c *Config) {
				c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
			})
			c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
			if c.Resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", c.Resp.StatusCode, tc.status)
			}
			failures := uint64(0)
			for _, st := range pool.Snapshot().Servers {
				failures += st.Failures
			}
			if want := uint64(min(tc.tries, 2)); failures != want {
				t.Errorf("%d connects tried, want %d", failures, want)
			}
		})
	}
}

// TestNoRouteAndNoServer: a request no route matches is a 404; one whose pool has no usable server is a
// 503; neither reaches an upstream, both are counted.
func TestNoRouteAndNoServer(t *testing.T) {
	up := startUpstream(t)
	pool := newPool(t, "chat", []string{up.Addr}, nil)
	if err := pool.MarkDown(up.Addr, true); err != nil {
		t.Fatal(err)
	}
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/chat", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	for _, tc := range []struct {
		path   string
		status int
		reason string
	}{
		{"/other", http.StatusNotFound, FailNoRoute},
		{"/chat", http.StatusServiceUnavailable, FailNoUpstream},
	} {
		c := dialRelay(t, r.Addr, upgradeRequest(tc.path), nil)
		if c.Resp.StatusCode != tc.status {
			t.Errorf("%s: status %d, want %d", tc.path, c.Resp.StatusCode, tc.status)
		}
		if n := r.failures(tc.reason); n != 1 {
			t.Errorf("%s: reason %s counted %v times, want 1:\n%s", tc.path, tc.reason, n, grepLines(scrape(t, r), "handshakes_failed"))
		}
		// A plain request is routed the same way.
		resp, err := http.Get("http://" + r.Addr + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("GET %s: status %d, want %d", tc.path, resp.StatusCode, tc.status)
		}
	}
	if n := up.Accepted(); n != 0 {
		t.Errorf("the upstream got %d connections; a refused request must reach none", n)
	}
}

// TestTunnelHoldsItsServer: a tunnel counts on its server's live tunnels from its 101 to its end, on
// every datapath, so least_tunnels and max_tunnels see it.
func TestTunnelHoldsItsServer(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			pool := newPool(t, "p", []string{up.Addr}, nil)
			r := startRelay(t, dp, nil, func(c *Config) {
				c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
			})
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			if live := serverState(t, pool, up.Addr).LiveTunnels; live != 1 {
				t.Errorf("live tunnels %d while the tunnel is open, want 1", live)
			}
			c.CloseWrite()
			u.CloseWrite()
			waitTunnelsGone(t, r)
			if live := serverState(t, pool, up.Addr).LiveTunnels; live != 0 {
				t.Errorf("live tunnels %d after the tunnel ended, want 0", live)
			}
		})
	}
}

// TestListenersRouteApart: two listeners of one server route the same path to different pools, and
// each listener's tunnels use its own datapath.
func TestListenersRouteApart(t *testing.T) {
	upA, upB := startUpstream(t), startUpstream(t)
	poolA, poolB := newPool(t, "a", []string{upA.Addr}, nil), newPool(t, "b", []string{upB.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{listener: "a", prefix: "/", pool: poolA}, {listener: "b", prefix: "/", pool: poolB}},
			pools: []*upstream.Pool{poolA, poolB}}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeListener("b", ln, DatapathSplice)
	c, _ := openTunnel(t, ln.Addr().String(), upB, nil, nil)
	defer c.Close()
	ts := r.Tunnels().Tunnels()
	if len(ts) != 1 || ts[0].Pool != "b" || ts[0].Datapath() != DatapathSplice {
		t.Fatalf("tunnels %v; want one of pool b on splice", ts)
	}
	// The default listener has no route here.
	if c := dialRelay(t, r.Addr, upgradeRequest("/"), nil); c.Resp.StatusCode != http.StatusNotFound {
		t.Errorf("default listener: status %d, want 404", c.Resp.StatusCode)
	}
	if _, err := r.ListenerDatapath(DatapathSockmap); err == nil {
		t.Error("a copy server accepted a sockmap listener; it has no kernel datapath loaded")
	}
}

// TestAdminAPI: the pools' state, run-time changes to a server (checked before any is made), closing a
// tunnel, and reload without a configuration file.
func TestAdminAPI(t *testing.T) {
	up, other := startUpstream(t), startUpstream(t)
	pool := newPool(t, "chat", []string{up.Addr, other.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	admin := httptest.NewServer(r.AdminHandler(r.Reg))
	defer admin.Close()

	var snaps []upstream.Snapshot
	if err := json.Unmarshal([]byte(get(t, admin.URL+"/admin/pools", 200)), &snaps); err != nil || len(snaps) != 1 ||
		snaps[0].Name != "chat" || len(snaps[0].Servers) != 2 {
		t.Fatalf("/admin/pools = %+v, %v; want pool chat with 2 servers", snaps, err)
	}

	post := func(path string, form url.Values, status int) string {
		t.Helper()
		resp, err := http.PostForm(admin.URL+path, form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != status {
			t.Errorf("POST %s %v: status %d, want %d: %s", path, form, resp.StatusCode, status, b)
		}
		return string(b)
	}
	server := "/admin/pools/chat/servers/" + other.Addr
	for _, tc := range []struct {
		path   string
		form   url.Values
		status int
		want   string
	}{
		{server, url.Values{"weight": {"5"}, "drain": {"true"}}, 200, `"state": "draining"`},
		{server, url.Values{"drain": {"false"}, "down": {"true"}}, 200, `"state": "forced_down"`},
		{server, url.Values{"weight": {"0"}}, 400, "weight: \\\"0\\\" is out of range; accepted 1 to 1000"},
		{server, url.Values{"weight": {"7"}, "drain": {"maybe"}}, 400, "drain: \\\"maybe\\\" is not true or false"},
		{server, url.Values{"colour": {"red"}}, 400, "unknown setting \\\"colour\\\"; accepted: weight, drain, down"},
		{server, url.Values{}, 400, "nothing to change"},
		{"/admin/pools/nope/servers/" + other.Addr, url.Values{"down": {"true"}}, 404, "no pool \\\"nope\\\"; pools: chat"},
		{"/admin/pools/chat/servers/127.0.0.1:1", url.Values{"down": {"true"}}, 404, "no server \\\"127.0.0.1:1\\\""},
	} {
		if body := post(tc.path, tc.form, tc.status); !strings.Contains(body, tc.want) {
			t.Errorf("POST %s %v = %s; want %s", tc.path, tc.form, body, tc.want)
		}
	}
	// A refused change changed nothing: weight 7 came with a bad drain.
	if st := serverState(t, pool, other.Addr); st.Weight != 5 || st.State != upstream.StateForcedDown {
		t.Errorf("server after the refused change: %+v; want weight 5, forced down", st)
	}

	// Every new tunnel now goes to the one server left.
	c, _ := openTunnel(t, r.Addr, up, nil, nil)
	ts := r.Tunnels().Tunnels()
	if len(ts) != 1 {
		t.Fatalf("%d tunnels, want 1", len(ts))
	}
	req, _ := http.NewRequest(http.MethodDelete, fmt.Sprintf("%s/admin/tunnels/%d", admin.URL, ts[0].ID), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("DELETE tunnel: %v, %v", resp, err)
	}
	resp.Body.Close()
	// Closed as on shutdown: reset, so the client cannot take the end for a clean one.
	if _, err := readAllWithin(c, c.R, 5*time.Second); isTimeout(err) {
		t.Errorf("client after the admin closed its tunnel: %v; want the connection closed", err)
	}
	waitTunnelsGone(t, r)
	if m := scrape(t, r); !strings.Contains(m, `sockrelay_tunnels_closed_total{listener="default",pool="chat",reason="admin"} 1`) {
		t.Errorf("admin close not counted:\n%s", grepLines(m, "closed_total"))
	}
	req, _ = http.NewRequest(http.MethodDelete, admin.URL+"/admin/tunnels/999", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 404 {
		t.Errorf("DELETE of an unknown tunnel: %v, %v; want 404", resp, err)
	}
	if body := post("/admin/reload", nil, http.StatusNotImplemented); !strings.Contains(body, "without a configuration file") {
		t.Errorf("reload without a file: %s", body)
	}
}

// scrape returns the relay's metrics in the text format.
func scrape(t testing.TB, r *testRelay) string {
	t.Helper()
	admin := httptest.NewServer(r.AdminHandler(r.Reg))
	defer admin.Close()
	return get(t.(*testing.T), admin.URL+"/metrics", 200)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestOriginAllowList: a route with origins refuses a handshake from any other Origin (or none) with 403,
// before any upstream is dialed.
func TestOriginAllowList(t *testing.T) {
	up := startUpstream(t)
	acceptAll(t, up)
	pool := newPool(t, "p", []string{up.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{
			{prefix: "/app", pool: pool, origins: []string{"https://app.example.com"}},
			{prefix: "/", pool: pool},
		}, pools: []*upstream.Pool{pool}}
	})
	for _, tc := range []struct {
		path, origin string
		status       int
	}{
		{"/app", "https://app.example.com", http.StatusSwitchingProtocols},
		{"/app", "HTTPS://APP.example.com", http.StatusSwitchingProtocols},
		{"/app", "https://evil.example", http.StatusForbidden},
		{"/app", "", http.StatusForbidden},
		{"/other", "https://evil.example", http.StatusSwitchingProtocols},
	} {
		req := upgradeRequest(tc.path)
		if tc.origin != "" {
			req = strings.Replace(req, "\r\n\r\n", "\r\nOrigin: "+tc.origin+"\r\n\r\n", 1)
		}
		before := up.Accepted()
		c := dialRelay(t, r.Addr, req, nil)
		if c.Resp.StatusCode != tc.status {
			t.Errorf("%s from origin %q: status %d, want %d", tc.path, tc.origin, c.Resp.StatusCode, tc.status)
		}
		if tc.status == http.StatusForbidden && up.Accepted() != before {
			t.Errorf("%s from origin %q: refused, but the upstream was dialed", tc.path, tc.origin)
		}
		c.Close()
	}
	// Counted with the pool of the route that refused them.
	if n := metricSum(r.Reg, "sockrelay_handshakes_failed_total", map[string]string{"reason": FailOrigin, "pool": "p"}); n != 2 {
		t.Errorf("origin refusals of pool p counted %v times, want 2:\n%s", n, grepLines(scrape(t, r), "handshakes_failed"))
	}
}

// TestDotSegmentsRefused: "/ws/../admin", however encoded, never matches the route of "/ws": it is a 400
// before routing, for handshakes and plain requests, and reaches no upstream.
func TestDotSegmentsRefused(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	for _, path := range []string{"/ws/../admin", "/ws/%2e%2e/admin", "/ws/./x", "/..", "/ws/%2E%2E"} {
		c := dialRelay(t, r.Addr, upgradeRequest(path), nil)
		if c.Resp.StatusCode != http.StatusBadRequest {
			t.Errorf("handshake for %s: status %d, want 400", path, c.Resp.StatusCode)
		}
		c.Close()
		c = dialRelay(t, r.Addr, "GET "+path+" HTTP/1.1\r\nHost: relay.test\r\n\r\n", nil)
		if c.Resp.StatusCode != http.StatusBadRequest {
			t.Errorf("GET %s: status %d, want 400", path, c.Resp.StatusCode)
		}
		c.Close()
	}
	if n := up.Accepted(); n != 0 {
		t.Errorf("the upstream got %d connections", n)
	}
}
