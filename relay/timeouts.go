package relay

import (
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// tunnelActivity is what enforceTunnelTimeouts remembers of one tunnel between scans.
type tunnelActivity struct {
	progress uint64    // tcpProgress at the last scan
	at       time.Time // when progress last changed (or the tunnel started)
}

// hasUnsentBytes says whether either socket still has bytes in its send queue (SIOCOUTQ), which a
// clean close would hide from the peer if they never arrive.
func (t *Tunnel) hasUnsentBytes() bool {
	unsent := false
	for _, c := range []*net.TCPConn{t.Client, t.Upstream} {
		raw, err := c.SyscallConn()
		if err != nil {
			continue
		}
		_ = raw.Control(func(fd uintptr) {
			if n, err := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); err == nil && n > 0 {
				unsent = true
			}
		})
	}
	return unsent
}

// tcpProgress sums what TCP has moved on the tunnel's two sockets: bytes each received and bytes each
// sent and had acknowledged (TCP_INFO). It moves whenever a byte moves on either connection, whatever
// the datapath: a slow reader draining a full buffer counts, although the relay's own counters move only
// when a whole write completes.
func (t *Tunnel) tcpProgress() uint64 {
	var sum uint64
	for _, c := range []*net.TCPConn{t.Client, t.Upstream} {
		raw, err := c.SyscallConn()
		if err != nil {
			continue
		}
		_ = raw.Control(func(fd uintptr) {
			if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				sum += ti.Bytes_acked + ti.Bytes_received
			}
		})
	}
	return sum
}

// enforceTunnelTimeouts closes tunnels idle for idle (no byte either way) and tunnels older than lifetime;
// 0 turns either off. It scans every tunnel every tick from one goroutine, until stop is closed: nothing
// wakes per tunnel, and no datapath does any work for it. A tunnel is active when TCP moved a byte on
// either of its sockets since the last scan (tcpProgress), or, for kernel tunnels, when the BPF verdict
// recorded a segment (last_ns), so a tunnel is closed between idle and idle+tick after its last byte.
func (s *Server) enforceTunnelTimeouts(idle, lifetime, tick time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(tick)
	defer t.Stop()
	seen := map[uint64]*tunnelActivity{}
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			live := s.tunnels.Tunnels()
			ids := make(map[uint64]bool, len(live))
			for _, tn := range live {
				ids[tn.ID] = true
				if lifetime > 0 && now.Sub(tn.Started) >= lifetime {
					s.log.Info("tunnel lifetime reached, closing it", "id", tn.ID, "client", tn.ClientAddr,
						"upstream", tn.UpstreamAddr, "lifetime", lifetime)
					tn.end(ReasonLifetime, true)
					continue
				}
				if idle <= 0 {
					continue
				}
				progress := tn.tcpProgress()
				a := seen[tn.ID]
				if a == nil {
					// From zero: what moved before the first scan counts as activity now, so that no
					// tunnel is closed sooner than idle after its last byte.
					a = &tunnelActivity{at: tn.Started}
					seen[tn.ID] = a
				}
				if progress != a.progress {
					a.progress, a.at = progress, now
				}
				if k, ok := tn.kernelLastActive(); ok && k.After(a.at) {
					a.at = k
				}
				if now.Sub(a.at) >= idle {
					// Nothing moved on the wire for idle. Usually nothing is waiting either, and both
					// sides get a FIN, a clean end. But a reader that stopped (or reads from its own full
					// receive queue) leaves bytes unsent: those would be lost behind a FIN that looks
					// clean, so such a tunnel is reset, as nginx's send timeout and HAProxy's tunnel
					// timeout also end it.
					unsent := tn.hasUnsentBytes()
					s.log.Info("tunnel idle, closing it", "id", tn.ID, "client", tn.ClientAddr,
						"upstream", tn.UpstreamAddr, "idle", now.Sub(a.at).Round(time.Millisecond),
						"unsent_bytes_reset", unsent)
					tn.end(ReasonIdleTimeout, unsent)
				}
			}
			for id := range seen {
				if !ids[id] {
					delete(seen, id)
				}
			}
		}
	}
}

// timeoutTick is how often enforceTunnelTimeouts scans: a tenth of the shorter timeout, so that a timeout
// fires at most 10% late, but at least every 10 s. A scan costs a few system calls per tunnel (TCP_INFO
// on both sockets, and the BPF counters of kernel tunnels): with an hour's idle timeout and 10 000
// tunnels that is 4000 calls a second instead of 40 000 at a one-second tick. Never more often than
// every 100 ms.
func timeoutTick(idle, lifetime time.Duration) time.Duration {
	shortest := idle
	if shortest <= 0 || (lifetime > 0 && lifetime < shortest) {
		shortest = lifetime
	}
	return min(max(shortest/10, 100*time.Millisecond), 10*time.Second)
}
