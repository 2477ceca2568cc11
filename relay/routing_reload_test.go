package relay

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// TestShutdownStopsEveryListener: once Shutdown has begun, no listener accepts new clients. With
// a handshake in flight on the first listener, Shutdown waits in that listener's http.Server.Shutdown
// before it even closes the second one, which meanwhile keeps serving new clients (and opening tunnels)
// for as long as the drain lasts.
func TestShutdownStopsEveryListener(t *testing.T) {
	up := startUpstream(t)
	pool := newPool(t, "p", []string{up.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/ws", pool: pool}}, pools: []*upstream.Pool{pool}}
		c.UpstreamResponseTimeout = 5 * time.Second
	})
	// The default listener serves (so it is first in the server's list) before the second starts.
	if c := dialRelay(t, r.Addr, upgradeRequest("/none"), nil); c.Resp.StatusCode != http.StatusNotFound {
		t.Fatalf("status %d, want 404", c.Resp.StatusCode)
	}
	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeListener("second", ln2, DatapathAuto)
	if c := dialRelay(t, ln2.Addr().String(), upgradeRequest("/none"), nil); c.Resp.StatusCode != http.StatusNotFound {
		t.Fatalf("second listener: status %d, want 404", c.Resp.StatusCode)
	}

	// A handshake in flight on the first listener: the upstream holds its answer.
	c1, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	c1.Write([]byte(upgradeRequest("/ws")))
	held := up.next(t)
	defer held.Close()

	shutdownDone := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		r.Shutdown(ctx)
		close(shutdownDone)
	}()
	time.Sleep(200 * time.Millisecond)

	c2, err := net.DialTimeout("tcp", ln2.Addr().String(), time.Second)
	if err != nil {
		return // refused: the second listener is closed, as it should be
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(time.Second))
	c2.Write([]byte("GET /none HTTP/1.1\r\nHost: x\r\n\r\n"))
	resp, err := http.ReadResponse(bufio.NewReader(c2), nil)
	if err == nil {
		resp.Body.Close()
		t.Errorf("200 ms into Shutdown the second listener still serves new clients (status %d); "+
			"it is closed only once the first listener's handshakes are done", resp.StatusCode)
	}
	select {
	case <-shutdownDone:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return")
	}
}

// TestRemovedServerRace: a handshake that picked a server before a reload removed it (from a pool
// with close_tunnels_on_removal) registers its tunnel after CloseTunnelsTo ran, and the tunnel then
// lives on against the removed server: CloseTunnelsTo sees only registered tunnels.
func TestRemovedServerRace(t *testing.T) {
	up, other := startUpstream(t), startUpstream(t)
	acceptAll(t, other)
	spec := upstream.PoolSpec{Name: "p", Balance: upstream.RoundRobin,
		Servers: []upstream.ServerSpec{{Address: up.Addr}}}.WithDefaults()
	pool := newPool(t, "p", []string{up.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	c, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(upgradeRequest("/")))
	held := up.next(t) // the handshake holds a lease on up and waits for its answer

	// The reload: up leaves the pool, and its tunnels are closed (close_tunnels_on_removal).
	spec.Servers = []upstream.ServerSpec{{Address: other.Addr, Weight: 1}}
	removed, err := pool.Update(spec)
	if err != nil || len(removed) != 1 {
		t.Fatalf("Update: %v, %v", removed, err)
	}
	if n := r.CloseTunnelsTo(removed); n != 0 {
		t.Fatalf("CloseTunnelsTo closed %d tunnels, want 0 (none registered yet)", n)
	}

	// Now the removed server answers, and the relay opens the tunnel.
	held.Write([]byte(switchResponse(held.Req)))
	defer held.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		time.Sleep(200 * time.Millisecond)
		for _, tn := range r.Tunnels().Tunnels() {
			if tn.lease != nil && tn.lease.Server == removed[0] {
				t.Errorf("tunnel %d to %s, a server removed with close_tunnels_on_removal before its handshake "+
					"ended, is live after the reload closed that server's tunnels", tn.ID, tn.UpstreamAddr)
			}
		}
	}
}

// TestRetriesCountedOnlyWhenSent: sockrelay_upstream_retries_total counts "handshakes sent to
// another server after one failed". A pool with one server that refuses has no other server to send
// to, so nothing was retried, yet the counter (and the "trying another" log line) go up.
func TestRetriesCountedOnlyWhenSent(t *testing.T) {
	pool := newPool(t, "p", []string{closedPort(t)}, func(s *upstream.PoolSpec) {
		s.Retry.Tries = 3
		s.Passive.Failures = 0
	})
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", c.Resp.StatusCode)
	}
	if m := scrape(t, r); !strings.Contains(m, "sockrelay_upstream_retries_total 0") {
		t.Errorf("one server, one connect, no retry possible; yet:\n%s", grepLines(m, "retries_total"))
	}
	if strings.Contains(r.Log.String(), "trying another") {
		t.Errorf("logged %q with no other server to try", "upstream failed, trying another")
	}
}

// TestReaddedServerKeepsItsTunnels: a reload (or a DNS refresh that drops an address for one
// interval) removes a server without closing its tunnels, and the next one adds it back. The server's
// tunnels are still up, but the pool now counts 0 for it: a new *Server was made, so max_tunnels and
// least_tunnels ignore every tunnel it already carries.
func TestReaddedServerKeepsItsTunnels(t *testing.T) {
	up, other := startUpstream(t), startUpstream(t)
	spec := upstream.PoolSpec{Name: "p", Balance: upstream.LeastTunnels,
		Servers: []upstream.ServerSpec{{Address: up.Addr, MaxTunnels: 1}}}.WithDefaults()
	pool := newPool(t, "p", nil, func(s *upstream.PoolSpec) { *s = spec })
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	openTunnel(t, r.Addr, up, nil, nil)

	without := spec
	without.Servers = []upstream.ServerSpec{{Address: other.Addr, Weight: 1}}
	if _, err := pool.Update(without); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Update(spec); err != nil {
		t.Fatal(err)
	}
	if r.Tunnels().Len() != 1 {
		t.Fatalf("%d tunnels, want the one still open", r.Tunnels().Len())
	}
	if st := serverState(t, pool, up.Addr); st.LiveTunnels != 1 {
		t.Errorf("server back in the pool with its tunnel still open: live_tunnels %d, want 1 (max_tunnels 1 is "+
			"now exceeded by the next tunnel)", st.LiveTunnels)
	}
}

// fixedResolver answers every A lookup with the same addresses.
type fixedResolver struct{ ips []string }

func (f fixedResolver) LookupIPAddr(context.Context, string) ([]net.IPAddr, error) {
	var out []net.IPAddr
	for _, ip := range f.ips {
		out = append(out, net.IPAddr{IP: net.ParseIP(ip)})
	}
	return out, nil
}

func (fixedResolver) LookupSRV(context.Context, string, string, string) (string, []*net.SRV, error) {
	return "", nil, errors.New("no SRV")
}

// TestAdminDrainSurvivesDNSRefresh: POST /admin/pools/{pool}/servers/{server} drain=true on a
// DNS-discovered server answers 200 "draining", and the pool's next DNS refresh (every dns.interval,
// 10s by default) silently sets drain back to false: the server takes new tunnels again.
func TestAdminDrainSurvivesDNSRefresh(t *testing.T) {
	spec := upstream.PoolSpec{Name: "d", DNS: &upstream.DNSSpec{Name: "d.internal", Type: upstream.DNSA, Port: 9000,
		Interval: time.Second}}.WithDefaults()
	pool, err := upstream.New(spec, upstream.Options{Resolver: fixedResolver{[]string{"127.0.0.1", "127.0.0.2"}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := pool.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	admin := httptestServer(t, r)
	deadline := time.Now().Add(5 * time.Second)
	for len(pool.Servers()) != 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	resp, err := http.Post(admin+"/admin/pools/d/servers/127.0.0.2:9000?drain=true", "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("drain: %v %v", resp, err)
	}
	resp.Body.Close()
	time.Sleep(2500 * time.Millisecond) // two DNS refreshes
	if st := serverState(t, pool, "127.0.0.2:9000"); st.State != upstream.StateDraining {
		t.Errorf("server drained through the admin API is %s after a DNS refresh that changed nothing; want draining", st.State)
	}
}

func httptestServer(t *testing.T, r *testRelay) string {
	s := httptest.NewServer(r.AdminHandler(r.Reg))
	t.Cleanup(s.Close)
	return s.URL
}
