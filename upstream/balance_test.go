package upstream

import (
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestWeightsRespected: weights 1:2:3 over 60 000 picks give each server its share within ±2 points
// under every algorithm; smooth round-robin gives it exactly. least_tunnels and random_two balance live
// tunnels, so there every lease is held; hash spreads distinct keys, so there every pick has its own key.
func TestWeightsRespected(t *testing.T) {
	const picks = 60_000
	weights := []int{1, 2, 3}
	for _, tc := range []struct {
		balance Algorithm
		hold    bool
		exact   bool
	}{
		{RoundRobin, false, true},
		{LeastTunnels, true, false},
		{RandomTwo, true, false},
		{Hash, false, false},
	} {
		t.Run(string(tc.balance), func(t *testing.T) {
			p := newTestPool(t, PoolSpec{Balance: tc.balance, Hash: HashSpec{By: HashClientIP},
				Servers: servers(3, weights...)}, nil)
			count := map[string]int{}
			for i := range picks {
				l := pick(t, p, fmt.Sprintf("client-%d", i))
				count[l.Server.Address()]++
				if !tc.hold {
					l.Release()
				}
			}
			t.Logf("picks: %v", count)
			for i, w := range weights {
				addr := fmt.Sprintf("10.0.0.%d:9000", i+1)
				want := float64(w) / 6
				got := float64(count[addr]) / picks
				if tc.exact && count[addr] != picks*w/6 {
					t.Errorf("%s (weight %d): %d picks; want exactly %d", addr, w, count[addr], picks*w/6)
				}
				if math.Abs(got-want) > 0.02 {
					t.Errorf("%s (weight %d): share %.4f; want %.4f ± 0.02", addr, w, got, want)
				}
			}
		})
	}
}

// TestSmoothRoundRobinCycle: weights 5:1:1 give nginx's interleaved cycle a a b a c a a, every cycle.
func TestSmoothRoundRobinCycle(t *testing.T) {
	p := newTestPool(t, PoolSpec{Servers: servers(3, 5, 1, 1)}, nil)
	name := map[string]string{"10.0.0.1:9000": "a", "10.0.0.2:9000": "b", "10.0.0.3:9000": "c"}
	var got strings.Builder
	for range 3 * 7 {
		l := pick(t, p, "")
		got.WriteString(name[l.Server.Address()])
		l.Release()
	}
	if want := strings.Repeat("aabacaa", 3); got.String() != want {
		t.Errorf("sequence %s; want %s", got.String(), want)
	}
}

// TestLeastTunnelsPicksFewest: with tunnels held, the next pick goes to the server with the fewest live
// tunnels per unit of weight.
func TestLeastTunnelsPicksFewest(t *testing.T) {
	for _, tc := range []struct {
		name    string
		weights []int
		loads   []int
		want    int
	}{
		{"fewest of three", []int{1, 1, 1}, []int{3, 1, 2}, 1},
		{"idle one", []int{1, 1, 1}, []int{5, 5, 0}, 2},
		{"per unit of weight", []int{1, 3}, []int{1, 2}, 1},   // (1+1)/1 = 2 against (2+1)/3 = 1
		{"light despite weight", []int{1, 3}, []int{0, 5}, 0}, // 1/1 against 6/3
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newTestPool(t, PoolSpec{Balance: LeastTunnels, Servers: servers(len(tc.weights), tc.weights...)}, nil)
			for i, n := range tc.loads {
				s := server(t, p, fmt.Sprintf("10.0.0.%d:9000", i+1))
				for range n {
					if _, err := s.Acquire(); err != nil {
						t.Fatal(err)
					}
				}
			}
			want := fmt.Sprintf("10.0.0.%d:9000", tc.want+1)
			for range 20 {
				l := pick(t, p, "")
				if l.Server.Address() != want {
					t.Fatalf("picked %s; want %s", l.Server.Address(), want)
				}
				l.Release()
			}
		})
	}
}

// TestLeastTunnelsTiesSpread: equal loads are not all sent to the first server.
func TestLeastTunnelsTiesSpread(t *testing.T) {
	p := newTestPool(t, PoolSpec{Balance: LeastTunnels, Servers: servers(3)}, nil)
	seen := map[string]int{}
	for range 300 {
		l := pick(t, p, "")
		seen[l.Server.Address()]++
		l.Release()
	}
	for _, s := range servers(3) {
		if seen[s.Address] < 60 {
			t.Errorf("%s got %d of 300 tied picks; want about 100", s.Address, seen[s.Address])
		}
	}
}

// TestRandomTwoAvoidsMostLoaded: two distinct samples mean the most loaded of three is never chosen.
func TestRandomTwoAvoidsMostLoaded(t *testing.T) {
	p := newTestPool(t, PoolSpec{Balance: RandomTwo, Servers: servers(3)}, nil)
	for i, n := range []int{0, 10, 100} {
		s := server(t, p, fmt.Sprintf("10.0.0.%d:9000", i+1))
		for range n {
			if _, err := s.Acquire(); err != nil {
				t.Fatal(err)
			}
		}
	}
	seen := map[string]int{}
	for range 3000 {
		l := pick(t, p, "")
		seen[l.Server.Address()]++
		l.Release()
	}
	if n := seen["10.0.0.3:9000"]; n != 0 {
		t.Errorf("the most loaded server was picked %d times of 3000", n)
	}
	// The least loaded wins every pair it is in: 2 of the 3 pairs.
	if n := seen["10.0.0.1:9000"]; n < 1800 || n > 2200 {
		t.Errorf("the least loaded server was picked %d times of 3000; want about 2000", n)
	}
}

// hashPool is a hash pool over n equal servers, keyed by a header.
func hashPool(t *testing.T, n int) *Pool {
	return newTestPool(t, PoolSpec{Balance: Hash, Hash: HashSpec{By: HashHeader, Name: "X-User"}, Servers: servers(n)}, nil)
}

// assign maps each key to the server it is picked for, releasing at once (no load).
func assign(t *testing.T, p *Pool, keys int) map[string]string {
	out := make(map[string]string, keys)
	for i := range keys {
		k := fmt.Sprintf("user-%d", i)
		l := pick(t, p, k)
		out[k] = l.Server.Address()
		l.Release()
	}
	return out
}

// TestHashStable: a key goes to the same server on every pick, and in another pool (another relay
// process) over the same servers.
func TestHashStable(t *testing.T) {
	first := assign(t, hashPool(t, 4), 2000)
	p := hashPool(t, 4)
	for range 3 {
		for k, addr := range assign(t, p, 2000) {
			if first[k] != addr {
				t.Fatalf("key %s went to %s, earlier to %s", k, addr, first[k])
			}
		}
	}
}

// TestHashAddServerMovesAFifth: adding a fifth server to four moves about 1/5 of the keys, all of them
// to the new server.
func TestHashAddServerMovesAFifth(t *testing.T) {
	const keys = 10_000
	before := assign(t, hashPool(t, 4), keys)
	after := assign(t, hashPool(t, 5), keys)
	moved := 0
	for k, addr := range after {
		if addr != before[k] {
			moved++
			if addr != "10.0.0.5:9000" {
				t.Fatalf("key %s moved from %s to %s, not to the new server", k, before[k], addr)
			}
		}
	}
	frac := float64(moved) / keys
	t.Logf("%.1f%% of keys moved", 100*frac)
	if frac < 0.10 || frac > 0.30 {
		t.Errorf("%.1f%% of keys moved; want about 20%% (10%% to 30%%)", 100*frac)
	}
}

// TestHashBoundedLoad: with 70% of tunnels on one hot key and every tunnel held, no server passes
// ceil(loadFactor × average) + 1 live tunnels; the hot key spills over instead of loading one server.
func TestHashBoundedLoad(t *testing.T) {
	const tunnels, n, loadFactor = 10_000, 4, 1.25
	p := hashPool(t, n)
	for i := range tunnels {
		key := "hot"
		if i%10 >= 7 {
			key = fmt.Sprintf("user-%d", i)
		}
		pick(t, p, key) // held
	}
	limit := int64(math.Ceil(loadFactor*tunnels/n)) + 1
	for _, s := range p.Snapshot().Servers {
		t.Logf("%s: %d live", s.Address, s.LiveTunnels)
		if s.LiveTunnels > limit {
			t.Errorf("%s has %d live tunnels; bound %d", s.Address, s.LiveTunnels, limit)
		}
	}
}

// TestHashEmptyKeyRoundRobin: a request without the key is spread round-robin, not sent to one server.
func TestHashEmptyKeyRoundRobin(t *testing.T) {
	p := hashPool(t, 3)
	seen := map[string]int{}
	for range 30 {
		l := pick(t, p, "")
		seen[l.Server.Address()]++
		l.Release()
	}
	for _, s := range servers(3) {
		if seen[s.Address] != 10 {
			t.Errorf("%s: %d of 30 keyless picks; want 10", s.Address, seen[s.Address])
		}
	}
}

func TestHashSpecKey(t *testing.T) {
	r := httptest.NewRequest(http.MethodGet, "/room/42?x=1", nil)
	r.Header.Set("X-User", "alice")
	r.AddCookie(&http.Cookie{Name: "sid", Value: "s3cr3t"})
	for _, tc := range []struct {
		spec     HashSpec
		clientIP string
		want     string
	}{
		{HashSpec{By: HashClientIP}, "192.0.2.7:51234", "192.0.2.7"},
		{HashSpec{By: HashClientIP}, "[2001:db8::1]:443", "2001:db8::1"},
		{HashSpec{By: HashClientIP}, "192.0.2.7", "192.0.2.7"},
		{HashSpec{By: HashHeader, Name: "x-user"}, "", "alice"},
		{HashSpec{By: HashHeader, Name: "X-Missing"}, "", ""},
		{HashSpec{By: HashCookie, Name: "sid"}, "", "s3cr3t"},
		{HashSpec{By: HashCookie, Name: "other"}, "", ""},
		{HashSpec{By: HashPath}, "", "/room/42"},
	} {
		if got := tc.spec.Key(tc.clientIP, r); got != tc.want {
			t.Errorf("%+v.Key(%q): %q; want %q", tc.spec, tc.clientIP, got, tc.want)
		}
	}
}
