package upstream

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
)

// dnsTimeout bounds one resolution, so that a resolver that never answers delays the next try by at
// most this, not forever.
const dnsTimeout = 10 * time.Second

// refreshDNS resolves the pool's DNS name once and, on success, makes the answer the pool's servers
// (keeping the *Server of every address that stays, as Update does). On failure, or an empty answer,
// the servers stay as they were and the error shows in Snapshot: a resolver outage must not empty a
// pool whose servers are still there.
func (p *Pool) refreshDNS(ctx context.Context) error {
	p.mu.Lock()
	if p.spec.DNS == nil {
		p.mu.Unlock()
		return nil
	}
	spec, gen := *p.spec.DNS, p.dnsGen
	p.mu.Unlock()

	rctx, cancel := context.WithTimeout(ctx, min(spec.Interval, dnsTimeout))
	found, err := resolve(rctx, p.resolver, spec)
	cancel()
	if ctx.Err() != nil {
		return ctx.Err() // closing
	}

	p.mu.Lock()
	if gen != p.dnsGen {
		p.mu.Unlock()
		return nil // Update changed the name meanwhile; a fresh resolution is on its way
	}
	var removed []*Server
	if err != nil {
		if p.dns.err != err.Error() {
			p.log.Warn("dns discovery failed; keeping the servers", "error", err, "servers", len(p.servers))
		}
		p.dns.err = err.Error()
	} else {
		p.dns = dnsState{resolvedAt: p.now()}
		before := len(p.servers)
		removed = p.setServersLocked(found)
		if len(removed) > 0 || len(p.servers) != before {
			p.log.Info("dns discovery changed the servers", "servers", len(p.servers), "removed", addresses(removed))
		}
	}
	p.mu.Unlock()
	if len(removed) > 0 && p.onRemoved != nil {
		p.onRemoved(removed)
	}
	return err
}

// resolve turns one DNS answer into server specs, sorted by address so that the pool's order (and
// round-robin's) does not change with the resolver's shuffling.
func resolve(ctx context.Context, r Resolver, d DNSSpec) ([]ServerSpec, error) {
	var out []ServerSpec
	switch d.Type {
	case DNSA, DNSAAAA:
		ips, err := r.LookupIPAddr(ctx, d.Name)
		if err != nil {
			return nil, fmt.Errorf("dns %s %s: %w", d.Type, d.Name, err)
		}
		port := strconv.Itoa(d.Port)
		for _, ip := range ips {
			if (ip.IP.To4() != nil) != (d.Type == DNSA) {
				continue
			}
			host := ip.IP.String()
			if ip.Zone != "" {
				host += "%" + ip.Zone
			}
			out = append(out, ServerSpec{Address: net.JoinHostPort(host, port), Weight: 1, MaxTunnels: d.MaxTunnels})
		}
	case DNSSRV:
		_, recs, err := r.LookupSRV(ctx, "", "", d.Name)
		if err != nil {
			return nil, fmt.Errorf("dns SRV %s: %w", d.Name, err)
		}
		recs = slices.DeleteFunc(recs, func(rec *net.SRV) bool {
			// A "." target says the service is not offered there (RFC 2782).
			return strings.TrimSuffix(rec.Target, ".") == "" || rec.Port == 0
		})
		// The lowest priority among usable records is the primaries'; the rest are backups (RFC 2782:
		// a client turns to a higher priority only when it cannot reach any target of a lower one).
		slices.SortStableFunc(recs, func(a, b *net.SRV) int { return cmp.Compare(a.Priority, b.Priority) })
		for _, rec := range recs {
			out = append(out, ServerSpec{
				Address:    net.JoinHostPort(strings.TrimSuffix(rec.Target, "."), strconv.Itoa(int(rec.Port))),
				Weight:     min(max(int(rec.Weight), 1), MaxWeight),
				MaxTunnels: d.MaxTunnels,
				Backup:     rec.Priority != recs[0].Priority,
			})
		}
	default:
		return nil, fmt.Errorf("dns %s: record type %q", d.Name, d.Type)
	}
	// One server per address; for SRV the lowest priority's record wins, having been sorted first.
	seen := make(map[string]bool, len(out))
	out = slices.DeleteFunc(out, func(s ServerSpec) bool {
		dup := seen[s.Address]
		seen[s.Address] = true
		return dup
	})
	if len(out) == 0 {
		return nil, fmt.Errorf("dns %s %s: %w", d.Type, d.Name, errNoRecords)
	}
	slices.SortFunc(out, func(a, b ServerSpec) int { return strings.Compare(a.Address, b.Address) })
	return out, nil
}

// errNoRecords is an answer with no usable record, which keeps the last servers like any failure.
var errNoRecords = errors.New("no usable records")
