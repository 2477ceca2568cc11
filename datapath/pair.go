package datapath

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Endpoint is one side of a tunnel after its handshake.
type Endpoint struct {
	Conn *net.TCPConn
	// TLS, when set, runs over Conn: the tunnel's bytes are read from and written to it.
	TLS *tls.Conn
	// Peeked are bytes the handshake read from Conn past its own end (frames pipelined behind a request,
	// bytes sent with a 101, what a PROXY header reader or a ClientHello peek held): they reach the other
	// side before any byte an engine moves.
	Peeked []byte
}

// Reasons a pair ends for, as engines report them; they label logs and metrics.
const (
	ReasonClosed        = "closed"         // both sides sent FIN
	ReasonClientReset   = "client_reset"   // the client reset its connection
	ReasonUpstreamReset = "upstream_reset" // the upstream reset its connection
	ReasonClientError   = "client_error"   // reading from or writing to the client failed
	ReasonUpstreamError = "upstream_error" // reading from or writing to the upstream failed
	ReasonStalled       = "stalled"        // kernel pair whose bytes stopped reaching the peer
	// ReasonOverflow: a kernel pair whose peers both stopped reading while both kept sending; the kernel
	// would otherwise hold their bytes without bound (datapath/sockmap, backpressure).
	ReasonOverflow = "overflow"
	// ReasonKernelError: the kernel datapath could not keep a pair's stream exact (bpf/sockrelay.c,
	// trim_head), so the pair is reset rather than corrupted.
	ReasonKernelError = "kernel_error"
	// ReasonShutdown: the engine was closed under a live pair (the relay drains pairs before it closes
	// its engines, and ends those left with this reason itself).
	ReasonShutdown = "shutdown"
)

// Pair is two connected endpoints, the client's and the upstream's, and the bytes moved between them.
type Pair struct {
	// ID names the pair in engines' logs (the relay's tunnel id).
	ID uint64

	client, upstream Endpoint

	// Bytes moved by userspace, and for kernel pairs, the kernel's final counts once folded in.
	toUpstream, toClient atomic.Uint64
	// finished records, per direction (client → upstream, upstream → client), that its FIN was carried.
	finished [2]atomic.Bool
	// halfClosedAt is when the first FIN was carried (UnixNano), 0 until then.
	halfClosedAt atomic.Int64

	mu      sync.Mutex
	kind    Kind
	ending  bool
	aborted bool // the pair ends with its sockets reset; set with ending, read by Carrier.Release
	// endOnce sits beside the two bools above, which fill its padding: every idle pair is 8 bytes smaller.
	endOnce sync.Once
	carrier Carrier
	// lastActive is when the last engine saw a byte (UnixNano, 0 for none), kept when it let go of the
	// pair (Park, RestorePair): 8 bytes rather than a time.Time's 24, in every idle pair.
	lastActive int64

	// done is the channel Done returns, closed when the pair has ended: made by the first Done, since
	// most pairs are never waited on and a channel costs an idle pair 96 bytes, or set to closedDone by
	// the end if none was made by then.
	done atomic.Pointer[chan struct{}]
	// ended is why the pair ended and the failure that did, if one did: made by the end, written once
	// before done is closed (a live pair keeps one pointer, not a string and an error).
	ended *pairEnd
	onEnd func(*Pair)
}

// pairEnd is why a pair ended.
type pairEnd struct {
	reason string
	err    error
}

// closedDone is the Done of every pair that ended before anyone asked for its Done.
var closedDone = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// NewPair returns a pair of client and upstream that kind is to carry. onEnd, when set, runs once after
// both sockets are closed.
func NewPair(kind Kind, client, upstream Endpoint, onEnd func(*Pair)) *Pair {
	return &Pair{client: client, upstream: upstream, kind: kind, onEnd: onEnd}
}

// Client and Upstream return the pair's endpoints without their peeked bytes, which belong to whichever
// engine carries the pair (Direction.WritePeeked). TLS never changes after NewPair; Conn changes only when
// an engine gives the pair back (Stop, during a Move, under the pair's lock), as a new connection of the
// same socket: an engine reads them when it starts to carry the pair, not before. Conn is nil while an
// engine that owns the sockets' descriptors carries the pair (Hold), and after it ended the pair.
func (p *Pair) Client() Endpoint   { return Endpoint{Conn: p.client.Conn, TLS: p.client.TLS} }
func (p *Pair) Upstream() Endpoint { return Endpoint{Conn: p.upstream.Conn, TLS: p.upstream.TLS} }

// TLS reports whether either endpoint runs TLS.
func (p *Pair) TLS() bool { return p.client.TLS != nil || p.upstream.TLS != nil }

// Kind is the datapath that carries the pair, or is to.
func (p *Pair) Kind() Kind {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.kind
}

// SetKind records which datapath is to carry the pair, before any carries it (a choice that changed
// before Carry).
func (p *Pair) SetKind(k Kind) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.kind = k
}

// Hold makes c the pair's carrier, for kind. attach, when set, runs first under the pair's lock: an engine
// takes the sockets into its own tables there, so that an End that runs meanwhile finds them and
// releases them. held is false when the pair is already ending, or when attach failed (its error): then
// the engine must not carry the pair.
func (p *Pair) Hold(kind Kind, c Carrier, attach func() error) (held bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ending {
		return false, nil
	}
	if attach != nil {
		if err := attach(); err != nil {
			return false, err
		}
	}
	p.kind, p.carrier = kind, c
	if ownsSockets(c) {
		// The carrier closed the conns (they are its descriptors now): an idle pair should not keep two
		// closed conns, their addresses and poller records alive (about 600 bytes a pair).
		p.client.Conn, p.upstream.Conn = nil, nil
	}
	return true, nil
}

// ownsSockets reports whether c took the pair's sockets out of their conns and closed those: the kernel
// engine (a SocketOwner) and the event loop (an activityReporter).
func ownsSockets(c Carrier) bool {
	switch c.(type) {
	case SocketOwner, activityReporter:
		return true
	}
	return false
}

// Let drops c as the pair's carrier without releasing it (the engine gave the pair back alive); false
// when the pair is ending or c no longer holds it.
func (p *Pair) Let(c Carrier) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ending || p.carrier != c {
		return false
	}
	p.carrier = nil
	return true
}

// GiveBack drops c as the pair's carrier with the pair alive, for a carrier that took the pair's sockets
// from their conns (a SocketOwner): client and upstream, new connections of the same sockets, replace the
// pair's, and held[i], bytes direction i's carrier read from its source but did not write, go after the
// source's peeked bytes, for the next engine to write first. detach runs first under the pair's lock, as
// Hold's attach does: the carrier lets go of the sockets there. false, with nothing changed and detach not
// run, when the pair is ending or c no longer holds it; detach's error also leaves the pair as it was.
func (p *Pair) GiveBack(c Carrier, client, upstream *net.TCPConn, held [2][]byte, detach func() error) (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ending || p.carrier != c {
		return false, nil
	}
	if err := detach(); err != nil {
		return false, err
	}
	p.client.Conn, p.upstream.Conn = client, upstream
	p.client.Peeked = append(p.client.Peeked, held[0]...)
	p.upstream.Peeked = append(p.upstream.Peeked, held[1]...)
	p.carrier = nil
	return true, nil
}

// Carrier is the engine's hold on the pair now; nil while no engine carries it.
func (p *Pair) Carrier() Carrier {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.carrier
}

// Holds reports whether c holds the pair and the pair is not ending. The caller holds nothing of its own
// engine's that Hold or End could wait on.
func (p *Pair) Holds(c Carrier) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.ending && p.carrier == c
}

// Bytes counts bytes moved so far each way, handshake excluded, the carrier's pending counts included.
func (p *Pair) Bytes() (toUpstream, toClient uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	toUpstream, toClient = p.toUpstream.Load(), p.toClient.Load()
	if p.carrier != nil {
		up, down := p.carrier.Pending()
		toUpstream += up
		toClient += down
	}
	return toUpstream, toClient
}

// AddBytes folds bytes an engine moved outside the pair's counters into them (a kernel pair's final counts).
func (p *Pair) AddBytes(toUpstream, toClient uint64) {
	p.toUpstream.Add(toUpstream)
	p.toClient.Add(toClient)
}

// LastActive is when the carrier last saw a byte either way; false when it cannot tell or saw none.
func (p *Pair) LastActive() (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.carrier == nil {
		return time.Time{}, false
	}
	at := p.carrier.LastActive()
	return at, !at.IsZero()
}

// MarkHalfClosed records that a direction has carried its FIN; only the first call counts.
func (p *Pair) MarkHalfClosed() {
	p.halfClosedAt.CompareAndSwap(0, time.Now().UnixNano())
}

// HalfClosedSince is when the pair's first FIN was carried; false while neither direction has finished.
func (p *Pair) HalfClosedSince() (time.Time, bool) {
	ns := p.halfClosedAt.Load()
	if ns == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, ns), true
}

// Done is closed when the pair has ended and both sockets are closed.
func (p *Pair) Done() <-chan struct{} {
	if d := p.done.Load(); d != nil {
		return *d
	}
	c := make(chan struct{})
	if p.done.CompareAndSwap(nil, &c) {
		return c
	}
	return *p.done.Load() // the end or another Done came first
}

// hasEnded reports whether the pair has ended (Done is closed), without making Done's channel.
func (p *Pair) hasEnded() bool {
	d := p.done.Load()
	if d == nil {
		return false
	}
	select {
	case <-*d:
		return true
	default:
		return false
	}
}

// Reason says why the pair ended; it is empty until Done is closed.
func (p *Pair) Reason() string {
	if p.hasEnded() {
		return p.ended.reason
	}
	return ""
}

// Err is the failure that ended the pair, if one did; nil until Done is closed.
func (p *Pair) Err() error {
	if p.hasEnded() {
		return p.ended.err
	}
	return nil
}

// End closes both sockets and reports the pair's end once. With abort, both sockets are reset (SO_LINGER
// 0) rather than closed: an error in one direction means the stream is incomplete, and a peer must not
// mistake it for a clean end.
func (p *Pair) End(reason string, abort bool) { p.Fail(reason, nil, abort) }

// Fail is End with the error that ended the pair.
func (p *Pair) Fail(reason string, err error, abort bool) {
	p.endOnce.Do(func() {
		p.mu.Lock()
		p.ending, p.aborted = true, abort
		if p.carrier != nil {
			if o, ok := p.carrier.(SocketOwner); ok && abort {
				c, u := o.Sockets()
				resetOnClose(c)
				resetOnClose(u)
			}
			p.carrier.Release()
			p.carrier = nil
		}
		p.mu.Unlock()
		for _, c := range [2]*net.TCPConn{p.client.Conn, p.upstream.Conn} {
			if c == nil {
				continue // the carrier that owned the sockets closed them (Release)
			}
			if abort {
				_ = c.SetLinger(0)
			}
			_ = c.Close()
		}
		p.ended = &pairEnd{reason: reason, err: err}
		if !p.done.CompareAndSwap(nil, &closedDone) {
			close(*p.done.Load()) // a Done made it first
		}
		if p.onEnd != nil {
			p.onEnd(p)
		}
	})
}

// EndIfHeld is End, only while c holds the pair; it reports whether it ended it.
func (p *Pair) EndIfHeld(c Carrier, reason string, abort bool) bool {
	return p.FailIfHeld(c, reason, nil, abort)
}

// FailIfHeld is Fail, only while c holds the pair and it is not ending; it reports whether it ended it.
// An engine that decided to end a pair while holding only its own lock, and ends it after releasing that
// lock, calls this: meanwhile it may have given the pair back (GiveBack, Let), and another engine may
// carry it now, which must not be ended for the first one's reason.
func (p *Pair) FailIfHeld(c Carrier, reason string, err error, abort bool) bool {
	p.mu.Lock()
	held := !p.ending && p.carrier == c
	if held {
		// Hold, Let and GiveBack refuse an ending pair: c stays its carrier until Fail releases it.
		p.ending = true
	}
	p.mu.Unlock()
	if held {
		p.Fail(reason, err, abort)
	}
	return held
}

// resetOnClose makes the close of fd send a reset (SO_LINGER 0), as SetLinger(0) does for a conn.
func resetOnClose(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
}

// eachSocket calls f with the descriptor of each of the pair's sockets that is still open: its
// SocketOwner's, under the pair's lock so that Release cannot close them meanwhile, else its conns'.
func (p *Pair) eachSocket(f func(fd int)) {
	p.mu.Lock()
	if o, ok := p.carrier.(SocketOwner); ok {
		c, u := o.Sockets()
		f(c)
		f(u)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	for _, c := range [2]*net.TCPConn{p.client.Conn, p.upstream.Conn} {
		if c == nil {
			continue // an owner of the sockets held the pair, and has let go of it (Release)
		}
		if raw, err := c.SyscallConn(); err == nil {
			_ = raw.Control(func(fd uintptr) { f(int(fd)) })
		}
	}
}

// Ending reports whether the pair has begun to end.
func (p *Pair) Ending() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ending
}

// Unsent says whether either socket still has bytes in its send queue (SIOCOUTQ), which a clean close
// would hide from the peer if they never arrive.
func (p *Pair) Unsent() bool {
	if o, ok := p.activityReporter(); ok {
		return o.Unsent()
	}
	unsent := false
	p.eachSocket(func(fd int) {
		if n, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ); err == nil && n > 0 {
			unsent = true
		}
	})
	return unsent
}

// Progress sums what TCP has moved on the pair's two sockets: bytes each received and bytes each sent and
// had acknowledged (TCP_INFO). It moves whenever a byte moves on either connection, whatever the engine:
// a slow reader draining a full buffer counts, although the pair's own counters move only when a whole
// write completes.
//
// A carrier that owns the pair's descriptors itself (the event loop) answers from its own counters, with
// no system call.
func (p *Pair) Progress() uint64 {
	if o, ok := p.activityReporter(); ok {
		return o.Progress()
	}
	var sum uint64
	p.eachSocket(func(fd int) {
		if ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			sum += ti.Bytes_acked + ti.Bytes_received
		}
	})
	return sum
}

// An activityReporter is a carrier that took the pair's descriptors out of its Go connections and answers
// Unsent and Progress itself (the event loop, from its own thread), so that the pair asks it rather than
// the connections. The kernel engine, which only holds the descriptors, is a SocketOwner instead.
type activityReporter interface {
	Carrier
	Unsent() bool
	Progress() uint64
}

// activityReporter returns the pair's carrier if it answers Unsent and Progress itself.
func (p *Pair) activityReporter() (activityReporter, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	o, ok := p.carrier.(activityReporter)
	return o, ok
}
