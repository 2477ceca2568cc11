package config

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"

	"go.yaml.in/yaml/v3"
)

// AdminAccess says who may use the admin listener: the keys of admin given as a mapping.
type AdminAccess struct {
	// TokenFile holds the bearer token that admin requests which change something (POST, DELETE) must
	// carry; "" for none. Without one, such requests are refused on a TCP admin address; on a Unix
	// socket, its file permissions decide who may connect.
	TokenFile string
	// AllowRemote lets the admin listen on an address other than loopback. Without it such an address is
	// refused at start: the admin API can force servers down and reload the configuration.
	AllowRemote bool
	// Hosts are the host names, besides IP addresses and localhost, that admin requests may give in their
	// Host header (a name operators reach the admin by); others are refused, so that a DNS name rebound
	// to the admin's address cannot reach it from a browser. Lower-case.
	Hosts []string
	// UpgradeBinary is the only executable an upgrade (POST /admin/upgrade, SIGUSR2) starts; "" for the
	// relay's own, read again from disk at each upgrade. Fixed at the relay's start: a reload does not
	// change it, so that the admin token cannot have the relay run another program.
	UpgradeBinary string
}

// AdminSocket returns the path of an admin address that is a Unix socket (unix:/PATH).
func AdminSocket(addr string) (string, bool) {
	return strings.CutPrefix(addr, "unix:")
}

// CheckAdminAddress says what is wrong with an admin address: one that is neither HOST:PORT nor
// unix:/PATH with an absolute path, or one reachable from other hosts (every address, an address that is
// not loopback, a host name other than localhost) when allowRemote is false. "" disables the admin.
func CheckAdminAddress(addr string, allowRemote bool) error {
	if addr == "" {
		return nil
	}
	if path, ok := AdminSocket(addr); ok {
		if !filepath.IsAbs(path) {
			return fmt.Errorf("%q: a Unix socket's path must be absolute, e.g. unix:/run/sockrelay/admin.sock", addr)
		}
		return nil
	}
	if _, problem := normalizeAddress(addr, true); problem != "" {
		return fmt.Errorf("%q %s; accepted: %s", addr, problem, adminAddress)
	}
	if allowRemote || adminOnLoopback(addr) {
		return nil
	}
	return fmt.Errorf("%q can be reached from other hosts, and the admin API can force servers down and reload the configuration; "+
		"accepted: a loopback address such as 127.0.0.1:9180, unix:/PATH, or allow_remote: true (flag --admin-allow-remote) "+
		"to serve it on a network, where changes need the token of token_file (--admin-token-file)", addr)
}

// AdminHost returns a host name that admin requests may give as Host (admin.hosts, --admin-host) in
// the spelling that they are compared in, or what is wrong with it.
func AdminHost(s string) (string, error) {
	if !isDNSName(s) || isIP(s) {
		return "", fmt.Errorf("%q is not a host name; accepted: %s (IP addresses and localhost are always accepted)", s, adminHost)
	}
	return strings.ToLower(strings.TrimSuffix(s, ".")), nil
}

// adminOnLoopback reports whether a HOST:PORT can only be reached from this host.
func adminOnLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

const (
	adminAddress = `HOST:PORT such as 127.0.0.1:9180 (loopback; others need allow_remote), unix:/PATH for a Unix socket, or "" to disable`
	adminMapping = "the admin listener"
	adminHost    = "a DNS name such as relay-admin.example.com"
)

// admin reads admin: an address, or a mapping of the address and who may use it.
func (d *decoder) admin(f *fields, c *Config) {
	n, path := f.get("admin")
	if n == nil {
		return
	}
	if n.Kind != yaml.MappingNode {
		if d.str(f, "admin", &c.Admin, adminAddress+"; or "+adminMapping+", a mapping with keys address, allow_remote, hosts, token_file, upgrade_binary") {
			d.adminAddress(n, path, c)
		}
		return
	}
	m := d.mapping(n, path, adminMapping, "address", "token_file", "allow_remote", "hosts", "upgrade_binary")
	if m == nil {
		return
	}
	d.boolean(m, "allow_remote", &c.AdminAccess.AllowRemote)
	d.filePath(m, "token_file", &c.AdminAccess.TokenFile, "a file holding the admin token", false)
	d.filePath(m, "upgrade_binary", &c.AdminAccess.UpgradeBinary, "the executable an upgrade starts", false)
	if items, hpath, ok := d.list(m, "hosts", "a list of "+adminHost+"s"); ok {
		for i, item := range items {
			h := resolve(item)
			if h.Kind != yaml.ScalarNode || isNull(h) {
				d.errorf(h, index(hpath, i), "got %s; accepted: %s", describe(h), adminHost)
				continue
			}
			name, err := AdminHost(h.Value)
			if err != nil {
				d.errorf(h, index(hpath, i), "%v", err)
				continue
			}
			c.AdminAccess.Hosts = append(c.AdminAccess.Hosts, name)
		}
	}
	if d.str(m, "address", &c.Admin, adminAddress) {
		an, apath := m.get("address")
		d.adminAddress(an, apath, c)
	}
}

// adminAddress checks the admin address given at n, once allow_remote is known.
func (d *decoder) adminAddress(n *yaml.Node, path string, c *Config) {
	if err := CheckAdminAddress(c.Admin, c.AdminAccess.AllowRemote); err != nil {
		d.errorf(n, path, "%v", err)
		return
	}
	if _, unix := AdminSocket(c.Admin); c.Admin != "" && !unix {
		d.refs.admin = n // a TCP address, which must not be a listener's too
	}
}
