package config

import (
	"errors"
	"fmt"
	"github.com/sockrelay/sockrelay/datapath/auto"
	"github.com/sockrelay/sockrelay/internal/settings"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Defaults and ranges. The relay's own come from package settings, shared with the command line and
// relay.NewServer; those of pools mirror upstream.PoolSpec.Validate, so that a file accepted here is never
// refused later, without a line number. They are repeated rather than imported so that this package does
// not pull in the upstream package.
const (
	defaultAdmin  = "127.0.0.1:9180"
	maxWeight     = 1000       // upstream.MaxWeight
	maxMaxTunnels = 10_000_000 // upstream.MaxMaxTunnels
	maxTries      = 10         // upstream.MaxTries
	maxFailures   = 100        // passive_health.failures, health_check.rise and fall
	maxRate       = 1e6        // limits: a rate a second
)

var (
	timeout       = fromSettings(settings.Timeout)
	tunnelTimeout = fromSettings(settings.TunnelTimeout)

	logLevels  = []string{"debug", "info", "warn", "error"}
	logFormats = []string{"text", "json"}
	datapaths  = []string{"auto", "sockmap", "splice", "copy"}
	autoStarts = []string{"measured", "copy", "sockmap"}
	balances   = []string{BalanceRoundRobin, BalanceLeastTunnels, BalanceHash, BalanceRandomTwo}
	hashBys    = []string{HashByClientIP, HashByHeader, HashByCookie, HashByPath}
	checkTypes = []string{CheckTCP, CheckHTTP, CheckWebSocket}
	dnsTypes   = []string{"A", "AAAA", "SRV"}

	listenerTypes  = []string{ListenerHTTP, ListenerTCP}
	tlsVersions    = []string{TLS12, TLS13}
	proxyProtocols = []string{ProxyProtocolOff, ProxyProtocolV1, ProxyProtocolV2}
)

func defaults() *Config {
	return &Config{
		Admin:           defaultAdmin,
		LogLevel:        "info",
		LogFormat:       "text",
		Datapath:        "auto",
		Auto:            Auto{Start: "measured"},
		KernelHeldLimit: settings.DefaultKernelHeldLimit,
		Timeouts: Timeouts{
			ClientHeader:     settings.DefaultClientHeaderTimeout,
			Connect:          settings.DefaultConnectTimeout,
			UpstreamResponse: settings.DefaultUpstreamResponseTimeout,
			Shutdown:         settings.DefaultShutdownTimeout,
			HalfClosed:       settings.DefaultHalfClosedTimeout,
			TCPHalfClosed:    settings.DefaultTCPHalfClosedTimeout,
			HTTPIdle:         settings.DefaultHTTPIdleTimeout,
		},
		MaxHeaderBytes: settings.DefaultMaxHeaderBytes,
	}
}

// refs keeps, while a file is walked, where each name and address was given, for the checks across
// sections that run once the whole file is read.
type refs struct {
	listeners  []listenerRef
	routes     []routeRef
	poolsGiven bool                  // pools was a mapping: a route to a missing pool can be reported
	pools      map[string]*yaml.Node // pool name: its key
	admin      *yaml.Node
}

type listenerRef struct {
	node, name, address *yaml.Node // name is nil when the default name was taken
	routes              []*yaml.Node
}

type routeRef struct {
	path string // listeners[0].routes[1]
	pool *yaml.Node
}

func (d *decoder) config(root *yaml.Node) *Config {
	c := defaults()
	d.refs.pools = map[string]*yaml.Node{}
	f := d.mapping(root, "", "a configuration", "admin", "log_level", "log_format", "datapath", "auto", "kernel_held_limit",
		"event_loops", "tunnel_log_interval", "timeouts", "max_header_bytes", "limits", "listeners", "pools")
	if f == nil {
		return c
	}
	d.admin(f, c)
	d.oneOf(f, "log_level", "a log level", &c.LogLevel, logLevels...)
	d.oneOf(f, "log_format", "a log format", &c.LogFormat, logFormats...)
	d.oneOf(f, "datapath", "a datapath", &c.Datapath, datapaths...)
	d.size(f, "kernel_held_limit", &c.KernelHeldLimit, settings.KernelHeldLimit)
	d.count(f, "event_loops", &c.EventLoops, settings.EventLoops)
	if n, path := f.get("auto"); n != nil {
		d.auto(n, path, &c.Auto)
	}
	d.duration(f, "tunnel_log_interval", &c.TunnelLogInterval, tunnelTimeout)
	if n, path := f.get("timeouts"); n != nil {
		if t := d.mapping(n, path, "the timeouts", "client_header", "connect", "upstream_response", "shutdown",
			"tunnel_idle", "tunnel_lifetime", "half_closed", "tcp_half_closed", "http_idle"); t != nil {
			d.duration(t, "client_header", &c.Timeouts.ClientHeader, timeout)
			d.duration(t, "connect", &c.Timeouts.Connect, timeout)
			d.duration(t, "upstream_response", &c.Timeouts.UpstreamResponse, timeout)
			d.duration(t, "shutdown", &c.Timeouts.Shutdown, timeout)
			d.duration(t, "http_idle", &c.Timeouts.HTTPIdle, timeout)
			d.duration(t, "tunnel_idle", &c.Timeouts.TunnelIdle, tunnelTimeout)
			d.duration(t, "tunnel_lifetime", &c.Timeouts.TunnelLifetime, tunnelTimeout)
			d.duration(t, "half_closed", &c.Timeouts.HalfClosed, tunnelTimeout)
			d.duration(t, "tcp_half_closed", &c.Timeouts.TCPHalfClosed, tunnelTimeout)
		}
	}
	d.size(f, "max_header_bytes", &c.MaxHeaderBytes, settings.MaxHeaderBytes)
	if n, path := f.get("limits"); n != nil {
		d.limits(n, path, &c.Limits)
	}

	if f.has("pools") {
		c.Pools = d.pools(f)
	} else {
		d.required(f, "pools", "a mapping of pool names to pools, at least one")
	}
	if items, path, ok := d.list(f, "listeners", "a list of listeners, at least one"); ok {
		if len(items) == 0 {
			d.errorf(f.line("listeners"), path, "empty list; accepted: a list of listeners, at least one")
		}
		for i, item := range items {
			c.Listeners = append(c.Listeners, d.listener(item, index(path, i), i, c.Datapath))
		}
	} else if !f.has("listeners") {
		d.required(f, "listeners", "a list of listeners, at least one")
	}
	d.crossCheck(c)
	return c
}

const (
	listenerAddress = "HOST:PORT such as 127.0.0.1:8080, or :8080 for every address"
	serverAddress   = "HOST:PORT such as 127.0.0.1:9001 or [::1]:9001"
)

func (d *decoder) listener(item *yaml.Node, path string, i int, datapath string) Listener {
	l := Listener{Name: "listener" + strconv.Itoa(i), Type: ListenerHTTP, Datapath: datapath, Routes: []Route{}}
	ref := listenerRef{node: resolve(item)}
	defer func() { d.refs.listeners = append(d.refs.listeners, ref) }()
	f := d.mapping(item, path, "a listener", "name", "address", "type", "datapath", "proxy_protocol",
		"trusted_proxies", "tls", "tls_passthrough", "limits", "routes")
	if f == nil {
		return l
	}
	if d.str(f, "name", &l.Name, nameSyntax) {
		ref.name, _ = f.get("name")
		d.name(ref.name, join(path, "name"))
	}
	if d.str(f, "address", &l.Address, listenerAddress) {
		n, apath := f.get("address")
		if d.address(n, apath, true) {
			ref.address = n
		}
	} else if !f.has("address") {
		d.required(f, "address", listenerAddress)
	}
	d.oneOf(f, "datapath", "a datapath", &l.Datapath, datapaths...)
	// What the other keys accept depends on type: when it is wrong, only what every type accepts is checked.
	typeOK := !f.has("type") || d.oneOf(f, "type", "a listener type", &l.Type, listenerTypes...)
	kind := routeKind{typ: l.Type}
	if !typeOK {
		kind.typ = ""
	}
	d.boolean(f, "proxy_protocol", &l.ProxyProtocol)
	if d.boolean(f, "tls_passthrough", &l.TLSPassthrough) {
		if l.TLSPassthrough && kind.typ == ListenerHTTP {
			d.errorf(f.line("tls_passthrough"), join(path, "tls_passthrough"),
				"given with type: http; accepted only with type: tcp (an http listener terminates TLS with tls)")
		}
	} else if f.has("tls_passthrough") {
		kind.typ = "" // whether routes may have hosts depends on it
	}
	kind.passthrough = l.TLSPassthrough
	if n, tpath := f.get("trusted_proxies"); n != nil {
		if kind.typ == ListenerTCP {
			d.errorf(f.line("trusted_proxies"), tpath,
				"given with type: tcp; accepted only with type: http (a tcp listener reads no X-Forwarded-For)")
		} else {
			l.TrustedProxies = d.trustedProxies(f)
		}
	}
	if n, tpath := f.get("tls"); n != nil {
		if kind.typ == ListenerTCP {
			d.errorf(f.line("tls"), tpath,
				"given with type: tcp; accepted only with type: http (a tcp listener relays TLS as it comes, routed by SNI with tls_passthrough)")
		} else {
			l.TLS = d.listenerTLS(n, tpath)
		}
	}
	if n, lpath := f.get("limits"); n != nil {
		d.limits(n, lpath, &l.Limits)
	}
	items, rpath, ok := d.list(f, "routes", "a list of routes, at least one")
	if !ok {
		if !f.has("routes") {
			d.required(f, "routes", "a list of routes, at least one, each with a pool")
		}
		return l
	}
	if len(items) == 0 {
		d.errorf(f.line("routes"), rpath, "empty list; accepted: a list of routes, at least one, each with a pool")
	} else if kind.typ == ListenerTCP && !kind.passthrough && len(items) > 1 {
		d.errorf(f.line("routes"), rpath,
			"%d routes on a tcp listener without tls_passthrough; accepted: exactly one route, with a pool and no host (a plain TCP stream has nothing to route by)",
			len(items))
	}
	for j, item := range items {
		ref.routes = append(ref.routes, resolve(item))
		l.Routes = append(l.Routes, d.route(item, index(rpath, j), kind))
	}
	return l
}

// routeKind is what a route's listener allows it: typ is "" when the listener's type or tls_passthrough
// was wrong, and then the keys that depend on them are not checked.
type routeKind struct {
	typ         string
	passthrough bool
}

const hostSyntax = "a host name without port such as chat.example.com, *.example.com for every name under it, or no host for any"

func (d *decoder) route(item *yaml.Node, path string, kind routeKind) Route {
	r := Route{PathPrefix: "/"}
	f := d.mapping(item, path, "a route", "host", "path_prefix", "origins", "pool")
	if f == nil {
		return r
	}
	tcp := kind.typ == ListenerTCP
	for _, key := range []string{"path_prefix", "origins"} {
		if tcp && f.has(key) {
			d.errorf(f.line(key), join(path, key),
				"given on a tcp listener; accepted only with type: http (tcp listeners route by SNI host only)")
		}
	}
	switch {
	case tcp && !kind.passthrough && f.has("host"):
		d.errorf(f.line("host"), join(path, "host"),
			"given on a tcp listener without tls_passthrough; accepted only with tls_passthrough: true, which matches it against the TLS SNI")
	case d.str(f, "host", &r.Host, hostSyntax):
		n, hpath := f.get("host")
		switch h, ok := routeHost(r.Host); {
		case !ok:
			d.errorf(n, hpath, "%q is not a host; accepted: %s", r.Host, hostSyntax)
		case tcp && isIP(h):
			d.errorf(n, hpath, "%q is an IP address, which TLS SNI never is; accepted: a host name such as chat.example.com or *.example.com, or no host for any", r.Host)
		default:
			r.Host = h
		}
	}
	if tcp {
		return d.routePool(f, path, r)
	}
	if d.str(f, "path_prefix", &r.PathPrefix, "a path starting with /") {
		n, ppath := f.get("path_prefix")
		if !strings.HasPrefix(r.PathPrefix, "/") || strings.ContainsAny(r.PathPrefix, "?# \t") {
			d.errorf(n, ppath, "%q is not a path prefix; accepted: a path starting with / such as /ws, without query or spaces", r.PathPrefix)
		}
	}
	r.Origins = d.origins(f)
	return d.routePool(f, path, r)
}

func (d *decoder) routePool(f *fields, path string, r Route) Route {
	if d.str(f, "pool", &r.Pool, "the name of a pool") {
		n, _ := f.get("pool")
		d.refs.routes = append(d.refs.routes, routeRef{path: path, pool: n})
	} else if !f.has("pool") {
		d.required(f, "pool", "the name of a pool under pools")
	}
	return r
}

// routeHost checks and normalizes a route's host: lower-cased, without a trailing dot, IPv6 without
// brackets, so that Match compares it with a request's host as it normalizes that.
func routeHost(s string) (string, bool) {
	if s == "" {
		return "", true
	}
	h := strings.ToLower(strings.TrimSuffix(s, "."))
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")); err == nil {
		return a.String(), true
	}
	base, _ := strings.CutPrefix(h, "*.")
	return h, isDNSName(base)
}

var dnsLabel = regexp.MustCompile(`^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$`)

// isDNSName accepts names of letters, digits, hyphens and underscores (which SRV names and some internal
// names have), in labels of 1 to 63 characters, 253 at most in all.
func isDNSName(s string) bool {
	s = strings.ToLower(strings.TrimSuffix(s, "."))
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if !dnsLabel.MatchString(label) {
			return false
		}
	}
	return true
}

// address checks a HOST:PORT. A listening address may leave the host out (every address) and take port 0
// (any free port, as tests do); a server's may not.
func (d *decoder) address(n *yaml.Node, path string, listen bool) bool {
	if _, problem := normalizeAddress(n.Value, listen); problem != "" {
		accepted := serverAddress
		if listen {
			accepted = listenerAddress
		}
		d.errorf(n, path, "%q %s; accepted: %s", n.Value, problem, accepted)
		return false
	}
	return true
}

// normalizeAddress returns a HOST:PORT in one spelling (IP addresses canonical, names lower-cased), so
// that two spellings of one address are found to be duplicates; or what is wrong with it.
func normalizeAddress(s string, listen bool) (string, string) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", "is not HOST:PORT"
	}
	lo := 1
	if listen {
		lo = 0
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < lo || p > 65535 {
		return "", fmt.Sprintf("has no port from %d to 65535", lo)
	}
	switch a, err := netip.ParseAddr(host); {
	case err == nil:
		host = a.String()
	case host == "":
		if !listen {
			return "", "has no host"
		}
	case isDNSName(host):
		host = strings.ToLower(strings.TrimSuffix(host, "."))
	default:
		return "", "has a host that is neither an IP address nor a DNS name"
	}
	return net.JoinHostPort(host, strconv.Itoa(p)), ""
}

// isWildcard reports whether a normalized listening address listens on every address: it then
// conflicts with any other listener on its port.
func isWildcard(addr string) bool {
	host, _, _ := net.SplitHostPort(addr)
	return host == "" || host == "0.0.0.0" || host == "::"
}

// Names of listeners and pools appear in key paths, metrics labels and admin URLs, hence the narrow
// syntax: no dots (pools.a.b would be ambiguous), no spaces, no slashes.
var nameRegexp = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

const nameSyntax = "a name of letters, digits, _ and -, starting with a letter or digit, at most 64 characters"

func (d *decoder) name(n *yaml.Node, path string) bool {
	if !nameRegexp.MatchString(n.Value) {
		d.errorf(n, path, "%q is not a name; accepted: %s", n.Value, nameSyntax)
		return false
	}
	return true
}

func (d *decoder) pools(f *fields) []Pool {
	n, path := f.get("pools")
	if n.Kind != yaml.MappingNode {
		d.errorf(n, path, "got %s; accepted: a mapping of pool names to pools, at least one", describe(n))
		return nil
	}
	d.refs.poolsGiven = true
	pairs := d.pairs(n, path)
	if len(pairs) == 0 {
		d.errorf(n, path, "empty mapping; accepted: a mapping of pool names to pools, at least one")
	}
	pools := []Pool{}
	for _, p := range pairs {
		ppath := join(path, p.key.Value)
		d.name(p.key, ppath)
		// Known even when misspelt, so that its routes are not also reported as leading nowhere.
		d.refs.pools[p.key.Value] = p.key
		d.at(ppath, p.key)
		pools = append(pools, d.pool(p.val, ppath, p.key.Value))
	}
	return pools
}

func (d *decoder) pool(n *yaml.Node, path, name string) Pool {
	p := Pool{
		Name:          name,
		Balance:       BalanceRoundRobin,
		Retry:         RetrySpec{Tries: 3, Timeout: 10 * time.Second},
		PassiveHealth: PassiveHealth{Failures: 3, Window: 10 * time.Second, DownFor: 30 * time.Second},
		Servers:       []Server{},
		ProxyProtocol: ProxyProtocolOff,
	}
	f := d.mapping(n, path, "a pool", "balance", "hash", "close_tunnels_on_removal", "retry", "passive_health",
		"health_check", "servers", "dns", "tls", "proxy_protocol")
	if f == nil {
		return p
	}
	balanceOK := !f.has("balance") || d.oneOf(f, "balance", "a balance method", &p.Balance, balances...)
	if p.Balance == BalanceHash {
		p.Hash = HashSpec{By: HashByClientIP, LoadFactor: 1.25}
	}
	if n, hpath := f.get("hash"); n != nil && balanceOK {
		if p.Balance != BalanceHash {
			d.errorf(f.line("hash"), hpath, "given with balance: %s; accepted only with balance: hash", p.Balance)
		} else {
			d.hash(n, hpath, &p.Hash)
		}
	}
	d.boolean(f, "close_tunnels_on_removal", &p.CloseTunnelsOnRemoval)
	if n, rpath := f.get("retry"); n != nil {
		if r := d.mapping(n, rpath, "retry settings", "tries", "timeout"); r != nil {
			d.integer(r, "tries", &p.Retry.Tries, 1, maxTries)
			d.duration(r, "timeout", &p.Retry.Timeout, between(100*time.Millisecond, 10*time.Minute))
		}
	}
	if n, hpath := f.get("passive_health"); n != nil {
		if h := d.mapping(n, hpath, "passive health settings", "failures", "window", "down_for"); h != nil {
			d.integer(h, "failures", &p.PassiveHealth.Failures, 0, maxFailures)
			d.duration(h, "window", &p.PassiveHealth.Window, between(time.Second, time.Hour))
			d.duration(h, "down_for", &p.PassiveHealth.DownFor, between(time.Second, time.Hour))
		}
	}
	if n, cpath := f.get("health_check"); n != nil {
		p.HealthCheck = d.healthCheck(n, cpath)
	}
	if n, tpath := f.get("tls"); n != nil {
		p.TLS = d.poolTLS(n, tpath)
	}
	d.oneOf(f, "proxy_protocol", "a PROXY protocol version", &p.ProxyProtocol, proxyProtocols...)
	hasServers := f.has("servers")
	dnsNode, dnsPath := f.get("dns")
	switch {
	case hasServers && dnsNode != nil:
		d.errorf(f.line("dns"), dnsPath, "given with servers; accepted: servers or dns, not both")
	case dnsNode != nil:
		p.DNS = d.dns(dnsNode, dnsPath)
	case !hasServers:
		d.required(f, "servers", "a list of servers, at least one, or dns")
	}
	if items, spath, ok := d.list(f, "servers", "a list of servers, at least one"); ok {
		if len(items) == 0 {
			d.errorf(f.line("servers"), spath, "empty list; accepted: a list of servers, at least one")
		}
		type serverRef struct{ index, line int }
		seen := map[string]serverRef{}
		backups := 0
		for i, item := range items {
			s, key, at := d.server(item, index(spath, i))
			if first, dup := seen[key]; dup {
				d.errorf(at, join(index(spath, i), "address"), "%s is already servers[%d] (line %d); accepted: each address once per pool",
					s.Address, first.index, first.line)
			} else if key != "" {
				seen[key] = serverRef{i, at.Line}
			}
			if s.Backup {
				backups++
			}
			p.Servers = append(p.Servers, s)
		}
		if backups > 0 && backups == len(items) {
			d.errorf(f.line("servers"), spath, "every server is a backup; accepted: at least one server with backup: false (backups take tunnels only while none of those is up)")
		}
	}
	return p
}

func (d *decoder) hash(n *yaml.Node, path string, h *HashSpec) {
	f := d.mapping(n, path, "a hash", "by", "name", "load_factor")
	if f == nil {
		return
	}
	if f.has("by") && !d.oneOf(f, "by", "a hash key", &h.By, hashBys...) {
		d.number(f, "load_factor", &h.LoadFactor, 1, 10)
		return // what name needs depends on by
	}
	named := h.By == HashByHeader || h.By == HashByCookie
	if d.str(f, "name", &h.Name, "a header or cookie name") {
		n, npath := f.get("name")
		switch {
		case !named:
			d.errorf(n, npath, "given with by: %s; accepted only with by: header or cookie", h.By)
		case !isToken(h.Name):
			d.errorf(n, npath, "%q is not a %s name; accepted: letters, digits and !#$%%&'*+-.^_`|~", h.Name, h.By)
		}
	} else if named && !f.has("name") {
		example := "X-User-Id"
		if h.By == HashByCookie {
			example = "session"
		}
		d.errorf(f.node, join(path, "name"), "required with by: %s; accepted: a %s name such as %s", h.By, h.By, example)
	}
	d.number(f, "load_factor", &h.LoadFactor, 1, 10)
}

// isToken reports whether s is an RFC 9110 token, which header and cookie names are.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

func (d *decoder) healthCheck(n *yaml.Node, path string) *HealthCheck {
	c := &HealthCheck{Type: CheckTCP, Interval: 5 * time.Second, Timeout: 2 * time.Second, Rise: 2, Fall: 3}
	f := d.mapping(n, path, "a health check", "type", "path", "expect_status", "interval", "timeout", "rise",
		"fall", "slow_start")
	if f == nil {
		return c
	}
	if f.has("type") && !d.oneOf(f, "type", "a health check type", &c.Type, checkTypes...) {
		c.Type = "" // what path and expect_status accept depends on type: skip them
	}
	for _, key := range []string{"path", "expect_status"} {
		if n, kpath := f.get(key); n != nil && c.Type == CheckTCP {
			d.errorf(f.line(key), kpath, "given with type: tcp; accepted only with type: http or websocket")
		}
	}
	if c.Type == CheckHTTP || c.Type == CheckWebSocket {
		c.Path, c.ExpectStatus = "/", 200
		if c.Type == CheckWebSocket {
			c.ExpectStatus = 101
		}
		if d.str(f, "path", &c.Path, "a path starting with /") && (!strings.HasPrefix(c.Path, "/") || strings.ContainsAny(c.Path, " \t#")) {
			n, ppath := f.get("path")
			d.errorf(n, ppath, "%q is not a path; accepted: a path starting with / such as /healthz", c.Path)
		}
		d.integer(f, "expect_status", &c.ExpectStatus, 100, 599)
	}
	intervalOK := !f.has("interval") || d.duration(f, "interval", &c.Interval, between(100*time.Millisecond, time.Hour))
	if !f.has("timeout") {
		c.Timeout = min(c.Timeout, c.Interval) // a short interval shortens the default timeout
	} else if d.duration(f, "timeout", &c.Timeout, atLeast(10*time.Millisecond)) && intervalOK && c.Timeout > c.Interval {
		n, tpath := f.get("timeout")
		d.errorf(n, tpath, "%s is longer than interval %s; accepted: at most the interval, so that checks of one server do not overlap",
			n.Value, settings.FormatDuration(c.Interval))
	}
	d.integer(f, "rise", &c.Rise, 1, maxFailures)
	d.integer(f, "fall", &c.Fall, 1, maxFailures)
	d.duration(f, "slow_start", &c.SlowStart, fromSettings(settings.Duration{Off: true, Min: time.Nanosecond, Max: time.Hour}))
	return c
}

// server reads a server given as a mapping or as a plain HOST:PORT string. It returns the server, its
// address normalized to find duplicates ("" when the address was wrong), and the address's node.
func (d *decoder) server(item *yaml.Node, path string) (Server, string, *yaml.Node) {
	s := Server{Weight: 1}
	n := resolve(item)
	if n.Kind == yaml.ScalarNode && !isNull(n) {
		s.Address = n.Value
		key, _ := normalizeAddress(n.Value, false)
		if key == "" {
			d.address(n, path, false)
		}
		return s, key, n
	}
	f := d.mapping(item, path, "a server (or a plain HOST:PORT)", "address", "weight", "max_tunnels", "backup", "drain")
	if f == nil {
		return s, "", n
	}
	key := ""
	if d.str(f, "address", &s.Address, serverAddress) {
		an, apath := f.get("address")
		if d.address(an, apath, false) {
			key, _ = normalizeAddress(s.Address, false)
		}
	} else if !f.has("address") {
		d.required(f, "address", serverAddress)
	}
	d.integer(f, "weight", &s.Weight, 1, maxWeight)
	d.integer(f, "max_tunnels", &s.MaxTunnels, 0, maxMaxTunnels)
	d.boolean(f, "backup", &s.Backup)
	d.boolean(f, "drain", &s.Drain)
	an, _ := f.get("address")
	if an == nil {
		an = f.node
	}
	return s, key, an
}

func (d *decoder) dns(n *yaml.Node, path string) *DNS {
	s := &DNS{Type: "A", Interval: 10 * time.Second}
	f := d.mapping(n, path, "a DNS discovery", "name", "type", "port", "interval", "max_tunnels")
	if f == nil {
		return s
	}
	const nameSyntax = "a DNS name such as chat.service.consul"
	if d.str(f, "name", &s.Name, nameSyntax) {
		nn, npath := f.get("name")
		if _, err := netip.ParseAddr(s.Name); err == nil {
			d.errorf(nn, npath, "%q is an IP address; accepted: %s (list IP addresses under servers)", s.Name, nameSyntax)
		} else if !isDNSName(s.Name) {
			d.errorf(nn, npath, "%q is not a DNS name; accepted: %s", s.Name, nameSyntax)
		}
	} else if !f.has("name") {
		d.required(f, "name", nameSyntax)
	}
	typeOK := !f.has("type") || d.oneOf(f, "type", "a DNS record type", &s.Type, dnsTypes...)
	portGiven := f.has("port")
	switch {
	case !typeOK:
		// whether port is wanted depends on type
	case s.Type == "SRV" && portGiven:
		d.errorf(f.line("port"), join(path, "port"), "given with type: SRV, whose records carry the ports; accepted only with type: A or AAAA")
	case s.Type != "SRV" && !portGiven:
		d.errorf(f.node, join(path, "port"), "required with type: %s; accepted: a port from 1 to 65535", s.Type)
	case portGiven:
		d.integer(f, "port", &s.Port, 1, 65535)
	}
	d.duration(f, "interval", &s.Interval, between(time.Second, 24*time.Hour))
	d.integer(f, "max_tunnels", &s.MaxTunnels, 0, maxMaxTunnels)
	return s
}

// auto reads the auto section: auto's per-tunnel policy.
func (d *decoder) auto(n *yaml.Node, path string, a *Auto) {
	f := d.mapping(n, path, "auto's per-tunnel policy", "start", "chatty_segments", "busy_segments", "quiet",
		"min_dwell", "max_dwell")
	if f == nil {
		return
	}
	before := len(d.errs)
	d.oneOf(f, "start", "a start policy", &a.Start, autoStarts...)
	d.number(f, "chatty_segments", &a.ChattySegments, 1, auto.MaxSettingRate)
	d.number(f, "busy_segments", &a.BusySegments, 1, auto.MaxSettingRate)
	d.duration(f, "quiet", &a.Quiet, between(time.Second, time.Hour))
	d.duration(f, "min_dwell", &a.MinDwell, between(auto.MinSettingDwell, auto.MaxSettingDwell))
	d.duration(f, "max_dwell", &a.MaxDwell, between(auto.MinSettingDwell, auto.MaxSettingDwell))
	if len(d.errs) == before {
		d.autoCombination(f, *a)
	}
}

// autoCombination checks the auto settings, each in range, over the defaults of every policy their start may
// put in force (relay.AutoOptions checks the same at start): min_dwell alone above a policy's max dwell, say,
// would otherwise pass here and fail the start, and only where the kernel engine loads.
func (d *decoder) autoCombination(f *fields, a Auto) {
	s := auto.Settings{ChattySegments: a.ChattySegments, BusySegments: a.BusySegments, QuietFor: a.Quiet,
		MinDwell: a.MinDwell, MaxDwell: a.MaxDwell}
	for _, p := range auto.StartPolicies(a.Start) {
		err := s.Check(p)
		var bad *auto.SettingError
		switch {
		case errors.As(err, &bad):
			n, path := f.get(bad.Key)
			d.errorf(n, path, "%s", bad.Msg)
			return
		case err != nil:
			d.errorf(f.node, f.path, "%v", err)
			return
		}
	}
}
