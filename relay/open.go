package relay

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// opening is what a front knows once its handshake has succeeded: both endpoints, the dialed upstream's
// lease, and what the tunnel's log lines and metrics say of it.
type opening struct {
	listener          listenerInfo
	client, upstream  datapath.Endpoint
	up                *dialedUpstream
	clientAddr        string
	clientIP          string // the limits' key: see Tunnel.clientIP
	req               requestInfo
	pool              string
	releaseSlot       func()
	halfClosedTimeout time.Duration
}

// errEvictedAtOpen and errShuttingDownAtOpen say why establish refused a tunnel.
var (
	errEvictedAtOpen      = errors.New("a reload removed the upstream server during the handshake")
	errShuttingDownAtOpen = errors.New("the relay is shutting down")
)

// establish turns a handshake that succeeded into a live, registered tunnel: the engine its endpoints
// allow, the Tunnel and its pair, its registration (so that a shutdown or a reload finds it), its
// metrics, and the eviction check. Both fronts end in it, then in carry (the WebSocket front writes the
// 101 in between). On errShuttingDownAtOpen nothing is registered and the caller still owns the sockets,
// the lease and the slot; on errEvictedAtOpen the tunnel has ended (and given them back).
func (s *Server) establish(o opening) (*Tunnel, error) {
	t := &Tunnel{
		Started:           time.Now(),
		ClientAddr:        o.clientAddr,
		UpstreamAddr:      o.up.lease.Server.Address(),
		Pool:              o.pool,
		Listener:          o.listener.name,
		req:               o.req,
		lease:             o.up.lease,
		releaseSlot:       o.releaseSlot,
		clientIP:          o.clientIP,
		halfClosedTimeout: o.halfClosedTimeout,
	}
	kind := o.listener.datapath
	if o.listener.perTunnel {
		kind = s.auto.startKind() // auto's policy says where its tunnels start
	}
	engine := s.engineFor(kind, o.client, o.upstream)
	t.pair = datapath.NewPair(engine.Kind(), o.client, o.upstream, func(*datapath.Pair) { s.tunnelEnded(t) })
	// The tunnel is registered before the client sees its 101: a shutdown that races this handshake then
	// either refuses it here or finds it live and closes it; it never misses it.
	if err := s.tunnels.add(t); err != nil {
		return nil, fmt.Errorf("%w: %v", errShuttingDownAtOpen, err)
	}
	t.pair.ID = t.ID
	s.auto.track(t, o.listener)
	s.metrics.tunnelOpened(t)
	// After add, so that a CloseTunnelsTo running now either finds the tunnel or has marked the server.
	if s.evicted(o.up.lease.Server) {
		t.end(ReasonUpstreamRemoved, true)
		return nil, errEvictedAtOpen
	}
	if h := establishedHook.Load(); h != nil {
		(*h)(t)
	}
	return t, nil
}

// establishedHook, set by tests only, runs at the end of establish: the tunnel is registered (an upgrade
// may pick it) and no engine carries it yet (the WebSocket front's 101 is not written yet).
var establishedHook atomic.Pointer[func(*Tunnel)]

// carry hands an open, registered tunnel to the engine that carries its kind of pair.
func (s *Server) carry(t *Tunnel) {
	s.logOpened(t)
	s.engine(t.pair.Kind()).Carry(t.pair)
}

// engineFor is the engine for a listener's datapath that accepts these endpoints: TLS endpoints run on
// copy, since without kernel TLS neither splice nor sockmap can carry them. By design, not a fallback: it
// counts in sockrelay_tunnels_total{datapath="copy"}.
func (s *Server) engineFor(kind Datapath, client, upstream datapath.Endpoint) datapath.Engine {
	if e := s.engine(kind); e.Accepts(client, upstream) {
		return e
	}
	return s.engine(DatapathCopy)
}

// engine is the server's engine of a kind.
func (s *Server) engine(kind Datapath) datapath.Engine {
	switch kind {
	case DatapathSockmap:
		return s.kernel
	case DatapathSplice:
		return s.splicer
	default:
		return s.copier
	}
}

// tunnelEnded is every tunnel's last step: forget it, count it, and log one line about it.
func (s *Server) tunnelEnded(t *Tunnel) {
	dp := t.Datapath()
	up, down := t.Bytes()
	s.metrics.tunnelEnded(t, dp)
	if t.lease != nil {
		t.lease.Release()
	}
	if t.releaseSlot != nil {
		t.releaseSlot()
	}
	s.logClosed(t, up, down)
	s.forgetWaiting(t)
	// Last: removing the last tunnel lets a draining Shutdown return, and the process may exit at once;
	// the tunnel's log line and counters must be out before that.
	s.tunnels.remove(t)
}
