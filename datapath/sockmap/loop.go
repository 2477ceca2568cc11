package sockmap

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
)

// loop waits for socket events and polls draining directions until Close.
func (k *Engine) loop() {
	defer close(k.done)
	events := make([]unix.EpollEvent, 256)
	lostCheck := time.Now()
	for {
		timeout := k.drainTimeout()
		if timeout < 0 || timeout > lostEventsCheckMs {
			timeout = lostEventsCheckMs
		}
		if k.sharers.Load() > 0 || k.lastSweep.Load() {
			timeout = min(timeout, int(sharedSweep/time.Millisecond))
		}
		n, err := unix.EpollWait(k.epfd, events, timeout)
		if err != nil && err != unix.EINTR {
			k.log.Error("kernel datapath event loop failed", "err", err)
			return
		}
		for _, ev := range events[:max(n, 0)] {
			if eventToken(ev) == 0 {
				return
			}
			k.handle(ev)
		}
		k.checkDrains()
		if time.Since(lostCheck) >= lostEventsCheckMs*time.Millisecond {
			lostCheck = time.Now()
			k.recoverLostEvents()
		}
		k.sweepIfShared()
	}
}

// lostEventsCheckMs is how often the loop looks whether the ring buffer dropped mode events.
const lostEventsCheckMs = 1000

// recoverLostEvents does, for every kernel direction, what lost mode events would have made happen: a
// demoted direction with no goroutine relaying it would hold its sender forever, and a broken one would
// not be reset. The ring buffer is sized so that this never runs in practice; when it does, it says so.
func (k *Engine) recoverLostEvents() {
	lost, err := k.maps.EventsLost()
	lost += k.hooks.droppedModeEvents.Load()
	if err != nil || lost == k.lostSeen {
		return
	}
	k.log.Warn("kernel datapath: mode events were lost; checking every kernel tunnel", "lost", lost-k.lostSeen)
	k.lostSeen = lost
	k.recheckAll()
}

// recheckAll does, for every kernel direction, what a mode event would have made happen.
func (k *Engine) recheckAll() {
	var broken []*kernelTunnel
	k.mu.Lock()
	for _, s := range k.socks {
		d := s.srcDir()
		st, err := k.maps.Stats(d.src.cookie)
		if err == nil {
			k.countDemotionsLocked(d, st.Demotions) // its event may have been lost, or read by another process
		}
		switch {
		case err != nil || d.relaying:
		case st.Broken:
			broken = append(broken, d.kt)
		case st.Demoted || st.Passed != d.userRead:
			k.startRelayLocked(d)
		}
		if d.relaying && d.srcConn != nil && !st.Demoted {
			_ = d.srcConn.SetReadDeadline(time.Now()) // a Resumed event's wake-up
		}
	}
	k.mu.Unlock()
	for _, kt := range broken {
		kt.p.EndIfHeld(kt, datapath.ReasonKernelError, true)
	}
}

// drainTimeout is how long epoll_wait may sleep: until the next drain check, or forever when none waits.
func (k *Engine) drainTimeout() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.drain) == 0 {
		return -1
	}
	next := k.drain[0].nextCheck
	for _, d := range k.drain[1:] {
		if d.nextCheck.Before(next) {
			next = d.nextCheck
		}
	}
	ms := int((time.Until(next) + time.Millisecond - 1) / time.Millisecond)
	return max(ms, 0)
}

// eventToken is the 64 bits of ev's data: a socket cookie, or 0 for the eventfd.
func eventToken(ev unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// handle acts on one socket's event: an error (a reset) aborts the tunnel; a FIN starts the drain of the
// direction it ends.
func (k *Engine) handle(ev unix.EpollEvent) {
	k.mu.Lock()
	s, ok := k.socks[eventToken(ev)]
	if !ok {
		k.mu.Unlock()
		return
	}
	kt := s.kt
	if ev.Events&unix.EPOLLERR != 0 {
		// Read under k.mu: release closes the descriptor, and its number may then name another socket.
		err := socketError(s.fd)
		k.mu.Unlock()
		if k.hooks.beforeLateEnd != nil {
			k.hooks.beforeLateEnd(kt)
		}
		kt.p.FailIfHeld(kt, datapath.Blame(s.isClient, err), err, true) // unless given back meanwhile
		return
	}
	if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		d, back := &kt.dirs[1], &kt.dirs[0] // back writes to s
		if s.isClient {
			d, back = &kt.dirs[0], &kt.dirs[1]
		}
		// A reset whose error a write to s took first (the psock's worker) raises no EPOLLERR: it must
		// not be drained as a FIN.
		if err := datapath.ResetAtEOF(s.fd, back.finDone); err != nil {
			k.mu.Unlock()
			kt.p.Fail(datapath.Blame(s.isClient, err), err, true)
			return
		}
		if !d.finSeen {
			d.finSeen = true
			d.watchDrain(time.Now())
			k.drain = append(k.drain, d)
		}
	}
	k.mu.Unlock()
}

// tcpClose is TCP_CLOSE (include/net/tcp_states.h): the state of a socket that was reset.
const tcpClose = 7

// socketError is the error that an EPOLLERR on fd reported. SO_ERROR can be read only once, and the
// psock's worker, sending redirected bytes to this socket, may have read it first: then a socket that
// is already closed was reset (ECONNRESET), rather than failed with "errno 0" and the wrong blame.
func socketError(fd int) error {
	soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && soErr != 0 {
		return unix.Errno(soErr)
	}
	if ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil && ti.State == tcpClose {
		return unix.ECONNRESET
	}
	if err != nil {
		return fmt.Errorf("read SO_ERROR: %w", err)
	}
	return errors.New("EPOLLERR with no socket error")
}
