package config

import (
	"net"
	"strings"
)

// Match returns the first of l's routes that matches a request for host and path, in the order the file
// gives them; false when none does.
//
// host is compared case-insensitively, without its port and trailing dot: "Chat.Example.com:8080"
// matches a route for chat.example.com. A route host "*.example.com" matches one or more labels before
// example.com (a.example.com, a.b.example.com) but not example.com itself; a route without host matches
// every host.
//
// The path prefix matches on segment boundaries: "/ws" matches "/ws" and "/ws/x" but not "/wsx", unlike
// nginx's location /ws, which matches /wsfoo too. An application mounted at /ws rarely means /wsfoo, and
// a route that caught it would send it to the wrong pool. A prefix ending in "/" matches the paths that
// begin with it ("/ws/" matches "/ws/x" and "/ws/" but not "/ws"), and "/" matches every path.
//
// path is compared as given, byte for byte: pass the request's URL.Path, and clean it first (path.Clean)
// if "/ws/../admin" must not match "/ws"; the route decides the pool, not what the server makes of the path.
func (l *Listener) Match(host, path string) (*Route, bool) {
	host = normalizeRequestHost(host)
	if path == "" {
		path = "/"
	}
	for i := range l.Routes {
		r := &l.Routes[i]
		if hostMatches(r.Host, host) && pathMatches(r.PathPrefix, path) {
			return r, true
		}
	}
	return nil, false
}

// normalizeRequestHost brings a Host header to a route host's form: no port, no brackets around an IPv6
// address, no trailing dot, lower case.
func normalizeRequestHost(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	} else {
		h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	}
	return strings.ToLower(strings.TrimSuffix(h, "."))
}

// hostMatches compares a route's host with a normalized request host.
func hostMatches(pattern, host string) bool {
	if pattern == "" {
		return true
	}
	if base, ok := strings.CutPrefix(pattern, "*."); ok {
		return len(host) > len(base)+1 && strings.HasSuffix(host, "."+base)
	}
	return pattern == host
}

func pathMatches(prefix, path string) bool {
	if !strings.HasPrefix(path, prefix) {
		return false
	}
	return len(path) == len(prefix) || strings.HasSuffix(prefix, "/") || path[len(prefix)] == '/'
}

// covers reports whether route a matches every request route b matches, which makes b dead when a
// comes first.
func covers(a, b Route) bool {
	return hostCovers(a.Host, b.Host) && pathMatches(a.PathPrefix, b.PathPrefix)
}

func hostCovers(a, b string) bool {
	if a == "" || a == b {
		return true
	}
	base, ok := strings.CutPrefix(a, "*.")
	if !ok || b == "" {
		return false
	}
	// *.example.com covers a.example.com and *.a.example.com, but not example.com.
	b, _ = strings.CutPrefix(b, "*.")
	return strings.HasSuffix(b, "."+base)
}
