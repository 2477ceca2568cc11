package relay

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/upstream"
)

// ReasonHandedOver: a binary upgrade handed the live tunnel to the new process, which carries it on; this
// process closed its own descriptors of the sockets, which stay open there.
const ReasonHandedOver = "handed_over"

// ReasonHandedBack: this process had adopted the tunnel, and the old one kept it after all (it did not
// hear this one's answer in time); this process closed its own descriptors only.
const ReasonHandedBack = "handed_back"

// ErrNotMovable says a tunnel cannot be handed to another process: TLS on a side (its crypto state lives
// in this process's memory), or the kernel datapath carries it and the other process did not adopt the
// BPF objects (Registry.CanMove).
var ErrNotMovable = errors.New("the tunnel cannot move to another process")

// Movable reports whether t can be handed to another process: a plain tunnel that a userspace engine
// (copy, on the event loop or on goroutines, or splice) carries.
func (t *Tunnel) Movable() bool {
	return !t.pair.TLS() && t.pair.Kind() != DatapathSockmap && !t.pair.Ending()
}

// Parked reports whether t is parked for a handover (Park, or adopted and not carried yet).
func (t *Tunnel) Parked() bool { return t.parked.Load() }

// Movable counts the live tunnels that can be handed to another process.
func (r *Registry) Movable() int {
	n := 0
	for _, t := range r.Tunnels() {
		if r.CanMove(t) {
			n++
		}
	}
	return n
}

// ParkedTunnel is a tunnel stopped for a handover: no engine carries it, its sockets are open, and
// State says where it stands. The caller hands it over and then lets go of it (HandedOver), or carries
// it on here (Resume).
type ParkedTunnel struct {
	T        *Tunnel
	Datapath Datapath // the engine that carried it
	State    datapath.State
	// LastActive is when a byte last moved, as far as this process can tell (its start at worst).
	LastActive        time.Time
	HalfClosedTimeout time.Duration
	// URI, Host and UserAgent are the request that opened it.
	URI, Host, UserAgent string
	// ClientIP is the client address the limits count it under.
	ClientIP string
	// Kernel is the kernel engine's state of a tunnel whose sockets stay in the BPF maps (Datapath
	// sockmap); nil otherwise.
	Kernel *sockmap.TunnelState
}

// Park stops t's engine at a byte boundary, keeping its sockets open: the bytes it read and did not
// write become State.Peeked. The timeouts leave it alone while parked.
//
// A tunnel no engine carries yet gives an error wrapping datapath.ErrNotCarried, and is left as it was
// (under auto's policy too): its handshake registered it and has not handed it to an engine (the
// WebSocket front writes the 101 in between), and does so in a moment. Parked and handed over then, two
// processes would relay its sockets, and the new one could send the upstream's bytes ahead of the 101; a
// handshake that fails instead ends the tunnel, which then cannot be parked at all. Park it again later.
func (s *Server) Park(t *Tunnel) (*ParkedTunnel, error) {
	if t.pair.Carrier() == nil && !t.pair.Ending() {
		// Asked first, so that auto keeps it; the pair's own Park (or the kernel engine's LetGo) asks again
		// under the pair's lock.
		return nil, fmt.Errorf("tunnel %d: %w", t.ID, datapath.ErrNotCarried)
	}
	if !s.auto.release(t) || !s.tunnels.CanMove(t) {
		return nil, ErrNotMovable
	}
	kind := t.pair.Kind()
	if kind == DatapathSockmap {
		return s.parkKernel(t)
	}
	t.parked.Store(true)
	if err := t.pair.Park(); err != nil {
		t.parked.Store(false)
		return nil, err
	}
	pt := &ParkedTunnel{T: t, Datapath: kind, State: t.pair.State(), HalfClosedTimeout: t.halfClosedTimeout,
		URI: t.req.uri, Host: t.req.host, UserAgent: t.req.userAgent, ClientIP: t.clientIP}
	pt.LastActive = later(t.Started, later(t.activeAt(), pt.State.LastActive))
	return pt, nil
}

// Files returns duplicates of the parked tunnel's client and upstream sockets, for SCM_RIGHTS; the
// caller closes them.
func (pt *ParkedTunnel) Files() (client, upstream *os.File, err error) {
	c, u := pt.T.pair.Client().Conn, pt.T.pair.Upstream().Conn
	if client, err = c.File(); err != nil {
		return nil, nil, fmt.Errorf("tunnel %d: client socket: %w", pt.T.ID, err)
	}
	if upstream, err = u.File(); err != nil {
		client.Close()
		return nil, nil, fmt.Errorf("tunnel %d: upstream socket: %w", pt.T.ID, err)
	}
	return client, upstream, nil
}

// Resume carries a parked tunnel on here, on the engine that carried it (the new process did not take
// it), and puts it back under auto's policy where its listener is on auto.
func (s *Server) Resume(pt *ParkedTunnel) {
	pt.T.parked.Store(false)
	defer s.trackCarried(pt.T)
	if pt.Kernel != nil {
		s.resumeKernel(pt)
		return
	}
	s.engine(pt.Datapath).Carry(pt.T.pair)
}

// HandedOver lets go of a parked tunnel that the new process carries now: its descriptors here are
// closed (the sockets stay open in the new process: neither FIN nor reset), its lease and slot given
// back, and it ends here as handed_over.
func (s *Server) HandedOver(pt *ParkedTunnel) {
	pt.T.end(ReasonHandedOver, false)
}

// Adoption is a live tunnel another process handed over, as this one adopts it.
type Adoption struct {
	ID                uint64
	ClientAddr        string
	UpstreamAddr      string
	Pool              string
	Listener          string
	Datapath          Datapath
	Started           time.Time
	LastActive        time.Time
	HalfClosedTimeout time.Duration
	URI, Host         string
	UserAgent         string
	State             datapath.State
	// ClientIP is the client address the limits count the tunnel under; empty (an older process's
	// handover), the host of ClientAddr.
	ClientIP string
	// Kernel is the kernel engine's state of a tunnel whose sockets are in the BPF maps this process
	// adopted (Datapath sockmap); nil otherwise.
	Kernel *sockmap.TunnelState
	// Client and Upstream are the sockets; Adopt takes them over (and closes them on an error).
	Client, Upstream *os.File
}

// Adopt registers a tunnel handed over by the process this one replaces: under its own id unless this
// process gave it to a tunnel of its own, with the upstream server's lease when the server is still in
// its pool (a server the configuration dropped leaves it without one), on this process's engine of its
// datapath (plain copy tunnels on the event loops). It takes the tunnel's slots under this process's
// limits and its listener's, even past them (a live tunnel is not reset for a limit), so that handshakes
// are refused until enough tunnels end. It does not carry it yet: CarryAdopted does, once the old
// process has let go; DropAdopted forgets it.
func (s *Server) Adopt(a Adoption) (*Tunnel, error) {
	client, err := tcpConnOfFile(a.Client)
	if err != nil {
		a.Upstream.Close()
		return nil, fmt.Errorf("client socket: %w", err)
	}
	up, err := tcpConnOfFile(a.Upstream)
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("upstream socket: %w", err)
	}
	kind, err := s.adoptedKind(a, client, up)
	if err != nil {
		client.Close()
		up.Close()
		return nil, err
	}
	ip := a.ClientIP
	if ip == "" {
		ip, _, _ = net.SplitHostPort(a.ClientAddr)
	}
	t := &Tunnel{
		Started: a.Started, ClientAddr: a.ClientAddr, UpstreamAddr: a.UpstreamAddr,
		Pool: a.Pool, Listener: a.Listener, halfClosedTimeout: a.HalfClosedTimeout,
		lease: s.adoptLease(a.Pool, a.UpstreamAddr), req: requestInfo{uri: a.URI, host: a.Host, userAgent: a.UserAgent},
		clientIP: ip, releaseSlot: s.holdSlots(a.Listener, ip),
		adopted: &adoption{activeAt: a.LastActive, kernel: a.Kernel},
	}
	t.parked.Store(true)
	t.pair = datapath.RestorePair(kind, datapath.Endpoint{Conn: client}, datapath.Endpoint{Conn: up}, a.State,
		func(*datapath.Pair) { s.tunnelEnded(t) })
	if err := s.tunnels.adopt(t, a.ID); err != nil {
		if t.lease != nil {
			t.lease.Release()
		}
		t.releaseSlot()
		client.Close()
		up.Close()
		return nil, err
	}
	t.pair.ID = t.ID
	s.metrics.tunnelsActive.WithLabelValues(string(t.Datapath())).Inc()
	return t, nil
}

// holdSlots counts an adopted tunnel under the server's limits and its listener's; the returned function
// gives its slots back.
func (s *Server) holdSlots(listener, ip string) func() {
	s.listenersMu.Lock()
	own := s.listenerLimiters[listener]
	s.listenersMu.Unlock()
	release := s.limiter.holdTunnel(ip)
	if own == nil {
		return release
	}
	releaseOwn := own.holdTunnel(ip)
	return func() {
		release()
		releaseOwn()
	}
}

// adoptLease takes a lease on the pool's server of that address, whatever its max_tunnels (the tunnel
// exists already); nil when this process's configuration has no such pool or server.
func (s *Server) adoptLease(pool, addr string) *upstream.Lease {
	for _, p := range s.Router().Pools() {
		if p.Name() != pool {
			continue
		}
		for _, srv := range p.Servers() {
			if srv.Address() == addr {
				return srv.Adopt()
			}
		}
	}
	s.log.Warn("adopted tunnel's upstream server is not in this configuration: it runs on without a lease",
		"pool", pool, "upstream", addr)
	return nil
}

// CarryAdopted starts carrying an adopted tunnel: the old process has let go of it. Where its listener
// here is on auto, auto's policy moves it from then on.
func (s *Server) CarryAdopted(t *Tunnel) {
	t.parked.Store(false)
	s.logOpened(t)
	defer s.trackCarried(t)
	if t.adopted != nil && t.adopted.kernel != nil {
		s.carryAdoptedKernel(t)
		return
	}
	s.engine(t.pair.Kind()).Carry(t.pair)
}

// DropAdopted forgets an adopted tunnel the old process keeps after all: it closes this process's
// descriptors only (neither FIN nor reset reaches a peer).
func (s *Server) DropAdopted(t *Tunnel) { t.end(ReasonHandedBack, false) }

// tcpConnOfFile makes a Go connection of a TCP socket's file, which it closes.
func tcpConnOfFile(f *os.File) (*net.TCPConn, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("%s is not a TCP socket", f.Name())
	}
	return tc, nil
}
