package config

import (
	"math"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// The settings of the relay's edge: TLS on listeners and to pools, the PROXY protocol, trusted proxies,
// limits and allowed origins.

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// resolvePath joins a relative path to the directory of the configuration file, so that the file means
// the same wherever the relay is started from.
func (d *decoder) resolvePath(p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(filepath.Dir(d.file), p)
}

// filePath sets *dst to key's value, a path resolved against the configuration file's directory. An
// optional path may be "" (none); a required one may be neither absent nor "".
func (d *decoder) filePath(f *fields, key string, dst *string, what string, required bool) {
	accepted := what + ", absolute or relative to the configuration file's directory"
	if !d.str(f, key, dst, accepted) {
		if required && !f.has(key) {
			d.required(f, key, accepted)
		}
		return
	}
	if *dst == "" {
		if required {
			n, path := f.get(key)
			d.errorf(n, path, "empty path; accepted: %s", accepted)
		}
		return
	}
	*dst = d.resolvePath(*dst)
}

const proxySyntax = "an IP address such as 192.0.2.1 or ::1, or a CIDR such as 10.0.0.0/8"

// trustedProxies reads a listener's trusted_proxies: nil when the list is empty.
func (d *decoder) trustedProxies(f *fields) []netip.Prefix {
	items, path, ok := d.list(f, "trusted_proxies", "a list of IP addresses and CIDRs such as 10.0.0.0/8")
	if !ok {
		return nil
	}
	var out []netip.Prefix
	for i, item := range items {
		n, ipath := resolve(item), index(path, i)
		if n.Kind != yaml.ScalarNode || isNull(n) {
			d.errorf(n, ipath, "got %s; accepted: %s", describe(n), proxySyntax)
			continue
		}
		p, err := netip.ParsePrefix(n.Value)
		if !strings.Contains(n.Value, "/") {
			var a netip.Addr
			if a, err = netip.ParseAddr(n.Value); err == nil && a.Zone() == "" {
				p = netip.PrefixFrom(a, a.BitLen())
			}
		}
		switch {
		case err != nil || !p.IsValid():
			d.errorf(n, ipath, "%q is not an IP address or a CIDR; accepted: %s", n.Value, proxySyntax)
			continue
		case p != p.Masked():
			// Go would take 10.0.0.1/8 as 10.0.0.0/8, but it may as well be a mistyped 10.0.0.1/32.
			d.errorf(n, ipath, "%q has bits set past its prefix length; accepted: %s, or %s alone", n.Value, p.Masked(), p.Addr())
			continue
		}
		// A peer's IPv4 address is compared unmapped: ::ffff:10.0.0.0/104 is 10.0.0.0/8.
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		out = append(out, p)
	}
	return out
}

const certificatesSyntax = "a list of certificates, at least one, each {cert: PATH, key: PATH}"

func (d *decoder) listenerTLS(n *yaml.Node, path string) *ListenerTLS {
	t := &ListenerTLS{MinVersion: TLS12}
	f := d.mapping(n, path, "TLS settings", "certificates", "min_version", "reload_interval")
	if f == nil {
		return t
	}
	if items, cpath, ok := d.list(f, "certificates", certificatesSyntax); ok {
		if len(items) == 0 {
			d.errorf(f.line("certificates"), cpath, "empty list; accepted: %s", certificatesSyntax)
		}
		for i, item := range items {
			var c Certificate
			if cf := d.mapping(item, index(cpath, i), "a certificate", "cert", "key"); cf != nil {
				d.filePath(cf, "cert", &c.Cert, "the path of a PEM certificate chain", true)
				d.filePath(cf, "key", &c.Key, "the path of the PEM private key of cert", true)
			}
			t.Certificates = append(t.Certificates, c)
		}
	} else if !f.has("certificates") {
		d.required(f, "certificates", certificatesSyntax)
	}
	d.oneOf(f, "min_version", "a TLS version", &t.MinVersion, tlsVersions...)
	d.duration(f, "reload_interval", &t.ReloadInterval, tunnelTimeout)
	return t
}

func (d *decoder) limits(n *yaml.Node, path string, l *Limits) {
	f := d.mapping(n, path, "limits", "max_tunnels", "max_tunnels_per_ip", "handshakes_per_ip", "max_concurrent_handshakes")
	if f == nil {
		return
	}
	d.integer(f, "max_tunnels", &l.MaxTunnels, 0, maxMaxTunnels)
	perIPOK := d.integer(f, "max_tunnels_per_ip", &l.MaxTunnelsPerIP, 0, maxMaxTunnels)
	if hn, hpath := f.get("handshakes_per_ip"); hn != nil {
		d.rateLimit(hn, hpath, &l.HandshakesPerIP)
	}
	d.integer(f, "max_concurrent_handshakes", &l.MaxConcurrentHandshakes, 0, maxMaxTunnels)
	if perIPOK && l.MaxTunnels > 0 && l.MaxTunnelsPerIP > l.MaxTunnels {
		pn, ppath := f.get("max_tunnels_per_ip")
		d.warnf(pn, ppath, "never reached: max_tunnels, %d, is lower", l.MaxTunnels)
	}
}

func (d *decoder) rateLimit(n *yaml.Node, path string, r *RateLimit) {
	f := d.mapping(n, path, "a rate limit", "rate", "burst")
	if f == nil {
		return
	}
	if f.has("rate") && !d.number(f, "rate", &r.Rate, 0, maxRate) {
		return // whether burst is wanted, and its default, depend on rate
	}
	if r.Rate == 0 {
		if f.has("burst") {
			d.errorf(f.line("burst"), join(path, "burst"), "given with rate: 0, which is off; accepted only with a rate more than 0")
		}
		return
	}
	r.Burst = max(1, int(math.Ceil(r.Rate)))
	d.integer(f, "burst", &r.Burst, 1, maxMaxTunnels)
}

const originSyntax = "scheme://host[:port] with scheme http or https and no path, such as https://app.example.com"

// origins reads a route's origins: nil when the list is empty.
func (d *decoder) origins(f *fields) []string {
	items, path, ok := d.list(f, "origins", "a list of origins such as https://app.example.com; omit origins to allow any")
	if !ok {
		return nil
	}
	var out []string
	for i, item := range items {
		n, ipath := resolve(item), index(path, i)
		switch {
		case n.Kind != yaml.ScalarNode || isNull(n):
			d.errorf(n, ipath, "got %s; accepted: %s", describe(n), originSyntax)
			continue
		case n.Value == "*":
			d.errorf(n, ipath, `"*" is not an origin; accepted: %s (omit origins to allow any)`, originSyntax)
			continue
		}
		o, ok := parseOrigin(n.Value)
		if !ok {
			d.errorf(n, ipath, "%q is not an origin; accepted: %s", n.Value, originSyntax)
			continue
		}
		out = append(out, o)
	}
	return out
}

// parseOrigin checks an origin and writes it as browsers send the Origin header: lower-cased, IP
// addresses canonical, and without the scheme's default port.
func parseOrigin(s string) (string, bool) {
	scheme, hostport, ok := strings.Cut(strings.ToLower(s), "://")
	if !ok || (scheme != "http" && scheme != "https") || hostport == "" || strings.ContainsAny(hostport, "/?#@ \t") {
		return "", false
	}
	host, port := hostport, ""
	if i := strings.LastIndexByte(hostport, ':'); i > strings.LastIndexByte(hostport, ']') {
		host, port = hostport[:i], hostport[i+1:]
		p, err := strconv.Atoi(port)
		if err != nil || p < 1 || p > 65535 || strings.TrimLeft(port, "0123456789") != "" {
			return "", false
		}
		if (scheme == "http" && p == 80) || (scheme == "https" && p == 443) {
			port = ""
		} else {
			port = ":" + strconv.Itoa(p)
		}
	}
	if inner, ok := strings.CutPrefix(host, "["); ok {
		a, err := netip.ParseAddr(strings.TrimSuffix(inner, "]"))
		if err != nil || !strings.HasSuffix(inner, "]") || !a.Is6() || a.Zone() != "" {
			return "", false
		}
		host = "[" + a.String() + "]"
	} else if a, err := netip.ParseAddr(host); err == nil {
		if !a.Is4() {
			return "", false // an IPv6 address without brackets
		}
	} else if !isDNSName(host) {
		return "", false
	}
	return scheme + "://" + host + port, true
}

const serverNameSyntax = `a DNS name such as chat.internal, or an IP address; "" for each server's host`

func (d *decoder) poolTLS(n *yaml.Node, path string) PoolTLS {
	t := PoolTLS{Enabled: true}
	f := d.mapping(n, path, "upstream TLS settings", "enabled", "server_name", "ca_file", "cert", "key", "insecure_skip_verify")
	if f == nil {
		return t
	}
	d.boolean(f, "enabled", &t.Enabled)
	if d.str(f, "server_name", &t.ServerName, serverNameSyntax) && t.ServerName != "" {
		sn, spath := f.get("server_name")
		if a, err := netip.ParseAddr(t.ServerName); err == nil && a.Zone() == "" {
			t.ServerName = a.String()
		} else if err == nil || !isDNSName(t.ServerName) {
			d.errorf(sn, spath, "%q is not a server name; accepted: %s", t.ServerName, serverNameSyntax)
		} else {
			t.ServerName = strings.ToLower(strings.TrimSuffix(t.ServerName, "."))
		}
	}
	const (
		certWhat = "the path of a PEM client certificate chain"
		keyWhat  = "the path of the PEM private key of cert"
	)
	d.filePath(f, "ca_file", &t.CAFile, "the path of a PEM file of CA certificates", false)
	d.filePath(f, "cert", &t.Cert, certWhat, false)
	d.filePath(f, "key", &t.Key, keyWhat, false)
	if (t.Cert == "") != (t.Key == "") {
		missing, given, what := "key", "cert", keyWhat
		if t.Cert == "" {
			missing, given, what = "cert", "key", certWhat
		}
		// Absent or "", not a value of the wrong type, which has been reported.
		if mn, _ := f.get(missing); mn == nil || (mn.Kind == yaml.ScalarNode && !isNull(mn)) {
			d.errorf(f.line(missing), join(path, missing), "required with %s; accepted: %s, absolute or relative to the configuration file's directory",
				given, what)
		}
	}
	if d.boolean(f, "insecure_skip_verify", &t.InsecureSkipVerify) && t.InsecureSkipVerify && t.CAFile != "" {
		cn, cpath := f.get("ca_file")
		d.warnf(cn, cpath, "not used: insecure_skip_verify is true, which verifies no certificate")
	}
	return t
}
