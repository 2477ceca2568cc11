package config

import (
	"fmt"
	"net"
	"strings"

	"go.yaml.in/yaml/v3"
)

// crossCheck runs the checks that span sections, once the whole file is read: routes lead to pools that
// exist, listeners do not share a name or an address, and, as warnings, every pool is used and every
// route can match.
func (d *decoder) crossCheck(c *Config) {
	used := map[string]bool{}
	if d.refs.poolsGiven {
		var names []string
		for _, p := range c.Pools {
			names = append(names, p.Name)
		}
		for _, r := range d.refs.routes {
			used[r.pool.Value] = true
			if _, ok := d.refs.pools[r.pool.Value]; !ok {
				d.errorf(r.pool, join(r.path, "pool"), "%q is not a pool; accepted: %s", r.pool.Value, strings.Join(names, ", "))
			}
		}
		// Unused pools only when every route was readable: a broken route may be the one that uses it.
		if len(d.errs) == 0 {
			for _, p := range c.Pools {
				if !used[p.Name] {
					d.warnf(d.refs.pools[p.Name], join("pools", p.Name), "not used by any route")
				}
			}
		}
	}
	d.checkListeners(c)
	for i := range c.Listeners {
		d.checkShadowedRoutes(&c.Listeners[i], i)
	}
}

func (d *decoder) checkListeners(c *Config) {
	names := map[string]int{}
	var addrs []boundAddr
	for i, ref := range d.refs.listeners {
		l := &c.Listeners[i]
		path := fmt.Sprintf("listeners[%d]", i)
		if first, dup := names[l.Name]; dup {
			at, npath := ref.name, join(path, "name")
			if at == nil { // the default name, taken by an earlier listener's explicit one
				at = ref.node
			}
			d.errorf(at, npath, "%q is already the name of listeners[%d] (line %d); accepted: a name no other listener has",
				l.Name, first, d.refs.listeners[first].node.Line)
		} else {
			names[l.Name] = i
		}
		if ref.address == nil {
			continue
		}
		addr, _ := normalizeAddress(l.Address, true)
		if d.conflict(ref.address, join(path, "address"), addr, addrs) {
			continue
		}
		addrs = append(addrs, boundAddr{addr, fmt.Sprintf("%s (%q, line %d)", path, l.Name, ref.address.Line)})
	}
	if d.refs.admin != nil {
		addr, _ := normalizeAddress(c.Admin, true)
		d.conflict(d.refs.admin, "admin", addr, addrs)
	}
}

// boundAddr is an address a listener binds.
type boundAddr struct {
	addr  string // normalized
	owner string // listeners[0] ("public", line 5)
}

// conflict reports whether addr, given at n, would be bound twice: it is the address of an earlier
// listener, or either listens on every address of the same port. Port 0 takes a free port each time,
// and so never conflicts.
func (d *decoder) conflict(n *yaml.Node, path, addr string, earlier []boundAddr) bool {
	_, port, _ := net.SplitHostPort(addr)
	if port == "0" {
		return false
	}
	for _, e := range earlier {
		_, eport, _ := net.SplitHostPort(e.addr)
		switch {
		case e.addr == addr:
			d.errorf(n, path, "%s is already the address of %s; accepted: an address no other listener has", n.Value, e.owner)
			return true
		case eport == port && (isWildcard(addr) || isWildcard(e.addr)):
			d.errorf(n, path, "%s overlaps the address of %s, as one of them listens on every address of port %s; accepted: another port, or a specific address for both",
				n.Value, e.owner, port)
			return true
		}
	}
	return false
}

// checkShadowedRoutes warns of a route that can never match because an earlier one matches every
// request it would: first match wins, so the order of routes matters, and a catch-all put first is an
// easy mistake.
func (d *decoder) checkShadowedRoutes(l *Listener, i int) {
	for j := range l.Routes {
		for k := range j {
			if covers(l.Routes[k], l.Routes[j]) {
				routes := d.refs.listeners[i].routes
				d.warnf(routes[j], fmt.Sprintf("listeners[%d].routes[%d]", i, j),
					"never matched: routes[%d] (line %d) matches every request it would", k, routes[k].Line)
				break
			}
		}
	}
}
