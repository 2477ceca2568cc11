package relay

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sockrelay/sockrelay/upstream"
)

// serveNamedListener serves r's listener name on a new loopback address with datapath dp, until the test
// ends, and returns the address.
func serveNamedListener(t *testing.T, r *testRelay, name string, dp Datapath) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeListener(name, ln, dp)
	return ln.Addr().String()
}

// waitScrapeHas scrapes r until its metrics hold every line of want, or fails the test after 5 s. The
// listeners' series appear when their Serve goroutines have set them up.
func waitScrapeHas(t *testing.T, r *testRelay, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		m := scrape(t, r)
		var missing []string
		for _, w := range want {
			if !strings.Contains(m, w+"\n") {
				missing = append(missing, w)
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics lacks:\n%s\nit has:\n%s", strings.Join(missing, "\n"), grepLines(m, "sockrelay_"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCountersStartAtZero: before any event, every listener has its failure, tunnel and close counters
// at 0 for each pool (and its failures for no pool), so that an alert on their rate sees 0, not no data;
// a pool that a new Router brings gets them too.
func TestCountersStartAtZero(t *testing.T) {
	poolA, poolB := newPool(t, "a", []string{closedPort(t)}, nil), newPool(t, "b", []string{closedPort(t)}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{pools: []*upstream.Pool{poolA, poolB}}
	})
	serveNamedListener(t, r, "b", DatapathSplice)
	waitScrapeHas(t, r,
		`sockrelay_handshakes_failed_total{listener="default",pool="",reason="no_route"} 0`,
		`sockrelay_handshakes_failed_total{listener="default",pool="",reason="limit_handshake_rate"} 0`,
		`sockrelay_handshakes_failed_total{listener="b",pool="a",reason="upstream_unreachable"} 0`,
		`sockrelay_tunnels_total{datapath="copy",listener="default",pool="b"} 0`,
		`sockrelay_tunnels_total{datapath="splice",listener="b",pool="b"} 0`,
		`sockrelay_tunnels_total{datapath="copy",listener="b",pool="b"} 0`, // TLS tunnels run on copy
		`sockrelay_tunnels_closed_total{listener="default",pool="a",reason="closed"} 0`,
		`sockrelay_tunnels_closed_total{listener="b",pool="b",reason="idle_timeout"} 0`,
		`sockrelay_tunnels_active{datapath="sockmap"} 0`,
		`sockrelay_datapath_fallbacks_total{reason="sockmap_unavailable"} 0`,
	)
	m := scrape(t, r)
	if strings.Contains(m, `sockrelay_tunnels_total{datapath="copy",listener="default",pool=""}`) {
		t.Errorf("tunnels counted for no pool; every tunnel has one:\n%s", grepLines(m, "tunnels_total"))
	}
	if strings.Contains(m, `pool="a",reason="no_route"`) || strings.Contains(m, `pool="",reason="upstream_timeout"`) {
		t.Errorf("series for failures that cannot happen with (or without) a pool:\n%s", grepLines(m, "handshakes_failed"))
	}

	poolC := newPool(t, "c", []string{closedPort(t)}, nil)
	r.SetRouter(&pathRouter{pools: []*upstream.Pool{poolA, poolB, poolC}})
	waitScrapeHas(t, r,
		`sockrelay_handshakes_failed_total{listener="b",pool="c",reason="no_upstream"} 0`,
		`sockrelay_tunnels_closed_total{listener="default",pool="c",reason="closed"} 0`,
	)
}

// TestCountersByListenerAndPool: handshake failures, tunnels and their ends are counted by the listener
// the client came in on and the pool its route chose ("" for a failure before any route).
func TestCountersByListenerAndPool(t *testing.T) {
	up := startUpstream(t)
	poolA, poolB := newPool(t, "a", []string{closedPort(t)}, nil), newPool(t, "b", []string{up.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{listener: "b", prefix: "/", pool: poolB}, {prefix: "/a", pool: poolA}},
			pools: []*upstream.Pool{poolA, poolB}}
	})
	addrB := serveNamedListener(t, r, "b", DatapathSplice)

	c, u := openTunnel(t, addrB, up, nil, nil)
	c.Close()
	u.Close()
	waitTunnelsGone(t, r)
	for _, path := range []string{"/a", "/nowhere"} { // pool a's server refuses connections
		c := dialRelay(t, r.Addr, upgradeRequest(path), nil)
		c.Close()
	}
	waitScrapeHas(t, r,
		`sockrelay_tunnels_total{datapath="splice",listener="b",pool="b"} 1`,
		`sockrelay_handshakes_failed_total{listener="default",pool="a",reason="upstream_unreachable"} 1`,
		`sockrelay_handshakes_failed_total{listener="default",pool="",reason="no_route"} 1`,
	)
	ended := map[string]string{"listener": "b", "pool": "b"}
	if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", ended); n != 1 {
		t.Errorf("tunnels of listener b, pool b ended: %v, want 1:\n%s", n, grepLines(scrape(t, r), "closed_total"))
	}
}

// TestUpstreamUpIsStable: sockrelay_upstream_up has one series per server whose value changes with its
// state, not its labels; sockrelay_upstream_state gives the state, one 0/1 series per state; and a pool
// without an active health check says that its state is passive only, in the metrics and in /admin/pools.
func TestUpstreamUpIsStable(t *testing.T) {
	addr := closedPort(t)
	chat := newPool(t, "chat", []string{addr}, nil)
	watched := newPool(t, "watched", []string{closedPort(t)}, func(s *upstream.PoolSpec) {
		s.Active = &upstream.ActiveHealthSpec{Type: upstream.CheckTCP, Interval: time.Hour, Timeout: time.Second, Rise: 1, Fall: 1}
	})
	collector := &upstreamCollector{router: func() Router { return &pathRouter{pools: []*upstream.Pool{chat}} }}
	exposition := func(up int, state upstream.State) string {
		var b strings.Builder
		fmt.Fprintf(&b, "# HELP sockrelay_upstream_up %s\n# TYPE sockrelay_upstream_up gauge\n", upstreamUpHelp)
		fmt.Fprintf(&b, "sockrelay_upstream_up{pool=\"chat\",server=%q} %d\n", addr, up)
		fmt.Fprintf(&b, "# HELP sockrelay_upstream_state %s\n# TYPE sockrelay_upstream_state gauge\n", upstreamStateHelp)
		for _, s := range []upstream.State{upstream.StateDown, upstream.StateDraining, upstream.StateForcedDown, upstream.StateUp} {
			fmt.Fprintf(&b, "sockrelay_upstream_state{pool=\"chat\",server=%q,state=%q} %d\n", addr, s, int(oneIf(s == state)))
		}
		return b.String()
	}
	compare := func(up int, state upstream.State) {
		t.Helper()
		if err := testutil.CollectAndCompare(collector, strings.NewReader(exposition(up, state)),
			"sockrelay_upstream_up", "sockrelay_upstream_state"); err != nil {
			t.Errorf("server %s: %v", state, err)
		}
	}
	compare(1, upstream.StateUp)
	if err := chat.MarkDown(addr, true); err != nil {
		t.Fatal(err)
	}
	compare(0, upstream.StateForcedDown)

	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{pools: []*upstream.Pool{chat, watched}}
	})
	want := `# HELP sockrelay_upstream_health_checked ` + upstreamCheckedHelp + `
# TYPE sockrelay_upstream_health_checked gauge
sockrelay_upstream_health_checked{pool="chat"} 0
sockrelay_upstream_health_checked{pool="watched"} 1
`
	if err := testutil.GatherAndCompare(r.Reg, strings.NewReader(want), "sockrelay_upstream_health_checked"); err != nil {
		t.Error(err)
	}
	admin := httptest.NewServer(r.AdminHandler(r.Reg))
	defer admin.Close()
	var snaps []upstream.Snapshot
	if err := json.Unmarshal([]byte(get(t, admin.URL+"/admin/pools", 200)), &snaps); err != nil || len(snaps) != 2 ||
		snaps[0].Checked || !snaps[1].Checked {
		t.Errorf("/admin/pools = %+v, %v; want chat checked: false, watched checked: true", snaps, err)
	}
}
