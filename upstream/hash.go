package upstream

import (
	"net"
	"net/http"
)

// Key returns the hash algorithm's key for one request, as h says to take it: the client's IP (without
// a port, so that a client's many connections agree), a header's first value, a cookie's value or the
// URL path. It is "" when the request lacks it, and Pick then falls back to round-robin rather than
// sending every such request to the one server that "" hashes to.
func (h HashSpec) Key(clientIP string, r *http.Request) string {
	switch h.By {
	case HashClientIP:
		if host, _, err := net.SplitHostPort(clientIP); err == nil {
			return host
		}
		return clientIP
	case HashHeader:
		if r != nil {
			return r.Header.Get(h.Name)
		}
	case HashCookie:
		if r != nil {
			if c, err := r.Cookie(h.Name); err == nil {
				return c.Value
			}
		}
	case HashPath:
		if r != nil && r.URL != nil {
			return r.URL.Path
		}
	}
	return ""
}
