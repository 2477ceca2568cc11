package upstream

import (
	"encoding/json"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

const (
	addrA = "10.0.0.1:9000"
	addrB = "10.0.0.2:9000"
	addrC = "10.0.0.3:9000"
)

// backupSpec is two primaries, A and B, and one backup, C.
func backupSpec(balance Algorithm) PoolSpec {
	s := servers(3)
	s[2].Backup = true
	return PoolSpec{Name: "chat", Balance: balance, Hash: HashSpec{By: HashPath}, Servers: s}
}

// TestBackupOnlyWhenNoPrimary: under every algorithm, the backup takes tunnels only when no primary is
// usable, whatever made them unusable.
func TestBackupOnlyWhenNoPrimary(t *testing.T) {
	cases := []struct {
		name        string
		setup       func(t *testing.T, p *Pool) (exclude []*Server)
		wantBackup  bool
		wantPrimary string // the only primary left, if any
	}{
		{"primaries up", func(*testing.T, *Pool) []*Server { return nil }, false, ""},
		{"one primary forced down", func(t *testing.T, p *Pool) []*Server {
			mustOK(t, p.MarkDown(addrA, true))
			return nil
		}, false, addrB},
		{"both forced down", func(t *testing.T, p *Pool) []*Server {
			mustOK(t, p.MarkDown(addrA, true))
			mustOK(t, p.MarkDown(addrB, true))
			return nil
		}, true, ""},
		{"both excluded by a retry", func(t *testing.T, p *Pool) []*Server {
			return []*Server{server(t, p, addrA), server(t, p, addrB)}
		}, true, ""},
		{"one draining, one at max_tunnels", func(t *testing.T, p *Pool) []*Server {
			mustOK(t, p.SetDrain(addrA, true))
			b := server(t, p, addrB)
			b.maxTunnels.Store(1)
			if _, err := b.Acquire(); err != nil {
				t.Fatal(err)
			}
			return nil
		}, true, ""},
	}
	for _, balance := range algorithms {
		for _, tc := range cases {
			t.Run(string(balance)+"/"+tc.name, func(t *testing.T) {
				p := newTestPool(t, backupSpec(balance), nil)
				exclude := tc.setup(t, p)
				for i := range 50 {
					l := pick(t, p, strings.Repeat("/k", i), exclude...)
					got := l.Server.Address()
					l.Release()
					switch {
					case tc.wantBackup && got != addrC:
						t.Fatalf("picked %s; want the backup %s", got, addrC)
					case !tc.wantBackup && got == addrC:
						t.Fatalf("picked the backup while a primary is usable")
					case tc.wantPrimary != "" && got != tc.wantPrimary:
						t.Fatalf("picked %s; want %s", got, tc.wantPrimary)
					}
				}
			})
		}
	}
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestNoServerError: when nothing is usable Pick says why, counting each server once, and the error
// matches ErrNoServer.
func TestNoServerError(t *testing.T) {
	p := newTestPool(t, PoolSpec{Name: "chat", Servers: servers(5)}, nil)
	for _, a := range []string{addrA, addrB, addrC} {
		mustOK(t, p.MarkDown(a, true))
	}
	mustOK(t, p.SetDrain("10.0.0.4:9000", true))
	last := server(t, p, "10.0.0.5:9000")

	_, err := p.Pick("", []*Server{last})
	if want := `pool "chat": no server available: 3 down, 1 draining, 0 at max_tunnels, 1 excluded`; err == nil || err.Error() != want {
		t.Fatalf("Pick: %v; want %s", err, want)
	}
	mustOK(t, p.MarkDown("10.0.0.5:9000", true))
	_, err = p.Pick("", nil)
	if want := `pool "chat": no server available: 4 down, 1 draining, 0 at max_tunnels`; err == nil || err.Error() != want {
		t.Fatalf("Pick: %v; want %s", err, want)
	}
	if !errors.Is(err, ErrNoServer) {
		t.Error("errors.Is(err, ErrNoServer) is false")
	}
	var nse *NoServerError
	if !errors.As(err, &nse) || nse.Down != 4 || nse.Draining != 1 {
		t.Errorf("errors.As: %+v", nse)
	}
}

// TestDrainKeepsLiveLeases: a draining server gets no new tunnels, keeps the ones it has, and is
// picked again once drain is cleared.
func TestDrainKeepsLiveLeases(t *testing.T) {
	p := newTestPool(t, PoolSpec{Servers: servers(2)}, nil)
	var onA *Lease
	for onA == nil {
		l := pick(t, p, "")
		if l.Server.Address() == addrA {
			onA = l
		} else {
			l.Release()
		}
	}
	mustOK(t, p.SetDrain(addrA, true))
	for range 20 {
		l := pick(t, p, "")
		if l.Server.Address() == addrA {
			t.Fatal("picked a draining server")
		}
		l.Release()
	}
	if st := state(t, p, addrA); st.State != StateDraining || st.LiveTunnels != 1 || st.EffectiveWeight != 0 {
		t.Errorf("draining server: %+v; want draining with 1 live tunnel and effective weight 0", st)
	}
	onA.Release()
	if n := server(t, p, addrA).Live(); n != 0 {
		t.Errorf("after Release: %d live", n)
	}
	mustOK(t, p.SetDrain(addrA, false))
	seen := map[string]bool{}
	for range 4 {
		l := pick(t, p, "")
		seen[l.Server.Address()] = true
		l.Release()
	}
	if !seen[addrA] {
		t.Error("not picked again after drain was cleared")
	}
}

// TestMaxTunnelsUnderConcurrency: 64 goroutines picking, holding and releasing never see a server
// carry more than its max_tunnels, and every slot comes back.
func TestMaxTunnelsUnderConcurrency(t *testing.T) {
	const max, workers, rounds = 4, 64, 300
	for _, balance := range algorithms {
		t.Run(string(balance), func(t *testing.T) {
			spec := PoolSpec{Balance: balance, Hash: HashSpec{By: HashPath}, Servers: servers(3)}
			for i := range spec.Servers {
				spec.Servers[i].MaxTunnels = max
			}
			p := newTestPool(t, spec, nil)
			// inUse counts holders as the test sees them, apart from the pool's own counters.
			inUse := map[*Server]*atomic.Int64{}
			for _, s := range spec.Servers {
				inUse[server(t, p, s.Address)] = new(atomic.Int64)
			}
			var picked, refused atomic.Int64
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					var held []*Lease
					for i := range rounds {
						// Hold up to three leases at once, so that 64 workers want far more than the 12
						// slots there are.
						if len(held) == 3 || i%5 == 4 {
							for _, l := range held {
								inUse[l.Server].Add(-1)
								l.Release()
								l.Release() // idempotent: must not free a second slot
							}
							held = held[:0]
							runtime.Gosched()
							continue
						}
						l, err := p.Pick(strings.Repeat("/", (w+i)%7), nil)
						if err != nil {
							if !errors.Is(err, ErrNoServer) {
								t.Error(err)
								return
							}
							refused.Add(1)
							continue
						}
						picked.Add(1)
						if n := inUse[l.Server].Add(1); n > max {
							t.Errorf("%s holds %d tunnels; max_tunnels %d", l.Server.Address(), n, max)
						}
						held = append(held, l)
						runtime.Gosched()
					}
					for _, l := range held {
						inUse[l.Server].Add(-1)
						l.Release()
					}
				})
			}
			wg.Wait()
			for s := range inUse {
				if n := s.Live(); n != 0 {
					t.Errorf("%s: %d live after every lease was released", s.Address(), n)
				}
			}
			t.Logf("picked %d, refused at max_tunnels %d", picked.Load(), refused.Load())
		})
	}
}

// TestAcquireAndRelease: Server.Acquire honours max_tunnels, Release is idempotent, totals count
// every tunnel.
func TestAcquireAndRelease(t *testing.T) {
	spec := PoolSpec{Servers: servers(1)}
	spec.Servers[0].MaxTunnels = 2
	p := newTestPool(t, spec, nil)
	s := server(t, p, addrA)
	l1, err := s.Acquire()
	mustOK(t, err)
	l2 := pick(t, p, "")
	if _, err := s.Acquire(); !errors.Is(err, ErrMaxTunnels) {
		t.Fatalf("third Acquire: %v; want ErrMaxTunnels", err)
	}
	if _, err := p.Pick("", nil); !errors.Is(err, ErrNoServer) {
		t.Fatalf("Pick at max_tunnels: %v; want ErrNoServer", err)
	}
	l1.Release()
	l1.Release()
	if n := s.Live(); n != 1 {
		t.Fatalf("after releasing one lease twice: %d live; want 1", n)
	}
	l2.Release()
	if st := state(t, p, addrA); st.LiveTunnels != 0 || st.TotalTunnels != 2 {
		t.Errorf("live %d, total %d; want 0 and 2", st.LiveTunnels, st.TotalTunnels)
	}
}

// TestRuntimeControls: SetWeight changes the share at once; unknown addresses and bad weights are
// refused with errors that say so.
func TestRuntimeControls(t *testing.T) {
	p := newTestPool(t, PoolSpec{Name: "chat", Servers: servers(2)}, nil)
	mustOK(t, p.SetWeight(addrA, 3))
	count := map[string]int{}
	for range 40 {
		l := pick(t, p, "")
		count[l.Server.Address()]++
		l.Release()
	}
	if count[addrA] != 30 || count[addrB] != 10 {
		t.Errorf("after SetWeight(A, 3): %v; want 30 and 10", count)
	}
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"SetWeight unknown", p.SetWeight("10.9.9.9:1", 2), `pool "chat": server "10.9.9.9:1": no such server in the pool`},
		{"SetDrain unknown", p.SetDrain("10.9.9.9:1", true), `pool "chat": server "10.9.9.9:1": no such server in the pool`},
		{"MarkDown unknown", p.MarkDown("10.9.9.9:1", true), `pool "chat": server "10.9.9.9:1": no such server in the pool`},
		{"SetWeight 0", p.SetWeight(addrA, 0), `pool "chat": server "10.0.0.1:9000": weight 0 is out of range; accepted 1 to 1000`},
	} {
		if tc.err == nil || tc.err.Error() != tc.want {
			t.Errorf("%s: %v; want %s", tc.name, tc.err, tc.want)
		}
	}
	if err := p.SetDrain("nope:1", true); !errors.Is(err, ErrUnknownServer) {
		t.Errorf("errors.Is(ErrUnknownServer) is false for %v", err)
	}
}

// TestSnapshotJSON: the snapshot names each server's state in the words an admin API shows.
func TestSnapshotJSON(t *testing.T) {
	spec := PoolSpec{Name: "chat", Servers: servers(4, 1, 2, 1, 1)}
	spec.Servers[3].Backup = true
	spec.Servers[1].MaxTunnels = 10
	p := newTestPool(t, spec, nil)
	mustOK(t, p.MarkDown(addrA, true))
	mustOK(t, p.SetDrain(addrC, true))
	l := pick(t, p, "")
	defer l.Release()
	b, err := json.Marshal(p.Snapshot())
	mustOK(t, err)
	want := `{"name":"chat","balance":"round_robin","servers":[` +
		`{"address":"10.0.0.1:9000","weight":1,"effective_weight":0,"state":"forced_down","backup":false,"max_tunnels":0,"live_tunnels":0,"total_tunnels":0,"failures":0},` +
		`{"address":"10.0.0.2:9000","weight":2,"effective_weight":2,"state":"up","backup":false,"max_tunnels":10,"live_tunnels":1,"total_tunnels":1,"failures":0},` +
		`{"address":"10.0.0.3:9000","weight":1,"effective_weight":0,"state":"draining","backup":false,"max_tunnels":0,"live_tunnels":0,"total_tunnels":0,"failures":0},` +
		`{"address":"10.0.0.4:9000","weight":1,"effective_weight":1,"state":"up","backup":true,"max_tunnels":0,"live_tunnels":0,"total_tunnels":0,"failures":0}],"checked":false}`
	if string(b) != want {
		t.Errorf("snapshot JSON:\n got %s\nwant %s", b, want)
	}
}
