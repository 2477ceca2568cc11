// Package eventloop carries plain TCP tunnels on a few event loops, each a goroutine that blocks in epoll_wait on
// its own epoll instance, instead of two goroutines and two buffers per tunnel.
//
// A tunnel's two descriptors are taken out of Go's netpoller (duplicated, then the Go connections are closed),
// so a message wakes one loop thread and no goroutine. An idle tunnel holds no buffer: a direction borrows one
// from its loop only while it holds bytes its destination would not take, and gives it back once they are sent.
// A direction holding bytes does not read its source, so TCP's own window stops the sender and the memory the
// loop holds for a tunnel is bounded by one buffer per direction (2 × Options.BufSize), on top of the kernel's
// socket buffers.
//
// The package imports nothing from the relay: datapath.EventLoop wraps it into the datapath.Engine contract.
package eventloop

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by Carry once Close has been called.
var ErrClosed = errors.New("eventloop: loops are closed")

// ErrEnded is returned by Handle.Detach when the tunnel has already ended (its onEnd says how).
var ErrEnded = errors.New("eventloop: the tunnel has ended")

// Options configures Start. Zero fields take the defaults named on each.
type Options struct {
	// Loops is the number of event loops, each on its own OS thread. Default runtime.NumCPU().
	Loops int
	// BufSize is the size of the buffer a direction borrows while it holds unsent bytes, and so the most a
	// read takes from a socket at once. Default 64 KiB.
	BufSize int
	// KeepFree is how many drained buffers each loop keeps for reuse rather than handing them to the garbage
	// collector. Default 64.
	KeepFree int
	// PipeSize is the capacity asked for the pipe a splice tunnel's direction borrows while bytes sit in it
	// (Spec.Splice), and so the most one splice takes from a socket. Default 64 KiB.
	PipeSize int
	// KeepPipes is how many empty pipes each loop keeps for reuse (two descriptors each); beyond it a drained
	// pipe is closed. Default 16.
	KeepPipes int
	// NewPipe, when set, stands in for pipe2(2) (tests run out of descriptors with it). It returns the read
	// and write ends, nonblocking.
	NewPipe func(size int) (r, w int, err error)
}

func (o Options) withDefaults() (Options, error) {
	if o.Loops < 0 || o.BufSize < 0 || o.KeepFree < 0 || o.PipeSize < 0 || o.KeepPipes < 0 {
		return o, fmt.Errorf("eventloop options: Loops (%d), BufSize (%d), KeepFree (%d), PipeSize (%d) and "+
			"KeepPipes (%d) must not be negative", o.Loops, o.BufSize, o.KeepFree, o.PipeSize, o.KeepPipes)
	}
	if o.Loops == 0 {
		o.Loops = runtime.NumCPU()
	}
	if o.BufSize == 0 {
		o.BufSize = 64 << 10
	}
	if o.KeepFree == 0 {
		o.KeepFree = 64
	}
	if o.PipeSize == 0 {
		o.PipeSize = defaultPipeSize
	}
	if o.KeepPipes == 0 {
		o.KeepPipes = 16
	}
	return o, nil
}

// Loops is a set of running event loops. Its methods are safe for concurrent use.
type Loops struct {
	loops    []*loop
	bufSize  int
	pipeSize int
	next     atomic.Uint32 // round-robin choice of the loop for the next tunnel
	mu       sync.Mutex    // guards closed against Carry racing Close
	closed   bool
}

// Start opens and starts opts.Loops event loops. On error nothing is left open.
func Start(opts Options) (*Loops, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	ls := &Loops{bufSize: opts.BufSize, pipeSize: opts.PipeSize}
	for i := range opts.Loops {
		l, err := newLoop(i, opts)
		if err != nil {
			ls.Close()
			return nil, fmt.Errorf("start event loop %d: %w", i, err)
		}
		ls.loops = append(ls.loops, l)
		go l.run()
	}
	return ls, nil
}

// Carry moves bytes between a and b until both have sent FIN, either resets or fails, or the Handle is closed.
// aPeeked are bytes already read from a that b must get before anything else read from a; bPeeked likewise the
// other way. On success a and b are closed: the tunnel owns duplicates of their descriptors. On error a and b
// are left open and untouched, and nothing Carry opened is left open.
//
// onEnd is called once, on the loop's thread, when the tunnel ends; it must not block, and must not call
// Loops.Close, which waits for that thread.
func (ls *Loops) Carry(a, b *net.TCPConn, aPeeked, bPeeked []byte, onEnd func(End)) (*Handle, error) {
	return ls.CarryWith(a, b, Spec{APeeked: aPeeked, BPeeked: bPeeked, OnEnd: onEnd})
}

// Spec is what CarryWith needs of a tunnel besides its sockets.
type Spec struct {
	// APeeked and BPeeked are as Carry's aPeeked and bPeeked.
	APeeked, BPeeked []byte
	// Finished marks the directions (0: a→b, 1: b→a) that carried their FIN before the loop took the tunnel (it
	// moved here from another engine): they are neither read nor shut down again.
	Finished [2]bool
	// OnEnd is as Carry's onEnd.
	OnEnd func(End)
	// OnFIN, when set, is called on the loop's thread when direction dir (0: a→b, 1: b→a) has carried its FIN,
	// after its last byte; like OnEnd, it must not block.
	OnFIN func(dir int)
	// Owner, when set, is told of the FINs and the end instead of OnEnd and OnFIN (which are then ignored):
	// one interface that the caller's own record of the tunnel implements, where two funcs would be two
	// closures every idle tunnel keeps.
	Owner Owner
	// Splice moves the tunnel's bytes with splice(2) through a pipe each direction borrows while bytes sit in
	// it (Options.PipeSize), rather than through a buffer: they never enter userspace. Peeked bytes are still
	// written from memory, first. A direction that cannot have a pipe (out of descriptors) reads into a buffer
	// instead, until a pipe can be had.
	Splice bool
}

// Owner is told, on the loop's thread, what Spec.OnFIN and Spec.OnEnd are told; its methods must not block.
type Owner interface {
	TunnelFIN(dir int)
	TunnelEnded(End)
}

// owner is s.Owner, or s's funcs as an Owner (nil when there are none).
func (s Spec) owner() Owner {
	if s.Owner != nil {
		return s.Owner
	}
	if s.OnEnd == nil && s.OnFIN == nil {
		return nil
	}
	return funcOwner{onEnd: s.OnEnd, onFIN: s.OnFIN}
}

// funcOwner is an Owner made of Spec.OnEnd and Spec.OnFIN, either of which may be nil.
type funcOwner struct {
	onEnd func(End)
	onFIN func(dir int)
}

func (o funcOwner) TunnelFIN(dir int) {
	if o.onFIN != nil {
		o.onFIN(dir)
	}
}

func (o funcOwner) TunnelEnded(e End) {
	if o.onEnd != nil {
		o.onEnd(e)
	}
}

// CarryWith is Carry with the whole Spec.
func (ls *Loops) CarryWith(a, b *net.TCPConn, s Spec) (*Handle, error) {
	afd, err := detach(a)
	if err != nil {
		return nil, fmt.Errorf("carry: take side a's descriptor: %w", err)
	}
	bfd, err := detach(b)
	if err != nil {
		unix.Close(afd)
		return nil, fmt.Errorf("carry: take side b's descriptor: %w", err)
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.closed {
		unix.Close(afd)
		unix.Close(bfd)
		return nil, ErrClosed
	}
	l := ls.loops[int(ls.next.Add(1))%len(ls.loops)]
	if err := l.watch([2]int{afd, bfd}); err != nil {
		unix.Close(afd)
		unix.Close(bfd)
		return nil, fmt.Errorf("carry: %w", err)
	}
	// Both duplicates exist and are watched, so the Go connections can go: closing them takes the original
	// descriptors out of Go's netpoller (it deletes them from its epoll before closing), and the sockets live
	// on in the duplicates.
	_ = a.Close()
	_ = b.Close()
	t := newTunnel(l, afd, bfd, s.APeeked, s.BPeeked, s.owner())
	t.splice = s.Splice
	for i, done := range s.Finished {
		if done {
			t.dirs[i].out, t.dirs[i].eof, t.dirs[i].shut = nil, true, true
		}
	}
	t.unsent.Store(int64(len(t.dirs[0].out) + len(t.dirs[1].out)))
	l.send(command{kind: cmdAdd, t: t})
	return &Handle{t: t}, nil
}

// detach returns a non-blocking duplicate of c's descriptor, which Go's netpoller does not watch.
func detach(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("raw conn: %w", err)
	}
	fd := -1
	var dupErr error
	err = rc.Control(func(orig uintptr) {
		fd, dupErr = unix.FcntlInt(orig, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err == nil {
		err = dupErr
	}
	if err != nil {
		return -1, fmt.Errorf("dup: %w", err)
	}
	// O_NONBLOCK lives on the open file description, which the duplicate shares with Go's (already
	// non-blocking) descriptor; set it anyway so the loop never depends on how the conn was made.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("set O_NONBLOCK: %w", err)
	}
	return fd, nil
}

// LoopStats is one loop's counters.
type LoopStats struct {
	Tunnels      int64 // tunnels the loop carries now
	Events       int64 // readiness events handled since start
	Wakeups      int64 // epoll_wait calls that returned since start
	BuffersInUse int64 // buffers lent to directions holding unsent bytes
	PipesInUse   int64 // pipes lent to splice directions holding unsent bytes
	PipesFree    int64 // empty pipes kept for reuse (Options.KeepPipes at most)
	PipeFailures int64 // pipes that could not be made since start; the direction read into a buffer instead
}

// Stats returns each loop's counters, in loop order.
func (ls *Loops) Stats() []LoopStats {
	out := make([]LoopStats, len(ls.loops))
	for i, l := range ls.loops {
		out[i] = LoopStats{
			Tunnels:      l.tunnels.Load(),
			Events:       l.events.Load(),
			Wakeups:      l.wakeups.Load(),
			BuffersInUse: l.buffersInUse.Load(),
			PipesInUse:   l.pipesInUse.Load(),
			PipesFree:    l.pipesFree.Load(),
			PipeFailures: l.pipeFailures.Load(),
		}
	}
	return out
}

// BufSize is the size of the buffer a direction borrows while it holds unsent bytes (Options.BufSize).
func (ls *Loops) BufSize() int { return ls.bufSize }

// PipeSize is the capacity asked for a splice tunnel's pipe (Options.PipeSize); the kernel may give less once
// the user's pipe allowance is spent, never more.
func (ls *Loops) PipeSize() int { return ls.pipeSize }

// Close resets every tunnel still carried (their onEnd gets ReasonLoopsClosed), stops the loops and waits for
// their threads to finish. Draining tunnels first is the caller's job. Close is safe to call twice.
func (ls *Loops) Close() {
	ls.mu.Lock()
	wasClosed := ls.closed
	ls.closed = true
	ls.mu.Unlock()
	if wasClosed {
		return
	}
	for _, l := range ls.loops {
		l.send(command{kind: cmdStop})
	}
	for _, l := range ls.loops {
		<-l.stopped
	}
}

// Side names one of a tunnel's two sockets.
type Side int8

const (
	SideNone Side = -1 // the tunnel was ended by Handle.Close or Loops.Close
	SideA    Side = 0
	SideB    Side = 1
)

func (s Side) String() string {
	switch s {
	case SideA:
		return "a"
	case SideB:
		return "b"
	}
	return "none"
}

// Reason says how a tunnel ended.
type Reason int8

const (
	ReasonClosed      Reason = iota // both sides sent FIN and every byte was delivered
	ReasonResetByA                  // a reset (ECONNRESET/EPIPE on a); b was reset
	ReasonResetByB                  // b reset; a was reset
	ReasonError                     // another socket error; both were reset
	ReasonLocalClose                // Handle.Close(false): both sockets closed with FIN
	ReasonLocalAbort                // Handle.Close(true): both sockets reset
	ReasonLoopsClosed               // Loops.Close: both sockets reset
)

func (r Reason) String() string {
	return [...]string{"closed", "reset by a", "reset by b", "error", "local close", "local abort",
		"loops closed"}[r]
}

// End describes how a tunnel ended.
type End struct {
	First  Side   // the side whose FIN, reset or error came first
	Reason Reason // how it ended
	Err    error  // the socket error behind ReasonResetBy*/ReasonError, wrapped with what was being done
	AToB   int64  // bytes written to b, peeked bytes included
	BToA   int64  // bytes written to a, peeked bytes included
	Unsent int64  // bytes the loop held and could not deliver
}

// Handle is a carried tunnel. Its methods are safe for concurrent use and read only the loop's own counters.
type Handle struct{ t *tunnel }

// Bytes returns the bytes written so far each way.
func (h *Handle) Bytes() (aToB, bToA int64) {
	return h.t.written[0].Load(), h.t.written[1].Load()
}

// Reads returns how many reads returned bytes so far each way, modulo 2³² (the two counts share one
// atomic): with Bytes, the bytes per read. The difference of two readings a wrap apart is still right in
// uint32 arithmetic.
func (h *Handle) Reads() (aToB, bToA uint32) {
	n := uint64(h.t.reads.Load())
	return uint32(n), uint32(n >> 32)
}

// LastActive returns when bytes last moved, to the loop's clock (read once per epoll_wait); it is the tunnel's
// start until then. Idle timeouts compare it with now, with no system call per tunnel.
func (h *Handle) LastActive() time.Time {
	return time.Unix(0, h.t.lastActive.Load())
}

// Unsent returns the bytes the loop holds for the tunnel that their destination has not yet taken.
func (h *Handle) Unsent() int64 { return h.t.unsent.Load() }

// Queued reports whether bytes of the tunnel wait to reach a peer: held by the loop, or in either socket's send
// queue (SIOCOUTQ), which a clean close would hide from the peer if they never arrive. The loop's thread reads the
// queues, since only it may touch the descriptors; Queued waits for it, and is false once the tunnel has ended.
func (h *Handle) Queued() bool {
	if h.t.unsent.Load() > 0 {
		return true
	}
	reply := make(chan bool, 1)
	if !h.t.loop.send(command{kind: cmdQueued, t: h.t, reply: reply}) {
		return false // the loop has stopped: the tunnel ended with it
	}
	return <-reply
}

// Progress sums what TCP has moved on the tunnel's sockets: bytes each received and bytes each sent and had
// acknowledged (TCP_INFO), so that it moves while a slow reader drains a full send buffer, which the loop's
// own counts (Bytes, LastActive) do not show until its next write. The loop's thread reads it, since only it
// may touch the descriptors; Progress waits for it. Once the tunnel has ended it returns the bytes written
// both ways.
func (h *Handle) Progress() uint64 {
	reply := make(chan uint64, 1)
	if !h.t.loop.send(command{kind: cmdProgress, t: h.t, progress: reply}) {
		return h.t.writtenBoth() // the loop has stopped: the tunnel ended with it
	}
	return <-reply
}

// Detached is what Handle.Detach leaves of a tunnel given back alive.
type Detached struct {
	// Pending are the bytes read from a (index 0) and from b (index 1) that the other side has not taken: they
	// must reach it before anything else read from that side. A side whose EOF was read but whose FIN was not
	// carried yet reads EOF again.
	Pending [2][]byte
	AToB    int64 // bytes written to b so far, peeked bytes included
	BToA    int64 // bytes written to a so far
}

// Detach gives the tunnel back alive, at a byte boundary. On the loop's thread, while the descriptors are still
// the loop's, it duplicates both and calls take with the duplicates, which take then owns (net.FileConn of
// them, for example); then the loop forgets the tunnel and closes its own descriptors, and onEnd is never
// called. If duplicating fails (EMFILE) or take returns an error, the tunnel carries on as if Detach had not
// been called (take must have closed what it was given). ErrEnded: the tunnel ended first.
func (h *Handle) Detach(take func(afd, bfd int) error) (Detached, error) {
	answer := make(chan detachResult, 1)
	if !h.t.loop.send(command{kind: cmdDetach, t: h.t, take: take, detached: answer}) {
		return Detached{}, ErrEnded
	}
	r := <-answer
	return r.d, r.err
}

// Close ends the tunnel: with abort both sockets are reset (SO_LINGER 0), without it both are closed, which
// sends FIN after what the kernel already holds (or RST, as close(2) does, from a socket with unread bytes in
// its receive queue). Bytes the loop itself still holds are dropped (End.Unsent).
// It returns before the tunnel has ended; onEnd says when. Closing an ended tunnel does nothing.
func (h *Handle) Close(abort bool) {
	h.t.loop.send(command{kind: cmdClose, t: h.t, abort: abort})
}
