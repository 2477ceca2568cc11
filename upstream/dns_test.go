package upstream

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeResolver answers from what the test set, and counts the questions.
type fakeResolver struct {
	mu    sync.Mutex
	ips   []net.IPAddr
	srv   []*net.SRV
	err   error
	asked []string
	// gate, when set, holds every A/AAAA answer until the test sends on it, after telling entered.
	gate, entered chan struct{}
}

func (r *fakeResolver) set(ips []string, srv []*net.SRV, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ips = nil
	for _, s := range ips {
		r.ips = append(r.ips, net.IPAddr{IP: net.ParseIP(s)})
	}
	r.srv, r.err = srv, err
}

func (r *fakeResolver) LookupIPAddr(_ context.Context, host string) ([]net.IPAddr, error) {
	if r.gate != nil {
		r.entered <- struct{}{}
		<-r.gate
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.asked = append(r.asked, "ip "+host)
	return slices.Clone(r.ips), r.err
}

func (r *fakeResolver) LookupSRV(_ context.Context, service, proto, name string) (string, []*net.SRV, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.asked = append(r.asked, "srv "+service+"|"+proto+"|"+name)
	out := make([]*net.SRV, len(r.srv))
	for i, s := range r.srv {
		c := *s
		out[i] = &c
	}
	return name, out, r.err
}

// dnsPool is a pool discovering its servers through r; removed collects what OnRemoved was given.
func dnsPool(t *testing.T, d DNSSpec, r *fakeResolver, removed *[]string) *Pool {
	return newTestPool(t, PoolSpec{Name: "chat", DNS: &d}, nil, func(o *Options) {
		o.Resolver = r
		o.OnRemoved = func(s []*Server) { *removed = append(*removed, addresses(s)...) }
	})
}

func serverAddrs(p *Pool) []string {
	var out []string
	for _, s := range p.Snapshot().Servers {
		out = append(out, s.Address)
	}
	return out
}

// TestDNSDiscovery: the pool's servers follow the A records, keeping the state of addresses that stay
// and reporting the ones that go; a failed resolution keeps the last set and shows the error.
func TestDNSDiscovery(t *testing.T) {
	r := &fakeResolver{}
	var removed []string
	p := dnsPool(t, DNSSpec{Name: "chat.internal", Type: DNSA, Port: 9000, MaxTunnels: 50}, r, &removed)

	_, err := p.Pick("", nil)
	if !errors.Is(err, ErrNoServer) || err.Error() != `pool "chat": no server available: the pool has no servers` {
		t.Fatalf("Pick before DNS answered: %v", err)
	}

	r.set([]string{"10.0.0.2", "10.0.0.1", "2001:db8::1"}, nil, nil)
	mustOK(t, p.refreshDNS(t.Context()))
	if got, want := serverAddrs(p), []string{"10.0.0.1:9000", "10.0.0.2:9000"}; !slices.Equal(got, want) {
		t.Fatalf("servers %v; want %v (A records only, sorted)", got, want)
	}
	if st := state(t, p, addrA); st.MaxTunnels != 50 || st.Weight != 1 {
		t.Errorf("discovered server %+v; want weight 1, max_tunnels 50", st)
	}
	b := server(t, p, addrB)
	lease, err := b.Acquire()
	mustOK(t, err)

	// 10.0.0.1 goes, 10.0.0.3 comes, 10.0.0.2 stays with its tunnel.
	r.set([]string{"10.0.0.3", "10.0.0.2"}, nil, nil)
	mustOK(t, p.refreshDNS(t.Context()))
	if got, want := serverAddrs(p), []string{"10.0.0.2:9000", "10.0.0.3:9000"}; !slices.Equal(got, want) {
		t.Fatalf("servers %v; want %v", got, want)
	}
	if !slices.Equal(removed, []string{addrA}) {
		t.Errorf("OnRemoved got %v; want [%s]", removed, addrA)
	}
	if server(t, p, addrB) != b || b.Live() != 1 {
		t.Errorf("the kept server lost its state: live %d", b.Live())
	}
	resolvedAt := p.Snapshot().DNS.ResolvedAt

	// A failure, then an empty answer: the servers stay, the error shows.
	for _, tc := range []struct {
		ips     []string
		err     error
		wantErr string
	}{
		{nil, errors.New("lookup chat.internal: i/o timeout"), "dns A chat.internal: lookup chat.internal: i/o timeout"},
		{nil, nil, "dns A chat.internal: no usable records"},
		{[]string{"2001:db8::1"}, nil, "dns A chat.internal: no usable records"},
	} {
		r.set(tc.ips, nil, tc.err)
		if err := p.refreshDNS(t.Context()); err == nil || err.Error() != tc.wantErr {
			t.Errorf("refresh: %v; want %s", err, tc.wantErr)
		}
		snap := p.Snapshot()
		if got := serverAddrs(p); !slices.Equal(got, []string{"10.0.0.2:9000", "10.0.0.3:9000"}) {
			t.Errorf("after %q the servers changed to %v", tc.wantErr, got)
		}
		if snap.DNS.Error != tc.wantErr || !snap.DNS.ResolvedAt.Equal(resolvedAt) {
			t.Errorf("snapshot dns %+v; want error %q and the last success's time", *snap.DNS, tc.wantErr)
		}
	}
	l := pick(t, p, "") // still serving from the last good set
	l.Release()

	r.set([]string{"10.0.0.2"}, nil, nil)
	mustOK(t, p.refreshDNS(t.Context()))
	if snap := p.Snapshot(); snap.DNS.Error != "" || len(snap.Servers) != 1 {
		t.Errorf("after recovery: %+v", snap)
	}
	lease.Release()
	if b.Live() != 0 {
		t.Errorf("live %d after release", b.Live())
	}
}

// TestDNSNoServersShowsError: a DNS pool that never resolved says why it has no servers.
func TestDNSNoServersShowsError(t *testing.T) {
	r := &fakeResolver{}
	r.set(nil, nil, errors.New("lookup chat.internal: no such host"))
	var removed []string
	p := dnsPool(t, DNSSpec{Name: "chat.internal", Type: DNSAAAA, Port: 443}, r, &removed)
	p.refreshDNS(t.Context())
	_, err := p.Pick("", nil)
	if want := `pool "chat": no server available: the pool has no servers (dns: dns AAAA chat.internal: lookup chat.internal: no such host)`; err == nil || err.Error() != want {
		t.Fatalf("Pick: %v\nwant %s", err, want)
	}
	r.set([]string{"10.0.0.1", "2001:db8::2", "2001:db8::1"}, nil, nil)
	mustOK(t, p.refreshDNS(t.Context()))
	if got, want := serverAddrs(p), []string{"[2001:db8::1]:443", "[2001:db8::2]:443"}; !slices.Equal(got, want) {
		t.Errorf("AAAA servers %v; want %v", got, want)
	}
}

// TestDNSSRV: SRV records give address, port and weight (at least 1, at most 1000); the lowest priority
// is the primaries, the others backups; a "." target is no server.
func TestDNSSRV(t *testing.T) {
	r := &fakeResolver{}
	r.set(nil, []*net.SRV{
		{Target: "b.chat.internal.", Port: 9001, Priority: 10, Weight: 0},
		{Target: "a.chat.internal.", Port: 9000, Priority: 10, Weight: 60},
		{Target: "c.chat.internal.", Port: 9000, Priority: 20, Weight: 5000},
		{Target: "a.chat.internal.", Port: 9000, Priority: 30, Weight: 1}, // the same target again, lower priority
		{Target: ".", Port: 0, Priority: 5},
	}, nil)
	var removed []string
	p := dnsPool(t, DNSSpec{Name: "_ws._tcp.chat.internal", Type: DNSSRV}, r, &removed)
	mustOK(t, p.refreshDNS(t.Context()))
	want := []ServerState{
		{Address: "a.chat.internal:9000", Weight: 60, EffectiveWeight: 60, State: StateUp},
		{Address: "b.chat.internal:9001", Weight: 1, EffectiveWeight: 1, State: StateUp},
		{Address: "c.chat.internal:9000", Weight: 1000, EffectiveWeight: 1000, State: StateUp, Backup: true},
	}
	if got := p.Snapshot().Servers; !slices.Equal(got, want) {
		t.Errorf("SRV servers:\n got %+v\nwant %+v", got, want)
	}
	if r.asked[0] != "srv ||_ws._tcp.chat.internal" {
		t.Errorf("asked %q; want the SRV name itself, no service or proto", r.asked[0])
	}
}

// TestDNSUpdateAndStart: Start resolves at once; a reload to static servers drops DNS and returns what
// it removed.
func TestDNSUpdateAndStart(t *testing.T) {
	r := &fakeResolver{}
	r.set([]string{"10.0.0.1", "10.0.0.2"}, nil, nil)
	var removed []string
	p := dnsPool(t, DNSSpec{Name: "chat.internal", Type: DNSA, Port: 9000, Interval: time.Hour}, r, &removed)
	mustOK(t, p.Start(t.Context()))
	deadline := time.Now().Add(30 * time.Second)
	for len(p.Snapshot().Servers) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := serverAddrs(p); len(got) != 2 {
		t.Fatalf("after Start: servers %v; want the 2 resolved", got)
	}
	lease := pick(t, p, "")
	defer lease.Release()

	gone, err := p.Update(PoolSpec{Name: "chat", Servers: []ServerSpec{{Address: addrB}}}.WithDefaults())
	mustOK(t, err)
	if len(gone) != 1 || gone[0].Address() != addrA {
		t.Errorf("Update removed %v; want [%s]", addresses(gone), addrA)
	}
	if snap := p.Snapshot(); snap.DNS != nil || len(snap.Servers) != 1 {
		t.Errorf("after the reload to static servers: %+v", snap)
	}
}

// TestDNSAnswerForOldNameDropped: an answer that arrives after a reload changed the name is not applied.
func TestDNSAnswerForOldNameDropped(t *testing.T) {
	r := &fakeResolver{gate: make(chan struct{}), entered: make(chan struct{})}
	r.set([]string{"10.0.0.1"}, nil, nil)
	var removed []string
	spec := DNSSpec{Name: "old.internal", Type: DNSA, Port: 9000}
	p := dnsPool(t, spec, r, &removed)
	done := make(chan error)
	go func() { done <- p.refreshDNS(context.Background()) }()
	<-r.entered // the resolution for old.internal is under way
	spec.Name = "new.internal"
	_, err := p.Update(PoolSpec{Name: "chat", DNS: &spec}.WithDefaults())
	mustOK(t, err)
	r.gate <- struct{}{}
	mustOK(t, <-done)
	if snap := p.Snapshot(); len(snap.Servers) != 0 || !snap.DNS.ResolvedAt.IsZero() || snap.DNS.Name != "new.internal" {
		t.Errorf("the old name's answer landed: %+v", snap)
	}
}
