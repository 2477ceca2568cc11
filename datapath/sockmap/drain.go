package sockmap

import (
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
)

const (
	drainFirstCheck = 200 * time.Microsecond
	drainMaxCheck   = 50 * time.Millisecond
	// stallTimeout: a direction whose FIN waits on bytes the kernel redirected but that neither reach the
	// destination's send queue nor wait there for a slow reader, for this long, is broken; the tunnel is
	// reset rather than left hanging (docs/datapath.md, "FIN, RST and the end of a tunnel").
	stallTimeout = 10 * time.Second
)

// checkDrains carries each waiting FIN across once every byte redirected before it has entered the
// destination's send queue (docs/datapath.md, "FIN, RST and the end of a tunnel"): shutting down or removing the socket earlier drops bytes still on
// their way through the psock backlog.
func (k *Engine) checkDrains() {
	now := time.Now()
	var finished, stalled, broken []*kernelTunnel
	k.mu.Lock()
	keep := k.drain[:0]
	for _, d := range k.drain {
		if now.Before(d.nextCheck) {
			keep = append(keep, d)
			continue
		}
		if d.relaying {
			// The goroutine relaying the demoted source's passed bytes carries the FIN after them.
			d.nextCheck = now.Add(drainMaxCheck)
			keep = append(keep, d)
			continue
		}
		st, handed, err := k.dirProgress(d, d.dst.fd)
		redirected := st.Bytes
		switch {
		case err != nil:
			stalled = append(stalled, d.kt)
		case st.Broken:
			// The verdict dropped bytes it could not keep exact: this stream must not end cleanly.
			broken = append(broken, d.kt)
		case st.Demoted || st.Passed != d.userRead:
			// Bytes before the FIN were passed to userspace: they go first, and the FIN after them.
			// Normally a demotion event has started the relay already; this covers a lost event.
			k.countDemotionsLocked(d, st.Demotions)
			k.startRelayLocked(d)
			d.settled = 0
			d.nextCheck = now.Add(drainMaxCheck)
			keep = append(keep, d)
		case k.hooks.carryFINEarly, handed >= redirected && d.settled == redirected+1:
			if err := unix.Shutdown(d.dst.fd, unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
				stalled = append(stalled, d.kt)
				continue
			}
			d.finDone = true
			d.kt.p.MarkHalfClosed()
			if d.kt.dirs[0].finDone && d.kt.dirs[1].finDone {
				finished = append(finished, d.kt)
			}
		case handed >= redirected:
			// Everything counted so far is handed on, but TCP reports the FIN (EPOLLRDHUP) from inside
			// the softirq that queued the segment, just before that segment's bytes go through the
			// verdict. One more check a poll interval later, with the count unchanged, makes sure
			// the last segment's bytes were counted before the peer is shut.
			d.settled = redirected + 1
			d.nextCheck = now.Add(d.interval)
			keep = append(keep, d)
		default:
			d.settled = 0
			if handed != d.lastHanded {
				d.lastHanded, d.lastMove = handed, now
				d.interval = drainFirstCheck
			} else if now.Sub(d.lastMove) > stallTimeout && !hasUnsent(d.dst.fd) {
				k.log.Error("kernel tunnel stalled: redirected bytes never reached the peer; resetting it",
					"id", d.kt.p.ID, "redirected", redirected, "handed_on", handed)
				stalled = append(stalled, d.kt)
				continue
			} else {
				d.interval = min(2*d.interval, drainMaxCheck)
			}
			d.nextCheck = now.Add(d.interval)
			keep = append(keep, d)
		}
	}
	k.drain = keep
	k.mu.Unlock()
	// Only while kt still carries its pair: a LetGo or Stop since k.mu was released gave it back.
	for _, kt := range finished {
		kt.p.EndIfHeld(kt, datapath.ReasonClosed, false)
	}
	for _, kt := range stalled {
		kt.p.EndIfHeld(kt, datapath.ReasonStalled, true)
	}
	for _, kt := range broken {
		kt.p.EndIfHeld(kt, datapath.ReasonKernelError, true)
	}
}

// dirProgress returns the verdict's counters of d's source and how many of the bytes it redirected have
// entered its destination's send path, dstFD. The caller holds Engine.mu (dstFD is d.dst.fd) or is
// d's relaying goroutine (dstFD is its own conn's).
func (k *Engine) dirProgress(d *kernelDir, dstFD int) (loader.Stats, uint64, error) {
	st, err := k.maps.Stats(d.src.cookie)
	if err != nil {
		return loader.Stats{}, 0, err
	}
	sent, err := sentBytes(dstFD)
	if err != nil {
		return loader.Stats{}, 0, err
	}
	return st, sent - d.dst.sentBase - d.userWritten, nil
}

// hasUnsent reports whether the socket fd, a direction's destination, still has bytes to send: then the
// wait is a slow reader, not a stall.
func hasUnsent(fd int) bool {
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	return err == nil && outq > 0
}
