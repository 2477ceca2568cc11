package main

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/upstream"
)

func parseConfig(t *testing.T, text string) *config.Config {
	t.Helper()
	cfg, err := config.Parse("review.yaml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestPoolSpecDNSMaxTunnels: dns.max_tunnels in the file must reach the pool; poolSpec drops it,
// so every DNS-discovered server runs without a cap.
func TestPoolSpecDNSMaxTunnels(t *testing.T) {
	cfg := parseConfig(t, `
listeners:
  - address: 127.0.0.1:0
    routes: [{pool: d}]
pools:
  d:
    dns: {name: chat.internal, type: A, port: 9000, max_tunnels: 5}
`)
	if got := cfg.Pools[0].DNS.MaxTunnels; got != 5 {
		t.Fatalf("config parsed dns.max_tunnels as %d, want 5", got)
	}
	if spec := poolSpec(cfg.Pools[0]); spec.DNS.MaxTunnels != 5 {
		t.Errorf("poolSpec: DNS.MaxTunnels = %d, want 5 (dns.max_tunnels is dropped)", spec.DNS.MaxTunnels)
	}
}

// TestRouteDotDot: a route for /ws must not carry /ws/../admin (or its percent-encoded form) to
// its pool: the upstream, or anything behind it, resolves that to /admin, which no route exposes.
// nginx and HAProxy normalize (or reject) such a path before matching.

// stepResolver answers its first lookup with two addresses and every later one, once released, with
// one: a DNS refresh that removes a server.
type stepResolver struct {
	mu      sync.Mutex
	calls   int
	release chan struct{}
}

func (r *stepResolver) LookupIPAddr(ctx context.Context, host string) ([]net.IPAddr, error) {
	r.mu.Lock()
	r.calls++
	n := r.calls
	r.mu.Unlock()
	if n == 1 {
		return []net.IPAddr{{IP: net.ParseIP("127.0.0.1")}, {IP: net.ParseIP("127.0.0.2")}}, nil
	}
	select {
	case <-r.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return []net.IPAddr{{IP: net.ParseIP("127.0.0.1")}}, nil
}

func (r *stepResolver) LookupSRV(context.Context, string, string, string) (string, []*net.SRV, error) {
	return "", nil, nil
}

// TestReloadRacesDNSRemoval: a reload that removes a DNS pool while that pool's DNS refresh is
// handing removed servers to pools.onRemoved deadlocks: apply holds ps.mu and waits in Pool.Close for
// the DNS goroutine, which waits for ps.mu in onRemoved. closeAll (at exit) has the same shape.
func TestReloadRacesDNSRemoval(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ps := newPools(ctx, slog.New(slog.DiscardHandler))
	res := &stepResolver{release: make(chan struct{})}
	spec := upstream.PoolSpec{Name: "d", DNS: &upstream.DNSSpec{Name: "d.internal", Type: upstream.DNSA, Port: 9000,
		Interval: time.Second}}.WithDefaults()
	p, err := upstream.New(spec, upstream.Options{Resolver: res, OnRemoved: ps.onRemoved("d")})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	ps.mu.Lock()
	ps.running["d"] = p
	ps.closeOnRemoval["d"] = true
	ps.mu.Unlock()
	waitFor(t, "the first resolution", func() bool { return len(p.Servers()) == 2 })

	// A reload that drops pool d is under way (it holds ps.mu, as apply does while it updates pools)...
	cfg := parseConfig(t, `
listeners:
  - address: 127.0.0.1:0
    routes: [{pool: s}]
pools:
  s:
    servers: [127.0.0.1:9]
`)
	ps.mu.Lock()
	applied := make(chan error, 1)
	go func() {
		_, err := ps.apply(cfg)
		applied <- err
	}()
	time.Sleep(100 * time.Millisecond) // apply waits for ps.mu
	// ...when pool d's DNS refresh removes a server and calls onRemoved, which waits for ps.mu too.
	close(res.release)
	waitFor(t, "the second resolution", func() bool { return len(p.Servers()) == 1 })
	time.Sleep(100 * time.Millisecond)
	ps.mu.Unlock()

	select {
	case err := <-applied:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		buf := make([]byte, 1<<20)
		t.Log(string(buf[:runtime.Stack(buf, true)]))
		t.Fatal("apply did not return within 5s: deadlock between Pool.Close (under ps.mu) and onRemoved (taking ps.mu)")
	}
}

// TestReloadRemovingHealthCheckFreesDownServers: a health check marks a server down; a reload that
// removes the check (the operator's fix for a check that was wrong) must not leave the server down for
// ever. Update keeps activeDown, and with no check running nothing ever clears it: the pool answers 503
// until a restart.
func TestReloadRemovingHealthCheckFreesDownServers(t *testing.T) {
	down := closedAddr(t)
	withCheck := `
listeners:
  - address: 127.0.0.1:0
    routes: [{pool: p}]
pools:
  p:
    health_check: {type: tcp, interval: 100ms, timeout: 50ms, fall: 1}
    servers: [` + down + `]
`
	withoutCheck := strings.Replace(withCheck, "    health_check: {type: tcp, interval: 100ms, timeout: 50ms, fall: 1}\n", "", 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ps := newPools(ctx, slog.New(slog.DiscardHandler))
	defer ps.closeAll()
	rt, err := ps.apply(parseConfig(t, withCheck))
	if err != nil {
		t.Fatal(err)
	}
	pool := rt.Pools()[0]
	waitFor(t, "the check to take the server down", func() bool {
		return pool.Snapshot().Servers[0].State == upstream.StateDown
	})
	if _, err := ps.apply(parseConfig(t, withoutCheck)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if st := pool.Snapshot().Servers[0]; st.State != upstream.StateUp {
		t.Errorf("after a reload without health_check the server is %s (last check %v ago); want up: nothing will ever check it again",
			st.State, time.Since(st.LastCheck).Round(time.Millisecond))
	}
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestDatapathOverriddenByFlag: with --datapath given, the file's datapaths are not in force, yet a
// reload whose only change is the file's top-level datapath (which every listener without its own
// inherits) is refused whole, as a listener change: its routes and pools are not applied.
func TestDatapathOverriddenByFlag(t *testing.T) {
	file := func(dp string) string {
		return `
datapath: ` + dp + `
listeners:
  - address: 127.0.0.1:8080
    routes: [{pool: p}]
pools:
  p:
    servers: [127.0.0.1:9000]
`
	}
	if why := listenerChange(parseConfig(t, file("auto")), parseConfig(t, file("copy"))); why != "" {
		t.Errorf("a change of the top-level datapath refuses the reload: %s; want it applied, with the "+
			"restart-only warning restartOnly already has for datapath (and none when --datapath overrides it)", why)
	}
}

// TestReloadKeepsEventLoops: a reload that changes event_loops is applied but for it, and the warning names
// it: the loops, and the tunnels on them, stay as they started.
func TestReloadKeepsEventLoops(t *testing.T) {
	file := func(loops string) string {
		return "event_loops: " + loops + "\nlisteners: [{address: 127.0.0.1:8080, routes: [{pool: p}]}]\n" +
			"pools: {p: {servers: [127.0.0.1:9000]}}\n"
	}
	if got := restartOnly(parseConfig(t, file("0")), parseConfig(t, file("2"))); !slices.Equal(got, []string{"event_loops"}) {
		t.Errorf("restart-only settings changed from event_loops 0 to 2: %q, want [event_loops]", got)
	}
	if got := restartOnly(parseConfig(t, file("2")), parseConfig(t, file("2"))); len(got) != 0 {
		t.Errorf("restart-only settings changed with event_loops unchanged: %q, want none", got)
	}
}

// TestCheckAgreesWithRun: `sockrelay check` says it validates a file "as run and a reload would";
// a listener on sockmap under a top-level splice datapath passes check, and run refuses it at start on
// every host (only a relay whose own datapath is sockmap or auto loads the kernel datapath).
func TestCheckAgreesWithRun(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	writeFile(t, path, `
admin: ""
datapath: splice
listeners:
  - address: 127.0.0.1:0
    datapath: sockmap
    routes: [{pool: p}]
pools:
  p:
    servers: [127.0.0.1:9]
`)
	var stdout, stderr bytes.Buffer
	checked := dispatch(context.Background(), []string{"check", "--config", path}, &stdout, &stderr)
	ran := runCommand(context.Background(), []string{"--config", path}, &stderr, nil)
	if checked == 0 && ran != 0 {
		t.Errorf("check exits 0 (%s), run exits %d:\n%s", strings.TrimSpace(stdout.String()), ran, stderr.String())
	}
}
