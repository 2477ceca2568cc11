package relay

import (
	"time"
)

// tunnelActivity is what enforceTunnelTimeouts remembers of one tunnel between scans.
type tunnelActivity struct {
	progress uint64    // datapath.Pair.Progress at the last scan
	at       time.Time // when progress last changed (or the tunnel started)
}

// enforceTunnelTimeouts closes tunnels idle for idle (no byte either way), tunnels older than lifetime,
// and half-closed tunnels past their own half-close timeout; 0 turns idle or lifetime off. It scans every
// tunnel every tick from one goroutine, until stop is closed: nothing wakes per tunnel, and no datapath
// does any work for it. A tunnel is active when TCP moved a byte on either of its sockets since the last
// scan (datapath.Pair.Progress), or, for kernel tunnels, when the BPF verdict recorded a segment (last_ns), so a
// tunnel is closed between idle and idle+tick after its last byte.
func (s *Server) enforceTunnelTimeouts(idle, lifetime, tick time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(tick)
	defer t.Stop()
	seen := map[uint64]*tunnelActivity{}
	// A short half-close timeout makes the tick short; the idle timeout's scan of every tunnel (system
	// calls each) still runs only at the idle timeout's own tick.
	idleEvery, lastIdleScan := timeoutTick(idle), time.Time{}
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			idleNow := time.Duration(0)
			if idle > 0 && now.Sub(lastIdleScan) >= idleEvery-tick/2 {
				idleNow, lastIdleScan = idle, now
			}
			live := s.tunnels.Tunnels()
			ids := make(map[uint64]bool, len(live))
			for _, tn := range live {
				ids[tn.ID] = true
				s.checkTunnelTimeouts(tn, now, idleNow, lifetime, seen)
			}
			for id := range seen {
				if !ids[id] {
					delete(seen, id)
				}
			}
		}
	}
}

// checkTunnelTimeouts ends tn if its lifetime, idle or half-close timeout has passed at now (idle 0:
// not checked in this scan); seen keeps its activity between scans.
func (s *Server) checkTunnelTimeouts(tn *Tunnel, now time.Time, idle, lifetime time.Duration, seen map[uint64]*tunnelActivity) {
	if tn.parked.Load() {
		return // an upgrade is handing it over: whichever process carries it next checks it
	}
	if lifetime > 0 && now.Sub(tn.Started) >= lifetime {
		s.log.Info("tunnel lifetime reached, closing it", "id", tn.ID, "client", tn.ClientAddr,
			"upstream", tn.UpstreamAddr, "lifetime", lifetime)
		tn.end(ReasonLifetime, true)
		return
	}
	halfClosed, isHalfClosed := tn.pair.HalfClosedSince()
	isHalfClosed = isHalfClosed && tn.halfClosedTimeout > 0
	if idle <= 0 && !isHalfClosed {
		return // no timeout needs its activity: spare the system calls
	}
	lastActive := tn.lastActive(now, seen)
	if idle > 0 && now.Sub(lastActive) >= idle {
		// Nothing moved on the wire for idle. Usually nothing is waiting either, and both sides get a
		// FIN, a clean end. But a reader that stopped (or reads from its own full receive queue) leaves
		// bytes unsent: those would be lost behind a FIN that looks clean, so such a tunnel is reset, as
		// nginx's send timeout and HAProxy's tunnel timeout also end it.
		unsent := tn.pair.Unsent()
		s.log.Info("tunnel idle, closing it", "id", tn.ID, "client", tn.ClientAddr,
			"upstream", tn.UpstreamAddr, "idle", now.Sub(lastActive).Round(time.Millisecond),
			"unsent_bytes_reset", unsent)
		tn.end(ReasonIdleTimeout, unsent)
		return
	}
	// Half-closed: one side finished and the other has moved nothing since, for the half-close timeout.
	// Measured from the later of the FIN and the last byte, as HAProxy's client-fin and server-fin are
	// inactivity timeouts: a protocol that half-closes and then streams the other way lives on.
	if isHalfClosed && now.Sub(later(halfClosed, lastActive)) >= tn.halfClosedTimeout {
		unsent := tn.pair.Unsent()
		s.log.Info("tunnel half-closed and quiet, closing it", "id", tn.ID, "client", tn.ClientAddr,
			"upstream", tn.UpstreamAddr, "half_closed_for", now.Sub(halfClosed).Round(time.Millisecond),
			"timeout", tn.halfClosedTimeout, "unsent_bytes_reset", unsent)
		tn.end(ReasonHalfClosed, unsent)
	}
}

// lastActive is when a byte last moved on tn, as far as the scans at now and before it can tell.
func (tn *Tunnel) lastActive(now time.Time, seen map[uint64]*tunnelActivity) time.Time {
	progress := tn.pair.Progress()
	a := seen[tn.ID]
	if a == nil {
		// From zero: what moved before the first scan counts as activity now, so that no tunnel is
		// closed sooner than its timeout after its last byte.
		a = &tunnelActivity{at: later(tn.Started, tn.activeAt())}
		seen[tn.ID] = a
	}
	if progress != a.progress {
		a.progress, a.at = progress, now
	}
	if k, ok := tn.pair.LastActive(); ok && k.After(a.at) {
		a.at = k
	}
	return a.at
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// timeoutTick is how often enforceTunnelTimeouts scans: a tenth of the shortest timeout above 0, so that
// a timeout fires at most 10% late, but at least every 10 s. A scan costs a few system calls per tunnel
// (TCP_INFO on both sockets, and the BPF counters of kernel tunnels): with an hour's idle timeout and
// 10 000 tunnels that is 4000 calls a second instead of 40 000 at a one-second tick. Never more often
// than every 100 ms. The half-close timeouts cost only the tunnels that are half-closed.
func timeoutTick(timeouts ...time.Duration) time.Duration {
	var shortest time.Duration
	for _, d := range timeouts {
		if d > 0 && (shortest == 0 || d < shortest) {
			shortest = d
		}
	}
	return min(max(shortest/10, 100*time.Millisecond), 10*time.Second)
}
