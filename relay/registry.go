package relay

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ErrRegistryClosed is returned by Registry.Add once the registry has closed its tunnels for shutdown.
var ErrRegistryClosed = errors.New("relay is shutting down")

// Registry owns every live tunnel. It is what keeps a tunnel's sockets reachable (a net.Conn nobody
// references is closed by a finalizer: docs/datapath.md, "The kernel engine owns the sockets'
// descriptors"), what
// /debug/tunnels lists, and what shutdown drains and closes.
type Registry struct {
	mu      sync.Mutex
	nextID  uint64
	ownFrom uint64 // the first id of this process's own tunnels, past those an old one gave (ContinueIDs)
	tunnels map[uint64]*Tunnel
	closed  bool
	empty   chan struct{} // closed while no tunnel is live; replaced when one is added

	// Bytes of tunnels that have ended, so that byte counters stay monotonic when a tunnel leaves.
	endedToUpstream, endedToClient uint64
	// kernelMovable: the process this one hands over to adopted the BPF objects, so kernel tunnels can
	// move too (Server.HandKernelTunnels).
	kernelMovable atomic.Bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	empty := make(chan struct{})
	close(empty)
	return &Registry{tunnels: make(map[uint64]*Tunnel), empty: empty}
}

// add gives t an id and tracks it until it ends. After CloseAll it refuses t.
func (r *Registry) add(t *Tunnel) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrRegistryClosed
	}
	r.nextID++
	t.ID = r.nextID
	if len(r.tunnels) == 0 {
		r.empty = make(chan struct{})
	}
	r.tunnels[t.ID] = t
	return nil
}

// adoptIDs is how many ids a process started by an upgrade leaves to the old one's tunnels, past the
// latest it had when it offered its listeners: the old process opens tunnels until the new one serves.
const adoptIDs = 1 << 20

// ContinueIDs numbers this process's tunnels past last, the old process's latest id, and the ids it
// may still give before it hands over: an adopted tunnel then keeps its id.
func (r *Registry) ContinueIDs(last uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nextID = max(r.nextID, last+adoptIDs)
	r.ownFrom = r.nextID + 1
}

// LastID is the id of the latest tunnel added.
func (r *Registry) LastID() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nextID
}

// adopt tracks a tunnel another process handed over, under its id there when that id is below this
// process's own (ContinueIDs) and free, else under a new one.
func (r *Registry) adopt(t *Tunnel, id uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrRegistryClosed
	}
	if _, taken := r.tunnels[id]; taken || id == 0 || id >= r.ownFrom {
		r.nextID++
		id = r.nextID
	}
	t.ID = id
	if len(r.tunnels) == 0 {
		r.empty = make(chan struct{})
	}
	r.tunnels[id] = t
	return nil
}

// remove forgets an ended tunnel and folds its byte counts into the totals.
func (r *Registry) remove(t *Tunnel) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.tunnels[t.ID]; !ok {
		return
	}
	delete(r.tunnels, t.ID)
	up, down := t.Bytes()
	r.endedToUpstream += up
	r.endedToClient += down
	if len(r.tunnels) == 0 {
		close(r.empty)
	}
}

// Len returns the number of live tunnels.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.tunnels)
}

// Tunnels returns the live tunnels, oldest first.
func (r *Registry) Tunnels() []*Tunnel {
	r.mu.Lock()
	ts := make([]*Tunnel, 0, len(r.tunnels))
	for _, t := range r.tunnels {
		ts = append(ts, t)
	}
	r.mu.Unlock()
	slices.SortFunc(ts, func(a, b *Tunnel) int { return cmp.Compare(a.ID, b.ID) })
	return ts
}

// BytesRelayed returns the bytes every tunnel, live or ended, has moved each way. Both counts only grow:
// a tunnel's bytes move from the live sum to the ended totals under the same lock.
func (r *Registry) BytesRelayed() (toUpstream, toClient uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	toUpstream, toClient = r.endedToUpstream, r.endedToClient
	for _, t := range r.tunnels {
		up, down := t.Bytes()
		toUpstream += up
		toClient += down
	}
	return toUpstream, toClient
}

// Wait blocks until no tunnel is live or ctx is done. An empty registry is nil even when ctx is done
// already: a select of the two would choose at random, and a drain that closed nothing report that it did.
func (r *Registry) Wait(ctx context.Context) error {
	r.mu.Lock()
	empty := r.empty
	r.mu.Unlock()
	select {
	case <-empty:
		return nil
	default:
	}
	select {
	case <-empty:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// CloseAll refuses new tunnels and resets every live one, then waits (bounded) for their ends to be reported.
func (r *Registry) CloseAll() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	for _, t := range r.Tunnels() {
		if t.Parked() {
			// An upgrade is handing it over: a reset here would reach the sockets the new process may
			// hold. The handover ends it here (or carries it on, and the engines' Close resets it).
			continue
		}
		t.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = r.Wait(ctx)
}
