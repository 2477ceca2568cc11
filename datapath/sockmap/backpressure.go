package sockmap

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
)

// Backpressure on the kernel datapath (docs/datapath.md, "Backpressure").
//
// A redirected skb leaves its source's receive queue at once and waits in the destination's psock queue,
// charged to no socket (net/core/skmsg.c, sk_psock_skb_redirect), so the source's TCP window never closes
// and a reader that stops would let the kernel hold without bound. The verdict program therefore counts
// what it holds per direction and, past the direction's held limit, demotes the source: its skbs are passed
// to its own receive queue, where they are charged to its receive buffer and close its window. The
// verdict tells userspace through a ring buffer; relayPassed then reads the passed bytes and writes them
// to the destination, with ordinary backpressure, and asks the verdict to resume redirecting, which it does
// at the first skb that finds every passed byte consumed.

const (
	// relayPoll is how long a relaying goroutine whose destination is still busy waits for passed bytes
	// before it looks again whether it may ask to resume; doubled up to relayMaxPoll while nothing comes.
	relayPoll    = 10 * time.Millisecond
	relayMaxPoll = 500 * time.Millisecond
	// handedOnFirstCheck and handedOnMaxCheck pace waitHandedOn.
	handedOnFirstCheck = 100 * time.Microsecond
	handedOnMaxCheck   = 10 * time.Millisecond
)

// errTunnelEnded stops a relaying goroutine whose tunnel ended under it.
var errTunnelEnded = errors.New("tunnel ended")

// readModeChanges starts a relaying goroutine for each direction the verdict demotes, and wakes it when
// the verdict resumes, until Close.
func (k *Engine) readModeChanges() {
	defer close(k.events)
	for {
		ev, err := k.maps.ReadModeChange()
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				k.log.Error("kernel datapath: mode events stopped; demoted tunnels are found only at FIN now", "err", err)
			}
			return
		}
		if k.hooks.dropModeEvents.Load() {
			k.hooks.droppedModeEvents.Add(1)
			continue
		}
		if k.hooks.stealModeEvents.Load() {
			continue
		}
		k.mu.Lock()
		d, ok := k.dirFrom(ev.Cookie)
		switch {
		case !ok:
			// Another engine's tunnel (the objects are shared): counted there, by its event or a recheck.
		case ev.Kind == loader.Demoted:
			k.countDemotionsLocked(d, ev.Demotions)
			k.startRelayLocked(d)
		case ev.Kind == loader.Resumed && d.srcConn != nil:
			// The goroutine waits in Go's poller for bytes that will not come now: the source's
			// wake-ups on redirected bytes are not EPOLLIN. An expired deadline wakes it to stop.
			_ = d.srcConn.SetReadDeadline(time.Now())
		}
		k.mu.Unlock()
		if ok && ev.Kind == loader.Broken && k.verdictBroken(ev.Cookie) {
			k.log.Error("kernel tunnel reset: TCP repeated bytes already delivered and they could not be cut off",
				"id", d.kt.p.ID)
			d.kt.p.EndIfHeld(d.kt, datapath.ReasonKernelError, true) // unless given back meanwhile
		}
	}
}

// verdictBroken reports whether the verdict's state of the socket cookie says it dropped bytes: a Broken
// event is acted on only then, since an event may be a duplicate of one already read (loader,
// ReadModeChange: two readers of a shared ring buffer).
func (k *Engine) verdictBroken(cookie uint64) bool {
	st, err := k.maps.Stats(cookie)
	return err == nil && st.Broken
}

// countDemotionsLocked counts in Stats the demotions of d's source up to demotions (the verdict's count)
// that the engine has not counted yet: whether the event or a recheck finds a demotion first, and
// whichever reader of a shared ring buffer reads the event, each is counted once, by the engine that
// carries the tunnel. The caller holds k.mu.
func (k *Engine) countDemotionsLocked(d *kernelDir, demotions uint64) {
	if demotions == 0 || (d.demoted != nil && demotions <= d.counted) {
		return
	}
	if d.demoted == nil {
		d.demoted = &demoted{}
	}
	k.demotions.Add(demotions - d.counted)
	d.counted = demotions
}

// startRelayLocked starts relayPassed for d unless it runs already. The caller holds k.mu, so d's
// descriptors are open (release takes k.mu): the goroutine's conns are made from them here.
func (k *Engine) startRelayLocked(d *kernelDir) {
	if d.relaying || d.kt.released || d.kt.stopping || d.finDone {
		return
	}
	src, err := pollConn(d.src.fd)
	var dst *net.TCPConn
	if err == nil {
		if dst, err = pollConn(d.dst.fd); err != nil {
			_ = src.Close()
		}
	}
	if d.demoted == nil {
		d.demoted = &demoted{}
	}
	d.relaying = true
	prev := d.relayDone
	d.relayDone = make(chan struct{})
	if err == nil {
		d.srcConn, d.dstConn = src, dst
	}
	k.relays.Add(1)
	k.relayWG.Add(1)
	go k.relayPassedThenDone(d, src, dst, err, prev, d.relayDone)
}

// relayPassedThenDone is relayPassed for a goroutine of its own, counted in relayWG, on its conns src and
// dst, which it closes when done; connErr is why they could not be made. It closes done last. It starts
// once the direction's previous goroutine (prev, nil for the first) is done: that one marks the
// direction as no longer relaying before its deferred steps (the window clamp given back, its conns
// closed) have run, and those touch the direction's overflow watch, which this one resets.
func (k *Engine) relayPassedThenDone(d *kernelDir, src, dst *net.TCPConn, connErr error, prev, done chan struct{}) {
	defer k.relayWG.Done()
	defer close(done)
	if prev != nil {
		<-prev
	}
	if connErr != nil {
		k.stopRelaying(d, true)
		// A demoted direction with no one to relay it would hold its sender forever.
		d.kt.p.Fail(datapath.ReasonKernelError, connErr, true)
		return
	}
	defer k.dropRelayConns(d, src, dst)
	defer withFD(src, d.overflow.unclamp) // the source's full window again, before its conn closes
	k.relayPassed(d, src, dst)
}

// dropRelayConns closes a relaying goroutine's conns, and forgets them unless a later goroutine's
// replaced them.
func (k *Engine) dropRelayConns(d *kernelDir, src, dst *net.TCPConn) {
	k.mu.Lock()
	if d.srcConn == src {
		d.srcConn, d.dstConn = nil, nil
	}
	k.mu.Unlock()
	_ = src.Close()
	_ = dst.Close()
}

// pollConn returns a conn in Go's poller on a new duplicate of fd: a relaying goroutine waits for passed
// bytes and for send room as on any conn, and only while it relays. The caller holds k.mu.
func pollConn(fd int) (*net.TCPConn, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("F_DUPFD_CLOEXEC: %w", err)
	}
	f := os.NewFile(uintptr(dup), "kernel-tunnel-socket")
	defer f.Close() // net.FileConn holds a duplicate of its own
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("conn from the engine's descriptor: %w", err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		_ = c.Close()
		return nil, fmt.Errorf("conn from the engine's descriptor is a %T, not TCP", c)
	}
	return tc, nil
}

// withFD runs f with c's descriptor, which stays open meanwhile; an error once c is closed.
func withFD(c *net.TCPConn, f func(fd int)) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) })
}

// passedBuffers are relayPassed's buffers. A demoted bulk direction may be carried here for the rest of its
// life (the kernel's psock retry stalls keep tripping the held limit), and per read the goroutine also pays
// a verdict counter lookup, a check that earlier bytes were handed on and a control update: with 32 KiB
// reads one tunnel of 64 KiB frames moved about half of what the copy engine does. 256 KiB reads got most
// of the gain of 1 MiB ones (7.7–10.4 Gbit/s against 8.5–10.7, copy 9.0–11.8) with a stopped reader's
// bytes in flight at 12 MiB rather than up to 19.6 (docs/datapath.md, "Bulk and demotion"). A read
// returns what is queued, so a chatty direction still reads little; the buffer is held only while a
// direction is demoted.
var passedBuffers = sync.Pool{New: func() any { b := make([]byte, passedBufferSize); return &b }}

const passedBufferSize = 256 << 10

// relayPassed relays the bytes the verdict passed to d's source while it is demoted, reading src and
// writing dst, and carries the FIN if it comes while demoted. It returns when the verdict redirects again
// and every passed byte is relayed, or when the tunnel ends.
func (k *Engine) relayPassed(d *kernelDir, src, dst *net.TCPConn) {
	p := d.kt.p
	fail := func(reason string) {
		k.stopRelaying(d, true)
		if reason != "" {
			p.End(reason, true)
		}
	}
	rc, err := src.SyscallConn()
	if err != nil {
		fail(datapath.Blame(d.src.isClient, err))
		return
	}
	bp := passedBuffers.Get().(*[]byte)
	defer passedBuffers.Put(bp)
	// A wait seen by an earlier goroutine is over; a send buffer it raised stays (makeRoomAhead).
	d.overflow = overflowWatch{sndbufBase: d.overflow.sndbufBase}
	if !k.writeHeldBack(d, dst, fail) {
		return
	}
	poll := relayPoll
	for {
		// Ask to resume once the destination has room again; until then stay demoted rather than flap,
		// and look again a poll interval later. Once asked, the goroutine sleeps in Go's poller until the
		// source's next data_ready, which either passes bytes or finds the verdict redirecting again.
		deadline := time.Time{}
		if st, err := k.maps.Stats(d.src.cookie); err == nil && d.resumeGen != st.Demotions {
			if d.hasRoom(dst) {
				d.resumeGen = st.Demotions
				if err := k.setControl(d); err != nil {
					fail(controlFailure(err))
					return
				}
			} else {
				deadline = time.Now().Add(poll)
			}
		}
		// Under k.mu, as Stop sets stop and expires the deadline: a deadline set here never undoes its.
		k.mu.Lock()
		stop := d.stop
		if !stop {
			_ = src.SetReadDeadline(deadline)
		}
		k.mu.Unlock()
		if stop {
			k.stopRelaying(d, true)
			return
		}
		n, err := k.readPassed(rc, d, *bp)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The destination still busy, or the verdict resumed (readModeChanges expired the deadline).
			poll = min(2*poll, relayMaxPoll)
			continue
		case errors.Is(err, errResumed):
			if k.stopRelaying(d, false) {
				k.resumes.Add(1)
				return
			}
			continue
		case errors.Is(err, errTunnelEnded):
			fail("")
			return
		case errors.Is(err, errBroken):
			fail(datapath.ReasonKernelError)
			return
		case errors.Is(err, errOverflow):
			k.log.Error("kernel tunnel reset: both peers stopped reading while sending, and the kernel would hold their bytes without bound",
				"id", p.ID, "limit", d.limit)
			fail(datapath.ReasonOverflow)
			return
		case err != nil:
			fail(datapath.Blame(d.src.isClient, err))
			return
		case n == 0:
			// recvmsg reports EOF as soon as the socket's message queue is empty, which can be before
			// passed skbs that wait in its psock backlog reach it: only with every passed byte read is it
			// the end of the stream.
			if st, err := k.maps.Stats(d.src.cookie); err == nil && st.Passed != d.userRead {
				time.Sleep(handedOnFirstCheck)
				continue
			}
			k.finishRelayed(d, dst)
			return
		}
		poll = relayPoll
		if int64(n) > d.maxPassedRead.Load() {
			d.maxPassedRead.Store(int64(n))
		}
		// These bytes were passed, so every earlier run of the source's verdict has finished and counted
		// what it redirected: those bytes must all be in the destination's send queue before these follow.
		if err := k.waitHandedOn(d, dst); err != nil {
			switch {
			case errors.Is(err, errStopAsked):
				// Read, not written: they go first on whatever carries the direction next.
				d.userRead += uint64(n)
				d.heldBack = append(d.heldBack, (*bp)[:n]...)
				k.stopRelaying(d, true)
			case errors.Is(err, errTunnelEnded):
				fail("")
			default:
				fail(datapath.ReasonStalled)
			}
			return
		}
		w, err := dst.Write((*bp)[:n])
		d.count(w)
		d.userRead += uint64(n)
		d.userWritten += uint64(w)
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && k.stopAsked(d) {
			// Stop expired the write: what it did not write goes to the next engine, first.
			d.heldBack = append(d.heldBack, (*bp)[w:n]...)
			k.stopRelaying(d, true)
			return
		}
		if err != nil {
			fail(datapath.Blame(d.dst.isClient, err))
			return
		}
		if err := k.setControl(d); err != nil {
			fail(controlFailure(err))
			return
		}
	}
}

// stopAsked reports whether Stop asked d's relaying goroutine to return.
func (k *Engine) stopAsked(d *kernelDir) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return d.stop
}

// controlFailure is the reason to end a tunnel whose control update failed: none when it has left the
// maps (it is ending already), else the kernel datapath failed it (a direction left demoted with no one
// to relay it would hang).
func controlFailure(err error) string {
	if errors.Is(err, loader.ErrNotInMaps) {
		return ""
	}
	return datapath.ReasonKernelError
}

var (
	errResumed  = errors.New("the verdict redirects again and every passed byte is relayed")
	errOverflow = errors.New("passed bytes wait behind bytes no reader takes")
	errBroken   = errors.New("the verdict dropped bytes it could not keep exact")
)

// readPassed reads bytes passed to d's source into b, waiting in Go's poller (within the source's read
// deadline). Each time the source wakes, it first checks the verdict's counters: errResumed, without
// reading, once the verdict redirects again and every passed byte has been read (a read then would only
// race the verdict: tcp_bpf_recvmsg_parser); errOverflow when passed bytes pile up where no read can reach
// them (overflowAt); errTunnelEnded once the tunnel has left the maps.
func (k *Engine) readPassed(rc syscall.RawConn, d *kernelDir, b []byte) (int, error) {
	var (
		n    int
		rerr error
	)
	err := rc.Read(func(fd uintptr) bool {
		st, err := k.maps.Stats(d.src.cookie)
		switch {
		case err != nil:
			rerr = errTunnelEnded
			return true
		case st.Broken:
			rerr = errBroken
			return true
		case !st.Demoted && st.Passed == d.userRead:
			rerr = errResumed
			return true
		}
		for {
			n, rerr = unix.Read(int(fd), b)
			if rerr != unix.EINTR {
				break
			}
		}
		if rerr != unix.EAGAIN {
			return true
		}
		k.makeRoomAhead(d, int(fd), st.Passed-d.userRead)
		if k.overflowed(d, int(fd), st.Passed-d.userRead, time.Now()) {
			rerr = errOverflow
			return true
		}
		return false
	})
	if err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, rerr
	}
	return n, nil
}

// setControl tells the verdict what d's relaying goroutine has done so far.
func (k *Engine) setControl(d *kernelDir) error {
	return k.maps.SetControl(d.src.cookie, loader.Control{Peer: d.dst.cookie, HeldLimit: d.limit,
		UserRead: d.userRead, UserWritten: d.userWritten, ResumeGen: d.resumeGen})
}

// hasRoom reports whether d's destination, dst, has little left to send: then the direction may resume.
func (d *kernelDir) hasRoom(dst *net.TCPConn) bool {
	room := false
	_ = withFD(dst, func(fd int) {
		unsent, err := unix.IoctlGetInt(fd, unix.SIOCOUTQNSD)
		room = err == nil && uint64(unsent) < d.limit/4
	})
	return room
}

// overflowAt is how many passed bytes not yet read from d's source mean that both peers stopped reading.
// Passed bytes that reach the source's message queue are charged to its receive buffer, which closes its
// TCP window: they stay under the buffer's size (seen here: at most 0.85 of it). Passed bytes that wait in
// the source's psock queue behind bytes the other direction redirected into the same socket, for a reader
// that stopped too, are charged to no socket (skmsg.c, sk_psock_verdict_apply), so nothing stops the sender.
// Past this bound the tunnel is reset rather than let the kernel hold their bytes without bound.
func (d *kernelDir) overflowAt(srcFD int) uint64 {
	rcvbuf, _ := unix.GetsockoptInt(srcFD, unix.SOL_SOCKET, unix.SO_RCVBUF)
	return 4*d.limit + 2*uint64(rcvbuf)
}

// overflowQuiet is how long unread passed bytes must stay past overflowAt with nothing moving before the
// tunnel is reset for overflow. Passed bytes wait behind the other direction's bytes for the source, which
// the psock retries only at the next tick after a full send buffer (schedule_delayed_work(…, 1): up to
// 4 ms at HZ=250), or later under CPU contention, and a reader that is slow for a moment looks stopped
// as long; a fast sender piles up tens of MiB in such a wait while both peers read (docs/datapath.md,
// "Backpressure"). The source's window is clamped meanwhile (overflowClamp), which slows the sender to a
// trickle, so the wait costs little memory even when the peers did stop.
const overflowQuiet = 250 * time.Millisecond

// overflowClamp is the TCP window clamp of a source whose unread passed bytes are past overflowAt: the
// smallest the kernel allows (SOCK_MIN_RCVBUF/2). Passed bytes behind the psock queue are charged to no
// socket, so the window does not close by itself; the clamp bounds what the sender may add per round trip.
const overflowClamp = 1152

// overflowWatch remembers, for a relaying goroutine, since when unread passed bytes have been past the
// overflow bound without progress, and whether it clamped the source's window. Only that goroutine
// touches it.
type overflowWatch struct {
	since time.Time // zero while under the bound or moving
	mark  uint64    // the progress mark when since was set
	// clampWas is the source's window clamp before overflowed clamped it; 0 while not clamped.
	clampWas int
	// sndbufBase is the source's send buffer before makeRoomAhead first raised it, kept from one relaying
	// goroutine of the direction to the next; 0 while never raised.
	sndbufBase int
}

// stuck reports whether stalled (unread passed bytes past the bound, the source's send queue not empty)
// has held, with mark unchanged, for overflowQuiet; a changed mark or a check that is not stalled starts
// the wait again.
func (w *overflowWatch) stuck(stalled bool, mark uint64, now time.Time) bool {
	switch {
	case !stalled:
		w.since = time.Time{}
		return false
	case w.since.IsZero() || mark != w.mark:
		w.since, w.mark = now, mark
		return false
	}
	return now.Sub(w.since) >= overflowQuiet
}

// clamp clamps the window of the source srcFD to overflowClamp, remembering its clamp before.
func (w *overflowWatch) clamp(srcFD int) {
	if w.clampWas != 0 {
		return
	}
	was, err := unix.GetsockoptInt(srcFD, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP)
	if err != nil || was <= overflowClamp {
		return
	}
	if unix.SetsockoptInt(srcFD, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, overflowClamp) == nil {
		w.clampWas = was
	}
}

// unclamp gives the source srcFD its window clamp back, if clamp took it.
func (w *overflowWatch) unclamp(srcFD int) {
	if w.clampWas == 0 {
		return
	}
	_ = unix.SetsockoptInt(srcFD, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, w.clampWas)
	w.clampWas = 0
}

// makeRoomAhead raises the send buffer of d's source, srcFD, when more than d's held limit of passed bytes
// wait where no read reaches them while the source has bytes unsent. Those passed bytes wait in the source's psock queue behind bytes the other direction
// redirected into the same socket (sk_psock_verdict_apply), which wait there for room in its send queue,
// which their reader, the other peer, stopped emptying: one stopped reader then stops this direction too,
// however fast its own reader reads, and its sender's bytes pile up behind, charged to no socket, until
// the overflow reset took the tunnel for both peers having stopped (docs/datapath.md, "Backpressure").
// The verdict holds at most the other direction's held limit and one skb in that queue: room for that
// beyond what the send queue holds lets the psock hand it on (setting the buffer wakes the psock:
// sk_write_space), where it is charged and bounded. Passed bytes then reach the message queue directly,
// charged to the receive buffer, so the sender gets TCP backpressure again, and the relaying goroutine
// reads them. That holds when d's reader stopped too (both peers stopped reading while sending): the
// tunnel then waits under TCP backpressure, as on the other engines, rather than be reset. Waiting also
// for d's destination to have room (its reader reading) left the raise undone in 1 of 10 tunnels under
// load with a 256 KiB limit, whose destination the upstream had not emptied at the moments the goroutine
// looked, and the overflow reset took it.
//
// The other direction may still redirect until the verdict demotes it (its held bytes past the limit
// again), and then holds up to its limit in the queue once more; it stays demoted until its reader empties
// the send queue (hasRoom). So the buffer is raised again while the stall lasts, up to twice that room
// above its size before the first raise, and kept so for the tunnel's life: a lowered buffer would let the
// next stall start over from it. What a stopped reader's send queue holds grows by at most that, charged;
// past it the overflow reset applies as before.
func (k *Engine) makeRoomAhead(d *kernelDir, srcFD int, unread uint64) {
	if unread <= d.limit || !hasUnsent(srcFD) {
		return
	}
	other := &d.kt.dirs[0]
	if other == d {
		other = &d.kt.dirs[1]
	}
	room := other.limit + other.limit/4 + 2*roomAheadSkb // a quarter more for the skbs' overhead (truesize)
	if was, now, ok := d.overflow.raiseSendBuffer(srcFD, room); ok {
		k.log.Debug("kernel tunnel: passed bytes wait behind the other direction's for a stopped reader; raised the send buffer of their source",
			"id", d.kt.p.ID, "from_client", d.src.isClient, "unread", unread, "sndbuf_was", was, "sndbuf", now)
	}
}

// roomAheadSkb is room for the skb that the verdict redirects past the held limit (it checks before each).
const roomAheadSkb = 64 << 10

// raiseSendBuffer raises the send buffer of srcFD to room beyond the bytes its send queue holds, at most
// 2 × room above w.sndbufBase (set at the first raise), and reports the sizes before and after and
// whether it raised it. It needs CAP_NET_ADMIN (SO_SNDBUFFORCE), which the kernel engine runs with;
// SO_SNDBUF is capped at net.core.wmem_max and could lower the buffer instead, so without it nothing
// changes. TCP no longer autotunes the buffer after it (SOCK_SNDBUF_LOCK); it only ever grows here.
func (w *overflowWatch) raiseSendBuffer(srcFD int, room uint64) (was, now int, raised bool) {
	was, err := unix.GetsockoptInt(srcFD, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil || was <= 0 {
		return was, was, false
	}
	queued, err := unix.IoctlGetInt(srcFD, unix.SIOCOUTQ)
	if err != nil {
		return was, was, false
	}
	base := w.sndbufBase
	if base == 0 {
		base = was
	}
	// The kernel sets twice what it is given (sock_setsockopt, as for SO_SNDBUF).
	half := min(queued+queued/8+int(room), base+2*int(room)) / 2 // an eighth for the queued skbs' overhead
	if 2*half <= was || unix.SetsockoptInt(srcFD, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, half) != nil {
		return was, was, false
	}
	w.sndbufBase = base
	return was, 2 * half, true
}

// overflowed reports whether both peers of d's tunnel stopped reading while sending: unread passed bytes
// past overflowAt, and for overflowQuiet no progress. The passed bytes wait behind the other direction's
// bytes for the source, which drain as the source's peer reads; progress is a byte read by the relaying
// goroutine or a byte entering or leaving the source's send queue (acked plus queued). A source whose send
// queue is empty has a peer that took everything: the psock is only late, and nothing is stuck. While
// past the bound the source's window is clamped, and given back once under it.
func (k *Engine) overflowed(d *kernelDir, srcFD int, unread uint64, now time.Time) bool {
	if unread <= 4*d.limit || unread <= d.overflowAt(srcFD) {
		d.overflow.unclamp(srcFD)
		return d.overflow.stuck(false, 0, now)
	}
	d.overflow.clamp(srcFD)
	info, err := unix.GetsockoptTCPInfo(srcFD, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return false // the tunnel is ending; its end says why
	}
	outq, err := unix.IoctlGetInt(srcFD, unix.SIOCOUTQ)
	if err != nil {
		return false
	}
	return d.overflow.stuck(outq > 0, d.userRead+info.Bytes_acked+uint64(outq), now)
}

// stopRelaying ends d's relaying goroutine. Unless force, it first checks under k.mu that the verdict
// redirects again and that every passed byte is relayed; a demotion after that check finds relaying unset
// and starts a new goroutine. It reports whether the goroutine is to return.
func (k *Engine) stopRelaying(d *kernelDir, force bool) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !force {
		st, err := k.maps.Stats(d.src.cookie)
		if err == nil && (st.Demoted || st.Passed != d.userRead) {
			return false
		}
	}
	d.relaying = false
	return true
}

// waitHandedOn waits until every byte the verdict redirected from d's source has entered the
// destination's send queue. It fails if the tunnel ends, or if the redirected bytes stop moving while the
// destination has nothing left to send (the stall guard of docs/datapath.md, "FIN, RST and the end of a
// tunnel").
func (k *Engine) waitHandedOn(d *kernelDir, dst *net.TCPConn) error {
	interval := handedOnFirstCheck
	var lastHanded uint64
	lastMove := time.Now()
	for {
		var (
			st     loader.Stats
			handed uint64
			busy   bool
			err    error
		)
		if cerr := withFD(dst, func(fd int) {
			st, handed, err = k.dirProgress(d, fd)
			busy = hasUnsent(fd)
		}); cerr != nil || err != nil {
			return errTunnelEnded
		}
		if handed >= st.Bytes {
			return nil
		}
		now := time.Now()
		switch {
		case handed != lastHanded:
			lastHanded, lastMove, interval = handed, now, handedOnFirstCheck
		case now.Sub(lastMove) > stallTimeout && !busy:
			return fmt.Errorf("redirected bytes stopped %d short of the destination", st.Bytes-handed)
		default:
			interval = min(2*interval, handedOnMaxCheck)
		}
		select {
		case <-d.kt.p.Done():
			return errTunnelEnded
		case <-time.After(interval):
		}
		if k.stopAsked(d) {
			return errStopAsked // a slow reader would keep the stop waiting
		}
	}
}

// finishRelayed carries the FIN that d's relaying goroutine read, once every redirected byte before it is
// handed on, and ends the tunnel if the other direction is done too.
func (k *Engine) finishRelayed(d *kernelDir, dst *net.TCPConn) {
	t := d.kt.p
	if err := k.waitHandedOn(d, dst); err != nil {
		k.stopRelaying(d, true)
		// Asked to stop: the FIN is still the source's to report, to whatever carries the direction next.
		if !errors.Is(err, errTunnelEnded) && !errors.Is(err, errStopAsked) {
			t.End(datapath.ReasonStalled, true)
		}
		return
	}
	if st, err := k.maps.Stats(d.src.cookie); err == nil && st.Broken {
		k.stopRelaying(d, true)
		t.End(datapath.ReasonKernelError, true) // never a clean FIN after bytes were dropped
		return
	}
	k.mu.Lock()
	d.relaying = false
	if d.kt.released || d.finDone {
		k.mu.Unlock()
		return
	}
	if err := unix.Shutdown(d.dst.fd, unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
		k.mu.Unlock()
		t.Fail(datapath.Blame(d.dst.isClient, err), err, true)
		return
	}
	d.finSeen, d.finDone = true, true
	t.MarkHalfClosed()
	k.drain = slices.DeleteFunc(k.drain, func(x *kernelDir) bool { return x == d })
	both := d.kt.dirs[0].finDone && d.kt.dirs[1].finDone
	k.mu.Unlock()
	if both {
		t.End(datapath.ReasonClosed, false)
	}
}
