package eventloop

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/internal/tcpstate"
)

// socket is one of a tunnel's descriptors with the readiness the loop last learned of it.
type socket struct {
	fd       int32 // int32, as epoll names it: the record of an idle tunnel stays small
	readable bool  // an EPOLLIN/RDHUP/HUP/ERR edge came and no read has since returned EAGAIN
	writable bool  // as readable, for EPOLLOUT and writes
	hup      bool  // an EPOLLRDHUP/HUP/ERR was seen: the socket must be read to EAGAIN, EOF or error
	// urgent: an EPOLLPRI edge came (urgent data, MSG_OOB, arrived), so an empty splice may have stopped at
	// its mark (atUrgentMark); cleared once a splice came back empty away from a mark.
	urgent bool
}

// direction moves bytes from one socket to the other. Direction 0 is a→b, 1 is b→a.
type direction struct {
	buf      *[]byte // the borrowed buffer while out lies in it; nil while idle or sending peeked bytes
	out      []byte  // bytes read from src (or peeked) that dst has not yet taken
	pipe     *pipe   // a splice tunnel's borrowed pipe, while bytes sit in it (pipe.held); sent after out
	src, dst uint8   // indices into tunnel.ends (small, and after out: every idle tunnel keeps two directions)
	eof      bool    // src sent FIN
	shut     bool    // the FIN was carried: dst was shut down for writing after the last byte
}

// tunnel is a carried pair of sockets. Fields other than the atomics belong to the loop's thread. Its owner is
// told of the FINs and the end (Spec.Owner, or Spec.OnEnd and OnFIN as a funcOwner).
type tunnel struct {
	loop   *loop
	ends   [2]socket
	dirs   [2]direction
	owner  Owner
	added  bool // its descriptors are registered with the loop
	ended  bool
	queued bool // in loop.again
	splice bool // the directions move bytes through pipes (Spec.Splice)
	first  Side // the side whose FIN came first, for End

	written    [2]atomic.Int64 // bytes written each way (index = direction)
	reads      atomic.Int64    // reads that returned bytes, a→b in the low 32 bits, b→a in the high: segments, for auto's policy
	unsent     atomic.Int64
	lastActive atomic.Int64 // Unix nanoseconds, from the loop's clock
}

func newTunnel(l *loop, afd, bfd int, aPeeked, bPeeked []byte, owner Owner) *tunnel {
	t := &tunnel{loop: l, owner: owner, first: SideNone}
	t.ends[0] = socket{fd: int32(afd), readable: true, writable: true}
	t.ends[1] = socket{fd: int32(bfd), readable: true, writable: true}
	t.dirs[0] = direction{src: 0, dst: 1, out: clone(aPeeked)}
	t.dirs[1] = direction{src: 1, dst: 0, out: clone(bPeeked)}
	t.unsent.Store(int64(len(aPeeked) + len(bPeeked)))
	// The start counts as activity, and is set here rather than when the loop adds the tunnel, so an idle
	// timer reading LastActive right after Carry sees the start, not the zero time.
	t.lastActive.Store(time.Now().UnixNano())
	return t
}

// clone copies peeked bytes, which the caller may reuse once Carry returns.
func clone(p []byte) []byte {
	if len(p) == 0 {
		return nil
	}
	return append([]byte(nil), p...)
}

// ready records the readiness epoll reported for fd and moves what it allows.
func (t *tunnel) ready(fd int32, events uint32) {
	s := &t.ends[0]
	if t.ends[1].fd == fd {
		s = &t.ends[1]
	}
	// A pending error (a reset, most often) ends the tunnel now: the directions may be stalled on the other
	// socket and would not read or write this one until it drains, which may be never.
	if events&unix.EPOLLERR != 0 {
		if soErr, err := unix.GetsockoptInt(int(s.fd), unix.SOL_SOCKET, unix.SO_ERROR); err == nil && soErr != 0 {
			side := SideA
			if s == &t.ends[1] {
				side = SideB
			}
			t.fail(side, fmt.Errorf("side %s: %w", side, unix.Errno(soErr)))
			return
		}
	}
	// HUP and ERR count as both: the next read or write returns the EOF or the error that ends the tunnel.
	if events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.readable = true
	}
	if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.hup = true
	}
	if events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.writable = true
	}
	if events&unix.EPOLLPRI != 0 {
		s.urgent = true
	}
	if !t.queued {
		t.pump()
	}
}

// pump moves what both directions can move now, then ends the tunnel if both have carried their FIN.
func (t *tunnel) pump() {
	for i := range t.dirs {
		if !t.move(&t.dirs[i]) {
			return // the tunnel ended
		}
	}
	if t.dirs[0].shut && t.dirs[1].shut {
		t.end(t.first, ReasonClosed, nil, false)
	}
}

// move runs one direction as far as readiness allows: send what it holds, read more only once that is gone,
// carry the FIN once everything before it is sent. It reports false when the tunnel ended.
func (t *tunnel) move(d *direction) bool {
	src, dst := &t.ends[d.src], &t.ends[d.dst]
	for reads, taken := 0, 0; ; {
		if len(d.out) > 0 {
			if !dst.writable {
				return true // dst's EPOLLOUT edge resumes this direction; src is not read meanwhile
			}
			n, err := send(int(dst.fd), d.out)
			if err == unix.EAGAIN {
				dst.writable = false
				return true
			}
			if err != nil {
				t.fail(Side(d.dst), fmt.Errorf("write to side %s: %w", Side(d.dst), err))
				return false
			}
			d.out = d.out[n:]
			t.written[d.src].Add(int64(n))
			t.unsent.Add(-int64(n))
			t.lastActive.Store(t.loop.now)
			if len(d.out) > 0 {
				continue
			}
			if d.buf != nil {
				t.loop.giveBack(d.buf)
				d.buf = nil
			}
		}
		if d.pipe != nil {
			if sent, ok := t.sendPipe(d, dst); !ok || !sent {
				return ok
			}
		}
		if d.eof {
			if !d.shut {
				d.shut = true
				if err := unix.Shutdown(int(dst.fd), unix.SHUT_WR); err != nil {
					t.fail(Side(d.dst), fmt.Errorf("carry FIN to side %s: %w", Side(d.dst), err))
					return false
				}
				if t.owner != nil {
					t.owner.TunnelFIN(int(d.src))
				}
			}
			return true
		}
		if !src.readable {
			return true
		}
		if reads == passReads || taken >= passBytes {
			t.runAgainLater()
			return true
		}
		reads++
		if t.splice {
			if d.pipe = t.loop.takePipe(); d.pipe != nil {
				ok, atMark := t.spliceIn(d, src)
				if !ok {
					return false
				}
				if !atMark {
					if d.pipe != nil {
						taken += int(d.pipe.held)
					}
					continue
				}
				// Stopped at an urgent mark: this read goes through a buffer, which passes the mark.
			}
			// No pipe to be had: this read goes through a buffer, as a copy tunnel's would.
		}
		if d.buf == nil {
			d.buf = t.loop.borrow()
		}
		n, err := recv(int(src.fd), *d.buf)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			src.readable = false
			t.loop.giveBack(d.buf)
			d.buf = nil
			return true
		}
		if err != nil {
			t.fail(Side(d.src), fmt.Errorf("read from side %s: %w", Side(d.src), err))
			return false
		}
		if n == 0 {
			if !t.atEOF(d) {
				return false
			}
			d.eof = true
			if t.first == SideNone {
				t.first = Side(d.src)
			}
			t.loop.giveBack(d.buf)
			d.buf = nil
			continue
		}
		d.out = (*d.buf)[:n]
		taken += n
		t.unsent.Add(int64(n))
		t.reads.Add(1 << (32 * d.src))
		// A short read took all the socket held: the read that would return EAGAIN is skipped (a message
		// costs one read, not two). Bytes arriving after it raise a new edge, since the kernel wakes epoll on
		// every arrival. Not after a hangup edge: the FIN or error behind it was reported already and no
		// new edge would come for it, so that socket is read until EOF or error. Nor when the read stopped
		// at an urgent mark: TCP ends a read before the urgent byte once it copied anything, with the bytes
		// behind the mark queued and no new edge to come for them (the next read skips the byte and goes on).
		if n < len(*d.buf) && !src.hup && !stoppedAtMark(src) {
			src.readable = false
		}
		// The write comes straight after the read, in the same pass: a small message crosses in one wakeup.
	}
}

// sendPipe splices what d's pipe holds to dst and gives the pipe back once it is empty. sent says the pipe
// was emptied (and given back); ok is false when the tunnel ended.
func (t *tunnel) sendPipe(d *direction, dst *socket) (sent, ok bool) {
	for d.pipe.held > 0 {
		if !dst.writable {
			return false, true // dst's EPOLLOUT edge resumes this direction; src is not read meanwhile
		}
		n, err := spliceOut(d.pipe, int(dst.fd))
		if err == unix.EAGAIN {
			dst.writable = false
			return false, true
		}
		if err == nil && n == 0 {
			err = errors.New("splice moved nothing")
		}
		if err != nil {
			t.fail(Side(d.dst), fmt.Errorf("splice to side %s: %w", Side(d.dst), err))
			return false, false
		}
		d.pipe.held -= int32(n)
		t.written[d.src].Add(int64(n))
		t.unsent.Add(-int64(n))
		t.lastActive.Store(t.loop.now)
	}
	t.loop.putPipe(d.pipe)
	d.pipe = nil
	return true, true
}

// spliceIn moves what src has into d's empty pipe, noting EOF and EAGAIN as move's read does; it reports false
// when the tunnel ended. Unlike a read into a buffer, a short splice does not say the socket is empty (the
// pipe's slots may have run out before its bytes), so src stays readable until a splice returns EAGAIN.
// atMark says the splice stopped at an urgent mark (MSG_OOB) with bytes still queued behind it: the caller
// reads them through a buffer instead (src is left readable and the pipe given back).
func (t *tunnel) spliceIn(d *direction, src *socket) (ok, atMark bool) {
	n, err := spliceIn(int(src.fd), d.pipe)
	if empty := err == unix.EAGAIN || err == nil && n == 0; empty && src.urgent {
		atMark = atUrgentMark(int(src.fd))
		src.urgent = atMark // urgent data arrives whole: away from its mark, the mark is behind the reads
	}
	switch {
	case atMark:
	case err == unix.EAGAIN:
		src.readable = false
	case err != nil:
		t.fail(Side(d.src), fmt.Errorf("splice from side %s: %w", Side(d.src), err))
		return false, false
	case n == 0:
		if !t.atEOF(d) {
			return false, false
		}
		d.eof = true
		if t.first == SideNone {
			t.first = Side(d.src)
		}
	default:
		d.pipe.held = int32(n)
		t.unsent.Add(int64(n))
		return true, false
	}
	t.loop.putPipe(d.pipe) // empty
	d.pipe = nil
	return true, atMark
}

// stoppedAtMark says a short read of src stopped at an urgent mark, with bytes queued behind it. It asks the
// kernel only after an EPOLLPRI edge, and forgets the edge once a read is past the mark.
func stoppedAtMark(src *socket) bool {
	if !src.urgent {
		return false
	}
	src.urgent = atUrgentMark(int(src.fd))
	return src.urgent
}

// atUrgentMark reports whether fd, whose splice has just moved nothing, stopped at an urgent mark (MSG_OOB).
// A TCP splice stops there, returning EAGAIN (or 0 once the FIN is in) with the bytes behind the mark queued,
// and SIOCINQ counts none of them; a read skips the urgent byte (SO_OOBINLINE is off) and goes on. It costs
// an ioctl only where a splice came back empty after urgent data arrived (an EPOLLPRI edge: socket.urgent),
// not at the end of every message.
func atUrgentMark(fd int) bool {
	n, err := unix.IoctlGetInt(fd, unix.SIOCATMARK)
	return err == nil && n != 0
}

// atEOF checks that d's source, whose read returned 0, sent a FIN and was not reset, and reports false when it
// was reset and the tunnel ended: a reset whose error a write took before the loop had the socket (the kernel
// engine's worker during a give-back, a parked tunnel's last write) reads as 0, and carrying it as a FIN would
// let the other peer take a truncated stream for a whole one. The socket's own write side was shut once the
// other direction carried its FIN.
func (t *tunnel) atEOF(d *direction) bool {
	shut := t.dirs[1-d.src].shut // the loop's thread carries that FIN: it cannot change meanwhile
	if err := tcpstate.ResetAtEOF(int(t.ends[d.src].fd), func() bool { return shut }); err != nil {
		t.fail(Side(d.src), fmt.Errorf("read from side %s: %w", Side(d.src), err))
		return false
	}
	return true
}

func (t *tunnel) runAgainLater() {
	if !t.queued {
		t.queued = true
		t.loop.again = append(t.loop.again, t)
	}
}

// fail ends the tunnel after a socket error on side s: both sockets are reset, so the other peer learns of
// the failure as a reset too, not as a clean end that would pass a truncated stream for a whole one.
func (t *tunnel) fail(s Side, err error) {
	reason := ReasonError
	if errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE) {
		reason = ReasonResetByA
		if s == SideB {
			reason = ReasonResetByB
		}
	}
	t.end(s, reason, err, true)
}

// end closes both sockets (with abort, reset them first with SO_LINGER 0), gives back the buffers and reports
// the end once.
func (t *tunnel) end(first Side, reason Reason, err error, abort bool) {
	if t.ended {
		return
	}
	t.ended = true
	l := t.loop
	for i := range t.ends {
		fd := int(t.ends[i].fd)
		if l.byFD[int32(fd)] == t {
			delete(l.byFD, int32(fd))
			// Close alone would remove fd from the epoll set, but only once no other descriptor refers to the
			// socket; deleting it explicitly keeps a stray duplicate from waking this loop.
			_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		}
		if abort {
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		}
		unix.Close(fd)
	}
	for i := range t.dirs {
		if d := &t.dirs[i]; d.buf != nil {
			l.giveBack(d.buf)
			d.buf = nil
		}
		if d := &t.dirs[i]; d.pipe != nil {
			l.putPipe(d.pipe) // closed if it holds bytes: they are dropped with the tunnel (End.Unsent)
			d.pipe = nil
		}
	}
	if t.added {
		l.tunnels.Add(-1)
	}
	if t.owner != nil {
		t.owner.TunnelEnded(End{
			First: first, Reason: reason, Err: err,
			AToB: t.written[0].Load(), BToA: t.written[1].Load(), Unsent: t.unsent.Load(),
		})
	}
}

// hasUnsent reports whether the loop holds bytes of t or either socket's send queue is not empty.
func (t *tunnel) hasUnsent() bool {
	if t.unsent.Load() > 0 {
		return true
	}
	for i := range t.ends {
		if n, err := unix.IoctlGetInt(int(t.ends[i].fd), unix.SIOCOUTQ); err == nil && n > 0 {
			return true
		}
	}
	return false
}

// tcpProgress sums what TCP has moved on t's sockets: bytes each received and bytes each sent and had
// acknowledged (TCP_INFO). Unlike the loop's own counts, it moves with every ACK of a slow reader draining a
// full send buffer, while the loop waits for an EPOLLOUT edge that comes only once a third of it has
// drained. Once t has ended its descriptors are closed (or reused): it returns the loop's counts then.
func (t *tunnel) tcpProgress() uint64 {
	if t.ended {
		return t.writtenBoth()
	}
	var sum uint64
	for i := range t.ends {
		if ti, err := unix.GetsockoptTCPInfo(int(t.ends[i].fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			sum += ti.Bytes_acked + ti.Bytes_received
		}
	}
	return sum
}

// unpipe reads the bytes in the directions' pipes back into memory and gives the empty pipes back. A direction
// reads into its pipe only once out is empty, so the pipe's bytes become out. The tunnel carries on as before
// if Detach fails later: move sends out first, as it sends peeked bytes. A pipe that cannot be read back
// ends the tunnel with a reset (the error wraps ErrEnded): the bytes read from it before the error are gone,
// and carrying on would leave a hole in the stream.
func (t *tunnel) unpipe() error {
	for i := range t.dirs {
		d := &t.dirs[i]
		if d.pipe == nil {
			continue
		}
		b, err := d.pipe.drain()
		if err != nil {
			err = fmt.Errorf("direction %d: %w", i, err)
			t.end(SideNone, ReasonError, err, true)
			return fmt.Errorf("%w: %w", ErrEnded, err)
		}
		d.out = b
		t.loop.putPipe(d.pipe)
		d.pipe = nil
	}
	return nil
}

// writtenBoth is the bytes the loop has written both ways.
func (t *tunnel) writtenBoth() uint64 {
	return uint64(t.written[0].Load() + t.written[1].Load())
}

// detach gives t back alive (Handle.Detach): take gets duplicates of both descriptors, then the loop forgets t
// and closes its own, keeping the bytes it held for the caller. On an error t is untouched.
func (t *tunnel) detach(take func(afd, bfd int) error) (Detached, error) {
	if t.ended {
		return Detached{}, ErrEnded
	}
	if err := t.unpipe(); err != nil {
		return Detached{}, fmt.Errorf("detach: %w", err)
	}
	var dups [2]int
	for i := range t.ends {
		fd, err := unix.FcntlInt(uintptr(t.ends[i].fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			if i == 1 {
				unix.Close(dups[0])
			}
			return Detached{}, fmt.Errorf("detach: duplicate side %s: %w", Side(i), err)
		}
		dups[i] = fd
	}
	if err := take(dups[0], dups[1]); err != nil {
		return Detached{}, fmt.Errorf("detach: %w", err)
	}
	t.ended = true // runAgain, later events and commands now pass it by
	l := t.loop
	for i := range t.ends {
		fd := int(t.ends[i].fd)
		delete(l.byFD, int32(fd))
		_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		unix.Close(fd) // the socket lives on in take's duplicate
	}
	var d Detached
	for i := range t.dirs {
		dir := &t.dirs[i]
		d.Pending[i] = clone(dir.out)
		dir.out = nil
		if dir.buf != nil {
			l.giveBack(dir.buf)
			dir.buf = nil
		}
	}
	d.AToB, d.BToA = t.written[0].Load(), t.written[1].Load()
	t.unsent.Store(0)
	if t.added {
		l.tunnels.Add(-1)
	}
	return d, nil
}

// recv reads what a socket holds into p with recvfrom(2) and no address, which goes to the socket's receive
// directly where read(2) passes through the file layer first. A loop's sockets are nonblocking, so the call
// never blocks, and it is made raw: without entersyscall and exitsyscall around it, as Go's own netpoller
// makes its epoll_wait(0).
func recv(fd int, p []byte) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))),
		uintptr(len(p)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// send writes p to a socket with sendto(2), no address and MSG_NOSIGNAL (a reset peer is an EPIPE, not a
// SIGPIPE): sendmsg(2) would also copy in a message header and an iovec. Raw, as recv.
func send(fd int, p []byte) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))),
		uintptr(len(p)), unix.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
