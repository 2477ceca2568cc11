package upstream

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// TestUpdateKeepsState: a reload keeps the live tunnels, health and identity of the servers it keeps,
// applies their new settings, adds new ones, and returns the removed ones, whose leases still release.
func TestUpdateKeepsState(t *testing.T) {
	clock := newFakeClock()
	spec := PoolSpec{Name: "chat", Servers: servers(3), Passive: DefaultPassiveHealth()}
	p := newTestPool(t, spec, clock)
	a, b, c := server(t, p, addrA), server(t, p, addrB), server(t, p, addrC)
	onA, err := a.Acquire()
	mustOK(t, err)
	onB, err := b.Acquire()
	mustOK(t, err)
	for range 3 {
		p.ReportFailure(b) // b down for 30s
	}
	mustOK(t, p.MarkDown(addrC, true))
	mustOK(t, p.SetWeight(addrC, 7))

	next := spec
	next.Servers = []ServerSpec{
		{Address: addrB, Weight: 5, MaxTunnels: 9},
		{Address: addrC, Weight: 2},
		{Address: "10.0.0.4:9000", Weight: 1},
	}
	removed, err := p.Update(next.WithDefaults())
	mustOK(t, err)
	if len(removed) != 1 || removed[0] != a {
		t.Fatalf("removed %v; want just %s", addresses(removed), addrA)
	}
	if server(t, p, addrB) != b || server(t, p, addrC) != c {
		t.Fatal("a kept address got a new *Server")
	}
	want := []ServerState{
		{Address: addrB, Weight: 5, State: StateDown, MaxTunnels: 9, LiveTunnels: 1, TotalTunnels: 1, Failures: 3},
		{Address: addrC, Weight: 2, State: StateForcedDown},
		{Address: "10.0.0.4:9000", Weight: 1, EffectiveWeight: 1, State: StateUp},
	}
	got := p.Snapshot().Servers
	for i := range got {
		got[i].DownUntil = time.Time{}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("after Update:\n got %+v\nwant %+v", got, want)
	}
	for range 20 {
		l := pick(t, p, "")
		if l.Server != server(t, p, "10.0.0.4:9000") {
			t.Fatalf("picked %s; only the new server is usable", l.Server.Address())
		}
		l.Release()
	}
	onA.Release()
	onB.Release()
	if a.Live() != 0 || b.Live() != 0 {
		t.Errorf("after release: removed server %d live, kept server %d live; want 0 and 0", a.Live(), b.Live())
	}

	// An invalid spec changes nothing.
	bad := next.WithDefaults()
	bad.Servers = nil
	if _, err := p.Update(bad); err == nil || err.Error() != `pool "chat": update: servers: empty; give at least one server, or dns to discover them` {
		t.Fatalf("Update with no servers: %v", err)
	}
	if n := len(p.Snapshot().Servers); n != 3 {
		t.Errorf("after a refused Update: %d servers; want 3", n)
	}
}

// TestUpdateBringsActiveChecks: a reload that adds active checks to a started pool starts them, without
// a new Start.
func TestUpdateBringsActiveChecks(t *testing.T) {
	addr := closedAddr(t)
	spec := PoolSpec{Name: "p", Servers: []ServerSpec{{Address: addr}}}.WithDefaults()
	p, err := New(spec, Options{})
	mustOK(t, err)
	t.Cleanup(func() { p.Close() })
	mustOK(t, p.Start(t.Context()))
	spec.Active = &ActiveHealthSpec{Type: CheckTCP, Interval: time.Hour, Timeout: time.Second, Rise: 1, Fall: 1}
	_, err = p.Update(spec)
	mustOK(t, err)
	// The first round runs at once (the interval is an hour); wait for it without timing it.
	deadline := time.Now().Add(30 * time.Second)
	for state(t, p, addr).State != StateDown && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if st := state(t, p, addr); st.State != StateDown || !strings.Contains(st.LastCheckError, "refused") {
		t.Fatalf("after Update added checks: %+v; want down", st)
	}
}

// TestUpdateChangesAlgorithm: a reload may switch the algorithm; the new one applies at once.
func TestUpdateChangesAlgorithm(t *testing.T) {
	spec := PoolSpec{Servers: servers(2, 1, 3)}
	p := newTestPool(t, spec, nil)
	spec.Name, spec.Balance = "test", LeastTunnels
	_, err := p.Update(spec.WithDefaults())
	mustOK(t, err)
	// least_tunnels with nothing live prefers the heavier server, every time.
	for range 10 {
		l := pick(t, p, "")
		if l.Server.Address() != addrB {
			t.Fatalf("picked %s; least_tunnels wants %s", l.Server.Address(), addrB)
		}
		l.Release()
	}
	if got := p.Snapshot().Balance; got != LeastTunnels {
		t.Errorf("snapshot balance %q", got)
	}
}
