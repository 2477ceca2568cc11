package relay

import "time"

// logLongLivedTunnels writes a "tunnel alive" record, with the bytes so far, for every tunnel that has
// lived at least interval, once per interval, until stop is closed. A WebSocket may live for days, and
// without these records it would be invisible in the log until it ended. One goroutine serves every
// tunnel: nothing wakes per tunnel, and kernel tunnels' bytes come from the BPF counters as in
// /debug/tunnels. A tunnel's first record comes between one and two intervals after it opened.
func (s *Server) logLongLivedTunnels(interval time.Duration, stop <-chan struct{}) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			for _, t := range s.tunnels.Tunnels() {
				age := now.Sub(t.Started)
				if age < interval {
					continue
				}
				up, down := t.Bytes()
				s.log.Info("tunnel alive", "id", t.ID, "client", t.ClientAddr, "upstream", t.UpstreamAddr,
					"datapath", t.Datapath(), "bytes_to_upstream", up, "bytes_to_client", down,
					"age", age.Round(time.Second))
			}
		}
	}
}
