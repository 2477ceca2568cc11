package sockmap

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
)

// kernelBuffers are the buffers of the handoff's drain: 32 KiB, as the copy engine's.
var kernelBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// dupFD returns a duplicate of c's descriptor (close-on-exec, nonblocking as c's is: they share the open
// file), which the engine owns. A raw descriptor has no finalizer, so the collector never closes the
// socket under the kernel's feet (docs/datapath.md, "The kernel engine owns the sockets' descriptors").
func dupFD(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("F_DUPFD_CLOEXEC: %w", derr)
	}
	return fd, nil
}

// sentBytes is how many bytes have entered fd's send path so far: acknowledged plus still queued. TCP_INFO
// is read before SIOCOUTQ: an ACK landing between the two then makes the sum smaller, never larger, so a
// FIN can be late but never early.
func sentBytes(fd int) (uint64, error) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("TCP_INFO: %w", err)
	}
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		return 0, fmt.Errorf("SIOCOUTQ: %w", err)
	}
	return info.Bytes_acked + uint64(outq), nil
}

func (k *Engine) newSide(kt *kernelTunnel, c *net.TCPConn, isClient bool) (kernelSide, error) {
	fd, err := dupFD(c)
	if err != nil {
		return kernelSide{}, fmt.Errorf("socket descriptor: %w", err)
	}
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		unix.Close(fd)
		return kernelSide{}, fmt.Errorf("SO_COOKIE: %w", err)
	}
	return kernelSide{kt: kt, conn: c, fd: fd, owned: true, cookie: cookie, isClient: isClient}, nil
}

// Carry hands p to the kernel. Userspace's leftovers go first: whatever the handshake read past the request
// and past the 101 is written to the peer, then each socket's receive queue is emptied into its peer, all
// before the sockets enter the map, so those bytes precede every byte the kernel redirects (docs/datapath.md,
// "How a tunnel enters the kernel").
func (k *Engine) Carry(p *datapath.Pair) { k.carryLimited(p, k.heldLimit) }

// carryLimited is Carry with the held limit of both directions given.
func (k *Engine) carryLimited(p *datapath.Pair, heldLimit uint64) {
	kt := &kernelTunnel{k: k, p: p}
	inKernel := false
	defer func() {
		if !inKernel {
			kt.closeSockets() // the pair's conns carry it, or it ended
		}
	}()
	var err error
	if kt.client, err = k.newSide(kt, p.Client().Conn, true); err == nil {
		kt.up, err = k.newSide(kt, p.Upstream().Conn, false)
	}
	if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
		// Out of descriptors for the engine's duplicates: the pair's own conns still carry it in userspace,
		// and no peer did anything wrong.
		k.log.Warn("no descriptor for a kernel tunnel's socket", "id", p.ID, "err", err)
		k.runInUserspace(p, "no_descriptor")
		return
	}
	if err != nil {
		p.Fail(datapath.ReasonClientError, err, true)
		return
	}
	pdirs := p.Directions()
	kt.dirs[0] = kernelDir{kt: kt, src: &kt.client, dst: &kt.up, limit: heldLimit}
	kt.dirs[1] = kernelDir{kt: kt, src: &kt.up, dst: &kt.client, limit: heldLimit}
	for i, d := range pdirs {
		switch err := writeLeftovers(d, kt.dirs[i].src.fd); {
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The destination does not take them: the pair has no carrier meanwhile, so a slow reader
			// would stall both directions (and a move's slot) for as long as it likes.
			k.runInUserspace(p, "slow_reader")
			return
		case errors.Is(err, errSourceClosed):
			// The source already sent its FIN: it cannot enter a sockhash (EOPNOTSUPP from
			// sock_map_sk_state_allowed).
			k.runInUserspace(p, "socket_closing")
			return
		case errors.Is(err, errSourceBusy):
			k.runInUserspace(p, "busy_at_handoff")
			return
		case err != nil:
			p.Fail(d.Blame(err), err, true)
			return
		}
	}
	// Baselines before insertion: a baseline taken after could already include redirected bytes, and the
	// FIN would then never be carried (docs/datapath.md, "What failed").
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		if k.hooks.sndbuf > 0 {
			_ = unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, k.hooks.sndbuf)
		}
		if s.sentBase, err = sentBytes(s.fd); err != nil {
			p.Fail(datapath.ReasonClientError, err, true)
			return
		}
	}

	// Inserted under the pair's lock (Hold), so that a concurrent end (a shutdown) cannot miss the release
	// of what is inserted here.
	held, err := p.Hold(datapath.Sockmap, kt, func() error { return k.attach(kt, heldLimit) })
	inKernel = held
	if !held && err == nil {
		return // the pair ended first
	}
	if err != nil {
		// A socket that already got its FIN (CLOSE_WAIT) cannot enter a sockhash (EOPNOTSUPP from
		// sock_map_sk_state_allowed);
		// such a tunnel runs in userspace instead.
		reason := "insert_failed"
		if errors.Is(err, unix.EOPNOTSUPP) {
			reason = "socket_closing"
		}
		k.log.Debug("tunnel cannot use the kernel datapath", "id", p.ID, "err", err)
		k.runInUserspace(p, reason)
		return
	}
}

// attach puts kt's sockets into the maps and the loop's epoll, then closes their conns so that Go's poller
// forgets them: from here the engine's descriptors are the only ones. It runs under the pair's lock
// (Pair.Hold); on error nothing is left in the maps or the epoll, and the conns are open.
func (k *Engine) attach(kt *kernelTunnel, heldLimit uint64) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	err := k.maps.Insert(loader.Socket{FD: kt.client.fd, Cookie: kt.client.cookie, HeldLimit: heldLimit},
		loader.Socket{FD: kt.up.fd, Cookie: kt.up.cookie, HeldLimit: heldLimit})
	if err != nil {
		return err
	}
	if err := k.enterLoop(kt); err != nil {
		_ = k.maps.Remove(loader.Socket{Cookie: kt.client.cookie}, loader.Socket{Cookie: kt.up.cookie})
		return err
	}
	kt.forgetConns()
	// Bytes that arrived between the last userspace read and the insertion sit in the receive queue, and
	// the verdict runs only on data_ready. Setting SO_RCVLOWAT makes TCP call data_ready (tcp_set_rcvlowat),
	// which runs the verdict over them now instead of when the sender next speaks (docs/datapath.md,
	// "How a tunnel enters the kernel").
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		_ = unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
	}
	return nil
}

// SetFallback makes e carry the pairs that cannot enter the kernel, instead of the goroutine Copier: the relay
// passes its copy engine, so that such a pair (one moved from the event loops, most often) lands back on the
// loops, whose counters auto's policy reads, rather than on goroutines that keep none, for good.
func (k *Engine) SetFallback(e datapath.Engine) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.fallback = e
}

// runInUserspace hands a pair that cannot use the kernel datapath to the fallback engine (copy), then tells
// onFallback, which logs it (the relay's own pairs, those of its start measurement, are no tunnel); the
// engine logs it where there is none.
// Whatever the handoff already wrote is not written again: peeked bytes are written once.
func (k *Engine) runInUserspace(p *datapath.Pair, reason string) {
	k.mu.Lock()
	fallback := k.fallback
	k.mu.Unlock()
	if k.onFallback == nil {
		k.log.Info("tunnel falls back to the copy datapath", "id", p.ID, "reason", reason)
	}
	// The fallback's Hold gives the pair its kind, unless the pair ended first: then it keeps sockmap, under
	// which its end is counted. onFallback is told after, and reads the kind the pair has then.
	fallback.Carry(p)
	if k.onFallback != nil {
		k.onFallback(p, reason)
	}
}

// handoffWriteTimeout bounds what the handoff writes to each destination: the peeked bytes (on a move from
// the event loop, every byte it held) and the source's queued bytes. A destination with room takes them at
// once; one that has none within it is a slow reader, and the pair runs in userspace, where waiting for it
// holds up nothing else.
const handoffWriteTimeout = 250 * time.Millisecond

// writeLeftovers writes d's peeked bytes, then the bytes queued in its source (srcFD), within
// handoffWriteTimeout: on os.ErrDeadlineExceeded what was not written stays d's peeked bytes, for the next
// engine to write first.
func writeLeftovers(d *datapath.Direction, srcFD int) error {
	_ = d.Dst().SetWriteDeadline(time.Now().Add(handoffWriteTimeout))
	defer func() { _ = d.Dst().SetWriteDeadline(time.Time{}) }()
	if err := d.WritePeeked(); err != nil {
		return err
	}
	return drainQueued(d, srcFD)
}

var (
	errSourceClosed = errors.New("source sent FIN before the handoff")
	errSourceBusy   = errors.New("source kept sending during the handoff")
)

// handoffDrainRounds bounds how many reads drainQueued makes before it gives up on a source that keeps its
// receive queue full: such a tunnel stays in userspace rather than hold up the handshake goroutine.
const handoffDrainRounds = 64

// drainQueued reads everything waiting in d's source and writes it to d's destination, until the receive
// queue is empty. The kernel must never see a receive queue that userspace has read part of: tcp_read_skb
// hands whole skbs to the verdict, ignoring how much of the first one recvmsg already consumed, so a
// partly read skb would be redirected again from its start. Measured here before this existed: a client
// received the first 1000 bytes of its stream twice. An empty queue has no partly read skb; what arrives
// after it does arrives in fresh ones.
func drainQueued(d *datapath.Direction, srcFD int) error {
	bp := kernelBuffers.Get().(*[]byte)
	defer kernelBuffers.Put(bp)
	for range handoffDrainRounds {
		n, err := unix.Read(srcFD, *bp) // the descriptor is nonblocking: Go set it so
		switch {
		case err == unix.EAGAIN:
			return nil
		case err == unix.EINTR:
			continue
		case err != nil:
			return datapath.ReadErr(err)
		case n == 0:
			return errSourceClosed
		}
		w, werr := d.Dst().Write((*bp)[:n])
		d.Count(w)
		if errors.Is(werr, os.ErrDeadlineExceeded) {
			d.HoldBackAgain(append([]byte(nil), (*bp)[w:n]...)) // read from the source: they must not be lost
		}
		if werr != nil {
			return datapath.WriteErr(werr)
		}
	}
	return errSourceBusy
}

// enterLoop registers kt's sockets with the loop's epoll and puts kt in its tables: the twin of leaveLoop.
// Hang-up and error only, edge-triggered: each FIN, hang-up or error is reported once, and the data_ready
// that ends every verdict run wakes no one (docs/datapath.md, "The kernel engine owns the sockets'
// descriptors"). On error nothing is left in the epoll. The caller holds k.mu.
func (k *Engine) enterLoop(kt *kernelTunnel) error {
	sides := []*kernelSide{&kt.client, &kt.up}
	for i, s := range sides {
		ev := unix.EpollEvent{Events: unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR | unix.EPOLLET,
			Fd: int32(s.cookie), Pad: int32(s.cookie >> 32)}
		if err := unix.EpollCtl(k.epfd, unix.EPOLL_CTL_ADD, s.fd, &ev); err != nil {
			for _, added := range sides[:i] {
				_ = unix.EpollCtl(k.epfd, unix.EPOLL_CTL_DEL, added.fd, nil)
			}
			return fmt.Errorf("epoll add: %w", err)
		}
	}
	k.socks[kt.client.cookie] = &kt.client
	k.socks[kt.up.cookie] = &kt.up
	return nil
}

// forgetConns closes kt's conns once its sockets are the engine's: Go's runtime takes each descriptor out of
// its epoll (EPOLL_CTL_DEL) and closes it, and the socket lives on through the engine's duplicate. The pair
// forgets its conns (Pair.Hold), and so does each side, so that an idle tunnel keeps no closed conn alive.
func (kt *kernelTunnel) forgetConns() {
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		_ = s.conn.Close()
		s.conn = nil
	}
}
