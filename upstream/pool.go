// Package upstream chooses the server each new tunnel (or plain request) goes to, and keeps track of
// the servers' load and health.
//
// # Model
//
// A Pool holds primary and backup servers. Pick chooses among the primaries that are usable: up, not
// draining, under their max_tunnels and not in the caller's exclude list (the servers a retry already
// tried). Only when no primary is usable does it choose among the usable backups, with the same
// algorithm: backups are for outages, not for extra capacity.
//
// A server is in one of four states (most severe first):
//   - forced_down: an operator marked it down (MarkDown); it stays down until cleared.
//   - down: active health checks failed Fall times in a row, or the relay reported passive failures
//     (ReportFailure) past the limit; it comes back by itself (Rise passes, or after DownFor).
//   - draining: configured or set at run time (SetDrain); its live tunnels carry on, it gets no new ones.
//   - up: it takes new tunnels, at its effective weight, which slow start ramps after it comes back up.
//
// # Load is live tunnels, not requests
//
// A WebSocket tunnel holds its server for minutes or days, so a server's load is the number of tunnels
// it carries now, not how many it was given recently. Pick reserves a slot atomically and returns a
// Lease; the relay releases it when the tunnel ends. Round-robin spreads new tunnels but is blind to a
// server still holding yesterday's; least_tunnels, random_two and the hash's bounded loads look at the
// live counts, and max_tunnels caps them.
//
// # Reloads
//
// A server is identified by its address. Update (a config reload) and DNS discovery keep the same
// *Server, with its live count and health, for every address that stays; servers that go are returned
// (or passed to Options.OnRemoved) so that the caller can close their tunnels if it wants to, and
// leases on them still release.
//
// All methods are safe for concurrent use. Pick takes the pool's lock and looks at every server once;
// Release is a single atomic operation and never waits for it.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

var (
	// ErrNoServer is wrapped by every Pick error that means "no usable server now": the caller answers
	// 502 or 503 rather than retrying at once. errors.As with *NoServerError gives the reasons.
	ErrNoServer = errors.New("no server available")
	// ErrUnknownServer is returned by the runtime controls for an address the pool does not hold.
	ErrUnknownServer = errors.New("no such server in the pool")
	// ErrClosed is returned by Start after Close.
	ErrClosed = errors.New("pool closed")
)

// NoServerError says why Pick found no usable server, counting each server once under its first
// reason in the order down (forced or by health), draining, at max_tunnels, excluded by the caller.
type NoServerError struct {
	Pool     string
	Servers  int
	Down     int
	Draining int
	AtMax    int
	Excluded int
	// DNSError is the last DNS discovery error, when that is why the pool has no servers.
	DNSError string
}

func (e *NoServerError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pool %q: %v: ", e.Pool, ErrNoServer)
	if e.Servers == 0 {
		b.WriteString("the pool has no servers")
		if e.DNSError != "" {
			fmt.Fprintf(&b, " (dns: %s)", e.DNSError)
		}
		return b.String()
	}
	fmt.Fprintf(&b, "%d down, %d draining, %d at max_tunnels", e.Down, e.Draining, e.AtMax)
	if e.Excluded > 0 {
		fmt.Fprintf(&b, ", %d excluded", e.Excluded)
	}
	return b.String()
}

// Is makes errors.Is(err, ErrNoServer) true.
func (e *NoServerError) Is(target error) bool { return target == ErrNoServer }

// Resolver is what DNS discovery needs; *net.Resolver satisfies it, and tests give a fake.
type Resolver interface {
	LookupIPAddr(ctx context.Context, host string) ([]net.IPAddr, error)
	LookupSRV(ctx context.Context, service, proto, name string) (cname string, addrs []*net.SRV, err error)
}

// Options are a pool's collaborators, none of them configuration: every field may be left zero.
type Options struct {
	// Logger receives state changes (a server down or up, a DNS change); no line per pick.
	// Default: discard.
	Logger *slog.Logger
	// Now is the clock for passive health and slow start. Default: time.Now.
	Now func() time.Time
	// Rand drives the random choices (ties, random_two); used under the pool's lock. Default: seeded
	// from the runtime's random source.
	Rand *rand.Rand
	// Resolver serves DNS discovery. Default: net.DefaultResolver.
	Resolver Resolver
	// Dial opens the health checks' connections. Default: a net.Dialer.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// OnRemoved is called, outside the pool's lock, with the servers a DNS refresh removed (Update
	// returns its own instead), so that the caller can close their tunnels if it wants to.
	OnRemoved func(removed []*Server)
}

// Pool is a named set of servers and the way to choose among them. See the package comment.
type Pool struct {
	log       *slog.Logger
	now       func() time.Time
	dial      func(ctx context.Context, network, address string) (net.Conn, error)
	resolver  Resolver
	onRemoved func([]*Server)

	mu      sync.Mutex
	spec    PoolSpec
	servers []*Server
	// retired are servers a reload or DNS removed while they still carried tunnels, by address, kept
	// until those end so that an address that comes back gets its live count back.
	retired map[string]*Server
	rng     *rand.Rand
	cands   []candidate // Pick's scratch space, reused under mu
	dns     dnsState
	dnsGen  uint64 // bumped when Update changes the DNS spec, so that a resolution begun before is dropped

	// Background work (Start, Close).
	wakeHealth chan struct{}
	wakeDNS    chan struct{}
	started    bool
	closed     bool
	cancel     context.CancelFunc
	wg         sync.WaitGroup
}

// dnsState is DNS discovery's outcome so far.
type dnsState struct {
	err        string // last resolution's error, "" after a success
	resolvedAt time.Time
}

// New validates spec (see PoolSpec.Validate; New applies no defaults) and returns a pool over its
// servers. Health checks and DNS discovery begin with Start; until DNS has resolved, a DNS pool has no
// servers.
func New(spec PoolSpec, opts Options) (*Pool, error) {
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("pool %q: %w", spec.Name, err)
	}
	p := &Pool{
		log:        opts.Logger,
		now:        opts.Now,
		dial:       opts.Dial,
		resolver:   opts.Resolver,
		onRemoved:  opts.OnRemoved,
		rng:        opts.Rand,
		wakeHealth: make(chan struct{}, 1),
		wakeDNS:    make(chan struct{}, 1),
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.log = p.log.With("pool", spec.Name)
	if p.now == nil {
		p.now = time.Now
	}
	if p.resolver == nil {
		p.resolver = net.DefaultResolver
	}
	if p.dial == nil {
		var d net.Dialer
		p.dial = d.DialContext
	}
	if p.rng == nil {
		p.rng = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	p.spec = copySpec(spec)
	for _, s := range spec.Servers {
		p.servers = append(p.servers, newServer(s))
	}
	return p, nil
}

// copySpec copies what a PoolSpec points to, so that the caller may reuse its spec.
func copySpec(s PoolSpec) PoolSpec {
	s.Servers = append([]ServerSpec(nil), s.Servers...)
	if s.DNS != nil {
		d := *s.DNS
		s.DNS = &d
	}
	if s.Active != nil {
		a := *s.Active
		s.Active = &a
	}
	return s
}

// Name is the pool's name.
func (p *Pool) Name() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.spec.Name
}

// Retry is the pool's retry setting, which the relay applies.
func (p *Pool) Retry() RetrySpec {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.spec.Retry
}

// Key is the hash key of r for this pool: what its hash spec hashes (see HashSpec.Key), or "" when the
// pool does not balance by hash, so that the caller computes nothing it will not use.
func (p *Pool) Key(clientIP string, r *http.Request) string {
	p.mu.Lock()
	balance, hash := p.spec.Balance, p.spec.Hash
	p.mu.Unlock()
	if balance != Hash {
		return ""
	}
	return hash.Key(clientIP, r)
}

// Servers returns the pool's servers now, backups included.
func (p *Pool) Servers() []*Server {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.servers)
}

// Pick chooses a server for a new tunnel and reserves a slot on it; the caller releases the Lease when
// the tunnel ends, or at once if it could not open it. key is the hash algorithm's key (see HashSpec.Key;
// other algorithms ignore it, and an empty key makes hash fall back to round-robin). exclude lists
// servers not to choose, such as those this tunnel already tried. The error wraps ErrNoServer when no
// server is usable.
func (p *Pool) Pick(key string, exclude []*Server) (*Lease, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	var lost []*Server
	for {
		cands, why := p.candidatesLocked(now, exclude, lost)
		if len(cands) == 0 {
			return nil, why
		}
		s := p.chooseLocked(key, cands)
		if s.tryAcquire() {
			return &Lease{Server: s}, nil
		}
		// Server.Acquire, which does not take the lock, filled its last slot since we looked.
		lost = append(lost, s)
	}
}

// candidate is one usable server as one Pick sees it.
type candidate struct {
	s     *Server
	w     int64 // effective weight, scaled by weightScale
	live  int64
	score float64 // the hash algorithm's rendezvous score
}

// candidatesLocked returns the usable primaries, or the usable backups when no primary is usable; when
// neither is, the *NoServerError that says why.
func (p *Pool) candidatesLocked(now time.Time, exclude, lost []*Server) ([]candidate, error) {
	slow := time.Duration(0)
	if p.spec.Active != nil {
		slow = p.spec.Active.SlowStart
	}
	why := NoServerError{Pool: p.spec.Name, Servers: len(p.servers), DNSError: p.dns.err}
	cands := p.cands[:0]
	for _, backup := range []bool{false, true} {
		for _, s := range p.servers {
			if s.backup != backup {
				continue
			}
			switch {
			case s.downLocked(now):
				why.Down++
			case s.drain:
				why.Draining++
			case s.atMax() || contains(lost, s):
				why.AtMax++
			case contains(exclude, s):
				why.Excluded++
			default:
				cands = append(cands, candidate{s: s, w: s.effectiveLocked(now, slow), live: s.live.Load()})
			}
		}
		if len(cands) > 0 {
			p.cands = cands
			return cands, nil
		}
	}
	p.cands = cands
	return nil, &why
}

func contains(list []*Server, s *Server) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// chooseLocked applies the pool's algorithm to a non-empty candidate list.
func (p *Pool) chooseLocked(key string, cands []candidate) *Server {
	if len(cands) == 1 {
		return cands[0].s
	}
	switch p.spec.Balance {
	case LeastTunnels:
		return leastTunnels(cands, p.rng)
	case RandomTwo:
		return randomTwo(cands, p.rng)
	case Hash:
		if key != "" {
			return boundedHash(cands, key, p.spec.Hash.LoadFactor)
		}
	}
	return smoothRoundRobin(cands)
}

// findLocked returns the server with address addr, or an error wrapping ErrUnknownServer.
func (p *Pool) findLocked(addr string) (*Server, error) {
	for _, s := range p.servers {
		if s.addr == addr {
			return s, nil
		}
	}
	return nil, fmt.Errorf("pool %q: server %q: %w", p.spec.Name, addr, ErrUnknownServer)
}

// SetWeight changes a server's weight until the next Update or DNS refresh sets it again.
func (p *Pool) SetWeight(addr string, weight int) error {
	if weight < 1 || weight > MaxWeight {
		return fmt.Errorf("pool %q: server %q: weight %d is out of range; accepted 1 to %d", p.Name(), addr, weight, MaxWeight)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	s, err := p.findLocked(addr)
	if err != nil {
		return err
	}
	s.weight, s.weightOverride = weight, weight
	return nil
}

// SetDrain starts or ends draining a server: live tunnels stay, new ones go elsewhere. An Update that
// keeps the server sets drain to what its spec says.
func (p *Pool) SetDrain(addr string, drain bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, err := p.findLocked(addr)
	if err != nil {
		return err
	}
	if s.drain != drain {
		p.log.Info("server drain changed", "server", addr, "drain", drain)
	}
	s.drain, s.drainOverride = drain, &drain
	return nil
}

// MarkDown forces a server down (down true) until MarkDown(addr, false), whatever its health says; it
// survives Update. Live tunnels are left alone: draining and closing them are the caller's choice.
func (p *Pool) MarkDown(addr string, down bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, err := p.findLocked(addr)
	if err != nil {
		return err
	}
	if s.forced && !down {
		s.rampFrom = p.now() // back from maintenance: slow start applies
	}
	if s.forced != down {
		p.log.Info("server forced down changed", "server", addr, "forced_down", down)
	}
	s.forced = down
	return nil
}

// Snapshot is a pool's state at one moment, for an admin API (field names are its JSON).
type Snapshot struct {
	Name    string        `json:"name"`
	Balance Algorithm     `json:"balance"`
	Servers []ServerState `json:"servers"`
	// Checked says the pool has an active health check. Without one, a server's state comes from handshake
	// failures only: a dead server in a quiet pool stays up until clients fail on it.
	Checked bool `json:"checked"`
	// DNS is set for a pool whose servers DNS discovers.
	DNS *DNSState `json:"dns,omitempty"`
}

// ServerState is one server in a Snapshot.
type ServerState struct {
	Address string `json:"address"`
	Weight  int    `json:"weight"`
	// EffectiveWeight is what new picks use now: Weight ramped by slow start, 0 when not up.
	EffectiveWeight float64 `json:"effective_weight"`
	State           State   `json:"state"`
	Backup          bool    `json:"backup"`
	MaxTunnels      int64   `json:"max_tunnels"`
	LiveTunnels     int64   `json:"live_tunnels"`
	TotalTunnels    uint64  `json:"total_tunnels"`
	// Failures counts the failures the relay reported (ReportFailure) since the server joined.
	Failures uint64 `json:"failures"`
	// DownUntil is the end of a passive down period, when one is running.
	DownUntil time.Time `json:"down_until,omitzero"`
	// LastCheck and LastCheckError are the last active check's time and error ("" when it passed).
	LastCheck      time.Time `json:"last_check,omitzero"`
	LastCheckError string    `json:"last_check_error,omitempty"`
}

// DNSState is DNS discovery's state in a Snapshot.
type DNSState struct {
	Name string  `json:"name"`
	Type DNSType `json:"type"`
	// ResolvedAt is the last successful resolution; the servers are what it found.
	ResolvedAt time.Time `json:"resolved_at,omitzero"`
	// Error is the last resolution's error, "" when it succeeded; on error the servers stay as they were.
	Error string `json:"error,omitempty"`
}

// Snapshot returns the pool's state now, servers in configuration (or, for DNS, address) order.
func (p *Pool) Snapshot() Snapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	slow := time.Duration(0)
	if p.spec.Active != nil {
		slow = p.spec.Active.SlowStart
	}
	snap := Snapshot{Name: p.spec.Name, Balance: p.spec.Balance, Servers: make([]ServerState, 0, len(p.servers)),
		Checked: p.spec.Active != nil}
	for _, s := range p.servers {
		st := ServerState{
			Address:        s.addr,
			Weight:         s.weight,
			State:          s.stateLocked(now),
			Backup:         s.backup,
			MaxTunnels:     s.maxTunnels.Load(),
			LiveTunnels:    s.live.Load(),
			TotalTunnels:   s.total.Load(),
			Failures:       s.failures,
			LastCheck:      s.lastCheck,
			LastCheckError: s.checkErr,
		}
		if st.State == StateUp {
			st.EffectiveWeight = float64(s.effectiveLocked(now, slow)) / weightScale
		}
		if now.Before(s.downUntil) {
			st.DownUntil = s.downUntil
		}
		snap.Servers = append(snap.Servers, st)
	}
	if d := p.spec.DNS; d != nil {
		snap.DNS = &DNSState{Name: d.Name, Type: d.Type, ResolvedAt: p.dns.resolvedAt, Error: p.dns.err}
	}
	return snap
}
