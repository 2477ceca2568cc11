package relay

import "time"

// tunnelActivity is what enforceTunnelTimeouts remembers of one tunnel between scans.
type tunnelActivity struct {
	bytes uint64    // both directions, at the last scan
	at    time.Time // when bytes last changed (or the tunnel started)
}

// enforceTunnelTimeouts closes tunnels idle for idle (no byte either way) and tunnels older than lifetime;
// 0 turns either off. It scans every tunnel every tick from one goroutine, until stop is closed: nothing
// wakes per tunnel, and no datapath does any work for it. A tunnel is active when its byte counts moved
// since the last scan, or, for kernel tunnels, when the BPF verdict recorded a segment (last_ns), so a
// tunnel is closed between idle and idle+tick after its last byte.
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
				up, down := tn.Bytes()
				a := seen[tn.ID]
				if a == nil {
					a = &tunnelActivity{bytes: up + down, at: tn.Started}
					seen[tn.ID] = a
				}
				if up+down != a.bytes {
					a.bytes, a.at = up+down, now
				}
				if k, ok := tn.kernelLastActive(); ok && k.After(a.at) {
					a.at = k
				}
				if now.Sub(a.at) >= idle {
					s.log.Info("tunnel idle, closing it", "id", tn.ID, "client", tn.ClientAddr,
						"upstream", tn.UpstreamAddr, "idle", now.Sub(a.at).Round(time.Millisecond))
					// Nothing is in flight: both sides get a FIN, a clean end.
					tn.end(ReasonIdleTimeout, false)
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

// timeoutTick is how often enforceTunnelTimeouts scans: a tenth of the shorter timeout, between 100 ms
// and 1 s, so that a timeout fires at most 10% late and a relay with many tunnels does not scan them
// more than once a second.
func timeoutTick(idle, lifetime time.Duration) time.Duration {
	shortest := idle
	if shortest <= 0 || (lifetime > 0 && lifetime < shortest) {
		shortest = lifetime
	}
	return min(max(shortest/10, 100*time.Millisecond), time.Second)
}
