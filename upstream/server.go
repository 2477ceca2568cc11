package upstream

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// ErrMaxTunnels is returned by Server.Acquire when the server already carries MaxTunnels live tunnels.
var ErrMaxTunnels = errors.New("server at max_tunnels")

// State is a server's state as Snapshot reports it.
type State string

const (
	// StateUp takes new tunnels.
	StateUp State = "up"
	// StateDown failed its health checks or too many tunnels (passive); it comes back by itself.
	StateDown State = "down"
	// StateDraining keeps its live tunnels and takes no new ones, until SetDrain or a reload clears it.
	StateDraining State = "draining"
	// StateForcedDown was marked down by an operator (MarkDown) and stays so until cleared.
	StateForcedDown State = "forced_down"
)

// weightScale makes effective weights integers fine enough for slow start to ramp a weight-1 server
// smoothly; every algorithm is scale-free, so it changes no choice.
const weightScale = 1000

// Server is one upstream server of a pool. Its identity is its address: a reload (Pool.Update) or a
// DNS refresh that keeps the address keeps the same *Server, with its live tunnels and health.
type Server struct {
	addr string
	seed uint64 // hash of addr, for the hash algorithm

	// Counters the relay touches on every tunnel, kept apart from the pool's lock so that Release never
	// waits for a Pick.
	live       atomic.Int64
	total      atomic.Uint64
	maxTunnels atomic.Int64
	// removed is set while the server is out of its pool (a reload or DNS took it out).
	removed atomic.Bool

	// Everything below is guarded by the owning pool's mu.
	weight int
	backup bool
	drain  bool
	forced bool // MarkDown
	// An operator's SetWeight and SetDrain outlive DNS refreshes, which re-apply the discovered spec;
	// a configuration reload (Update) clears them. 0 and nil: no override.
	weightOverride int
	drainOverride  *bool

	// Active health: consecutive results and the verdict they led to.
	activeDown bool
	okStreak   int
	failStreak int
	lastCheck  time.Time
	checkErr   string

	// Passive health: recent failures reported by the relay and the end of a passive down period.
	fails     []time.Time
	downUntil time.Time
	failures  uint64 // all reported failures, for Snapshot

	// rampFrom is when the server last came back up, for slow start.
	rampFrom time.Time
	// current is smooth weighted round-robin's running weight.
	current int64
}

func newServer(spec ServerSpec) *Server {
	s := &Server{addr: spec.Address, seed: hashString(spec.Address)}
	s.apply(spec)
	return s
}

// apply sets what a config may change on a kept server; live state stays. Called under the pool's mu.
func (s *Server) apply(spec ServerSpec) {
	s.weight = spec.Weight
	if s.weightOverride > 0 {
		s.weight = s.weightOverride
	}
	s.backup = spec.Backup
	s.drain = spec.Drain
	if s.drainOverride != nil {
		s.drain = *s.drainOverride
	}
	s.maxTunnels.Store(int64(spec.MaxTunnels))
}

// Address is the server's HOST:PORT.
func (s *Server) Address() string { return s.addr }

// Live is the number of tunnels to the server open now (leases not yet released).
func (s *Server) Live() int64 { return s.live.Load() }

// Removed says whether a reload or DNS discovery has taken the server out of its pool (and not put it
// back since).
func (s *Server) Removed() bool { return s.removed.Load() }

// Acquire counts one more live tunnel on s, refusing with ErrMaxTunnels when s is at its max_tunnels.
// It checks neither health nor drain: Pool.Pick does, and is how a server should normally be chosen;
// Acquire is for a caller that has already settled on this very server (stickiness it keeps itself).
func (s *Server) Acquire() (*Lease, error) {
	if !s.tryAcquire() {
		return nil, fmt.Errorf("server %s: %w (%d)", s.addr, ErrMaxTunnels, s.maxTunnels.Load())
	}
	return &Lease{Server: s}, nil
}

// Adopt counts one more live tunnel on s whatever its max_tunnels: a tunnel that exists already (one a
// binary upgrade handed over from the process it replaced, which counted it there) is not refused.
func (s *Server) Adopt() *Lease {
	s.live.Add(1)
	return &Lease{Server: s}
}

// tryAcquire reserves a tunnel slot with a compare-and-swap, so that no interleaving of Picks,
// Acquires and Releases ever lets live pass max_tunnels.
func (s *Server) tryAcquire() bool {
	for {
		n := s.live.Load()
		if m := s.maxTunnels.Load(); m > 0 && n >= m {
			return false
		}
		if s.live.CompareAndSwap(n, n+1) {
			s.total.Add(1)
			return true
		}
	}
}

// atMax says whether s has no tunnel slot left.
func (s *Server) atMax() bool {
	m := s.maxTunnels.Load()
	return m > 0 && s.live.Load() >= m
}

// Lease is one live tunnel's hold on a server. The relay releases it when the tunnel ends (not when the
// handshake ends): a server's load is the tunnels it carries now.
type Lease struct {
	Server *Server
	done   atomic.Bool
}

// Release gives the tunnel's slot back. Calling it again does nothing, so every path that ends a tunnel
// may call it. It works the same for a server that a reload or DNS refresh has removed.
func (l *Lease) Release() {
	if l.done.CompareAndSwap(false, true) {
		l.Server.live.Add(-1)
	}
}

// downLocked says whether health or an operator keeps s from new tunnels at now.
func (s *Server) downLocked(now time.Time) bool {
	return s.forced || s.activeDown || now.Before(s.downUntil)
}

// stateLocked is s's state at now, the most severe one first.
func (s *Server) stateLocked(now time.Time) State {
	switch {
	case s.forced:
		return StateForcedDown
	case s.downLocked(now):
		return StateDown
	case s.drain:
		return StateDraining
	}
	return StateUp
}

// effectiveLocked is s's weight times weightScale, ramped by slow start: it rises linearly from 1 at
// the moment s came back up to the full weight slowStart later.
func (s *Server) effectiveLocked(now time.Time, slowStart time.Duration) int64 {
	full := int64(s.weight) * weightScale
	from := s.rampFrom
	if s.downUntil.After(from) && !now.Before(s.downUntil) {
		// A passive down period ended by itself: it came back up when the period ended.
		from = s.downUntil
	}
	if slowStart <= 0 || from.IsZero() {
		return full
	}
	since := now.Sub(from)
	if since >= slowStart {
		return full
	}
	if since < 0 {
		since = 0
	}
	return max(1, int64(float64(full)*float64(since)/float64(slowStart)))
}
