package upstream

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

// fakeClock is a clock the test moves by hand, for passive health and slow start.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// servers returns n server specs with the given weights (1 when weights runs out), at 10.0.0.i:9000.
func servers(n int, weights ...int) []ServerSpec {
	out := make([]ServerSpec, n)
	for i := range out {
		out[i] = ServerSpec{Address: fmt.Sprintf("10.0.0.%d:9000", i+1), Weight: 1}
		if i < len(weights) {
			out[i].Weight = weights[i]
		}
	}
	return out
}

// newTestPool builds a pool from spec with defaults filled, a fixed random seed and the given clock
// (a fresh fake one when nil), closed at the end of the test.
func newTestPool(t *testing.T, spec PoolSpec, clock *fakeClock, opts ...func(*Options)) *Pool {
	t.Helper()
	if spec.Name == "" {
		spec.Name = "test"
	}
	if clock == nil {
		clock = newFakeClock()
	}
	o := Options{Now: clock.Now, Rand: rand.New(rand.NewPCG(1, 2))}
	for _, f := range opts {
		f(&o)
	}
	p, err := New(spec.WithDefaults(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// pick picks for key and fails the test on an error.
func pick(t *testing.T, p *Pool, key string, exclude ...*Server) *Lease {
	t.Helper()
	l, err := p.Pick(key, exclude)
	if err != nil {
		t.Fatalf("Pick(%q): %v", key, err)
	}
	return l
}

// server returns the pool's server at addr.
func server(t *testing.T, p *Pool, addr string) *Server {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	s, err := p.findLocked(addr)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// state returns addr's entry in the pool's snapshot.
func state(t *testing.T, p *Pool, addr string) ServerState {
	t.Helper()
	for _, s := range p.Snapshot().Servers {
		if s.Address == addr {
			return s
		}
	}
	t.Fatalf("%s not in the snapshot", addr)
	return ServerState{}
}
