package relay

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/loader"
)

// Backpressure on the kernel datapath (shared/DATAPATH.md, hazard 5).
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
	// relayPoll is how long a relaying goroutine waits for passed bytes before it checks again whether the
	// verdict has resumed redirecting (then there is nothing more to read, and it stops).
	relayPoll = 10 * time.Millisecond
	// handedOnFirstCheck and handedOnMaxCheck pace waitHandedOn.
	handedOnFirstCheck = 100 * time.Microsecond
	handedOnMaxCheck   = 10 * time.Millisecond
)

// errTunnelEnded stops a relaying goroutine whose tunnel ended under it.
var errTunnelEnded = errors.New("tunnel ended")

// readDemotions starts a relaying goroutine for each direction the verdict demotes, until Close.
func (k *kernelPath) readDemotions() {
	defer close(k.events)
	for {
		ev, err := k.maps.ReadDemotion()
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				k.log.Error("kernel datapath: demotion events stopped; demoted tunnels are found only at FIN now", "err", err)
			}
			return
		}
		if m := k.metrics.Load(); m != nil {
			m.kernelDemotions.Inc()
		}
		k.mu.Lock()
		if d, ok := k.bySrc[ev.Cookie]; ok {
			k.startRelayLocked(d)
		}
		k.mu.Unlock()
	}
}

// startRelayLocked starts relayPassed for d unless it runs already. The caller holds k.mu.
func (k *kernelPath) startRelayLocked(d *kernelDir) {
	if d.relaying || d.kt.released || d.finDone {
		return
	}
	d.relaying = true
	k.relays.Add(1)
	k.relayWG.Add(1)
	go func() {
		defer k.relayWG.Done()
		k.relayPassed(d)
	}()
}

// relayPassed relays the bytes the verdict passed to d's source while it is demoted, and carries the FIN if
// it comes while demoted. It returns when the verdict redirects again and every passed byte is relayed, or
// when the tunnel ends.
func (k *kernelPath) relayPassed(d *kernelDir) {
	t := d.kt.t
	rc, err := d.src.conn.SyscallConn()
	if err != nil {
		k.stopRelaying(d, true)
		t.end(sideReason(d.src.isClient, err), true)
		return
	}
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	for {
		st, err := k.maps.Stats(d.src.cookie)
		if err != nil {
			k.stopRelaying(d, true) // the tunnel left the maps: it is ending
			return
		}
		if !st.Demoted && st.Passed == d.userRead {
			if k.stopRelaying(d, false) {
				if m := k.metrics.Load(); m != nil {
					m.kernelResumes.Inc()
				}
				return
			}
			continue
		}
		if unread := st.Passed - d.userRead; unread > 4*d.limit && unread > d.overflowAt() {
			k.log.Error("kernel tunnel reset: both peers stopped reading while sending, and the kernel would hold their bytes without bound",
				"id", t.ID, "held_bytes", st.Passed-d.userRead)
			k.stopRelaying(d, true)
			t.end(ReasonOverflow, true)
			return
		}
		_ = d.src.conn.SetReadDeadline(time.Now().Add(relayPoll))
		n, err := readRaw(rc, *bp)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue
		case err != nil:
			k.stopRelaying(d, true)
			t.end(sideReason(d.src.isClient, err), true)
			return
		case n == 0:
			// recvmsg reports EOF as soon as the socket's message queue is empty, which can be before
			// passed skbs that wait in its psock backlog reach it: only with every passed byte read is it
			// the end of the stream.
			if st, err := k.maps.Stats(d.src.cookie); err == nil && st.Passed != d.userRead {
				time.Sleep(handedOnFirstCheck)
				continue
			}
			k.finishRelayed(d)
			return
		}
		// These bytes were passed, so every earlier run of the source's verdict has finished and counted
		// what it redirected: those bytes must all be in the destination's send queue before these follow.
		if err := k.waitHandedOn(d); err != nil {
			k.stopRelaying(d, true)
			if !errors.Is(err, errTunnelEnded) {
				t.end(ReasonStalled, true)
			}
			return
		}
		w, err := d.dst.conn.Write((*bp)[:n])
		d.counter.Add(uint64(w))
		d.userRead += uint64(n)
		d.userWritten += uint64(w)
		if err != nil {
			k.stopRelaying(d, true)
			t.end(sideReason(d.dst.isClient, err), true)
			return
		}
		// Ask to resume once the destination has room again; until then, stay demoted rather than flap.
		var resume uint64
		if unsent, err := unix.IoctlGetInt(d.dst.fd, unix.SIOCOUTQNSD); err == nil && uint64(unsent) < d.limit/4 {
			resume = st.Demotions
		}
		if err := k.maps.SetControl(d.src.cookie, loader.Control{Peer: d.dst.cookie, HeldLimit: d.limit,
			UserRead: d.userRead, UserWritten: d.userWritten, ResumeGen: resume}); err != nil {
			k.stopRelaying(d, true)
			return
		}
	}
}

// overflowAt is how many passed bytes not yet read from d's source mean that both peers stopped reading.
// Passed bytes that reach the source's message queue are charged to its receive buffer, which closes its
// TCP window: they stay under the buffer's size (seen here: at most 0.85 of it). Passed bytes that wait in
// the source's psock queue behind bytes the other direction redirected into the same socket, for a reader
// that stopped too, are charged to no socket (skmsg.c, sk_psock_verdict_apply), so nothing stops the sender.
// Past this bound the tunnel is reset rather than let the kernel hold their bytes without bound.
func (d *kernelDir) overflowAt() uint64 {
	rcvbuf, _ := unix.GetsockoptInt(d.src.fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	return 4*d.limit + 2*uint64(rcvbuf)
}

// readRaw reads once from rc into b, waiting in Go's poller (so within the connection's read deadline)
// while nothing is readable.
func readRaw(rc syscall.RawConn, b []byte) (int, error) {
	var (
		n    int
		rerr error
	)
	err := rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = unix.Read(int(fd), b)
			if rerr != unix.EINTR {
				break
			}
		}
		return rerr != unix.EAGAIN
	})
	if err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, rerr
	}
	return n, nil
}

// stopRelaying ends d's relaying goroutine. Unless force, it first checks under k.mu that the verdict
// redirects again and that every passed byte is relayed; a demotion after that check finds relaying unset
// and starts a new goroutine. It reports whether the goroutine is to return.
func (k *kernelPath) stopRelaying(d *kernelDir, force bool) bool {
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
// destination has nothing left to send (hazard 6).
func (k *kernelPath) waitHandedOn(d *kernelDir) error {
	interval := handedOnFirstCheck
	var lastHanded uint64
	lastMove := time.Now()
	for {
		st, handed, err := k.dirProgress(d)
		if err != nil {
			return errTunnelEnded
		}
		if handed >= st.Bytes {
			return nil
		}
		now := time.Now()
		switch {
		case handed != lastHanded:
			lastHanded, lastMove, interval = handed, now, handedOnFirstCheck
		case now.Sub(lastMove) > stallTimeout && !k.dstBusy(d):
			return fmt.Errorf("redirected bytes stopped %d short of the destination", st.Bytes-handed)
		default:
			interval = min(2*interval, handedOnMaxCheck)
		}
		select {
		case <-d.kt.t.Done():
			return errTunnelEnded
		case <-time.After(interval):
		}
	}
}

// finishRelayed carries the FIN that d's relaying goroutine read, once every redirected byte before it is
// handed on, and ends the tunnel if the other direction is done too.
func (k *kernelPath) finishRelayed(d *kernelDir) {
	t := d.kt.t
	if err := k.waitHandedOn(d); err != nil {
		k.stopRelaying(d, true)
		if !errors.Is(err, errTunnelEnded) {
			t.end(ReasonStalled, true)
		}
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
		t.end(sideReason(d.dst.isClient, err), true)
		return
	}
	d.finSeen, d.finDone = true, true
	k.drain = removeDir(k.drain, d)
	both := d.kt.dirs[0].finDone && d.kt.dirs[1].finDone
	k.mu.Unlock()
	if both {
		t.end(ReasonClosed, false)
	}
}

func removeDir(ds []*kernelDir, d *kernelDir) []*kernelDir {
	out := ds[:0]
	for _, x := range ds {
		if x != d {
			out = append(out, x)
		}
	}
	return out
}
