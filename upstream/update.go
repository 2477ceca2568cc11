package upstream

import "fmt"

// Update replaces the pool's configuration with spec, as a config reload does, and returns the servers
// it no longer holds. Servers whose address stays are the same *Server: their live tunnels, health
// (active, passive and forced down) and totals carry over, while weight, max_tunnels, backup and drain
// become what spec says (so a reload undoes SetWeight and SetDrain, not MarkDown). The caller may close
// the removed servers' tunnels; their leases release correctly either way. An invalid spec changes
// nothing.
//
// With spec.DNS set the servers stay as they are (the last good set) until DNS discovery, resolving at
// once, replaces them and hands what it removed to Options.OnRemoved. Health checks also run at once,
// so that new servers are checked without waiting an interval.
func (p *Pool) Update(spec PoolSpec) (removed []*Server, err error) {
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("pool %q: update: %w", spec.Name, err)
	}
	spec = copySpec(spec)
	p.mu.Lock()
	old := p.spec
	p.spec = spec
	if spec.Balance != old.Balance {
		for _, s := range p.servers {
			s.current = 0
		}
	}
	if spec.DNS == nil || old.DNS == nil || spec.DNS.Name != old.DNS.Name || spec.DNS.Type != old.DNS.Type || spec.DNS.Port != old.DNS.Port {
		// A resolution in flight is for another name (or none): its answer must not land, and what
		// the old name's resolutions said no longer describes this pool.
		p.dnsGen++
		p.dns = dnsState{}
	}
	// A reload says afresh what weights and drains are: an operator's run-time changes end here.
	for _, s := range p.servers {
		s.weightOverride, s.drainOverride = 0, nil
	}
	if old.Active != nil && (spec.Active == nil || spec.Active.Type != old.Active.Type || spec.Active.Path != old.Active.Path ||
		spec.Active.ExpectStatus != old.Active.ExpectStatus) {
		// What the old check found says nothing under another check, and with none left nothing would
		// ever bring a server it took down back up.
		for _, s := range p.servers {
			s.activeDown, s.okStreak, s.failStreak, s.checkErr = false, 0, 0, ""
		}
	}
	if spec.DNS == nil {
		removed = p.setServersLocked(spec.Servers)
	} else {
		for _, s := range p.servers {
			s.maxTunnels.Store(int64(spec.DNS.MaxTunnels))
		}
	}
	p.mu.Unlock()
	wake(p.wakeHealth)
	wake(p.wakeDNS)
	if len(removed) > 0 {
		p.log.Info("servers removed by reload", "servers", addresses(removed))
	}
	return removed, nil
}

// setServersLocked makes specs the pool's servers, in that order, keeping the *Server of every address
// already there, and returns the servers that are gone.
func (p *Pool) setServersLocked(specs []ServerSpec) (removed []*Server) {
	kept := make(map[string]*Server, len(p.servers))
	for _, s := range p.servers {
		kept[s.addr] = s
	}
	next := make([]*Server, 0, len(specs))
	for _, spec := range specs {
		s, ok := kept[spec.Address]
		if ok {
			delete(kept, spec.Address)
			s.apply(spec)
		} else if s, ok = p.retired[spec.Address]; ok {
			// Back while it still carries tunnels from before: the same *Server, so that its live
			// count (max_tunnels, least_tunnels, bounded hashing) includes them.
			delete(p.retired, spec.Address)
			s.removed.Store(false)
			s.apply(spec)
		} else {
			s = newServer(spec)
		}
		next = append(next, s)
	}
	for addr, s := range p.retired {
		if s.live.Load() == 0 {
			delete(p.retired, addr)
		}
	}
	for _, s := range p.servers {
		if _, gone := kept[s.addr]; gone {
			removed = append(removed, s)
			s.removed.Store(true)
			if s.live.Load() > 0 {
				if p.retired == nil {
					p.retired = map[string]*Server{}
				}
				p.retired[s.addr] = s
			}
		}
	}
	p.servers = next
	return removed
}

func addresses(servers []*Server) []string {
	out := make([]string, len(servers))
	for i, s := range servers {
		out[i] = s.addr
	}
	return out
}
