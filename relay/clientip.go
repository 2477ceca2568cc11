package relay

import (
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
)

// clientIdentity is who a request comes from, as far as the relay can tell.
type clientIdentity struct {
	// ip is the client's address: the peer's, or, when the peer is a trusted proxy, the nearest address
	// in X-Forwarded-For (or X-Real-IP) that is not itself a trusted proxy.
	ip string
	// forwardedFor is the X-Forwarded-For the upstream gets: the trusted chain as received plus the peer,
	// or the peer alone when it is not trusted (so that no client can claim another address).
	forwardedFor string
	// proto is the X-Forwarded-Proto the upstream gets.
	proto string
}

// clientOf works out who r comes from on its listener. Only trusted peers may speak for someone else: an
// X-Forwarded-For from anyone else is replaced, as nginx's realip module and HAProxy's
// `option forwardfor` with `if-none` do not by default, and as an edge must.
func (s *Server) clientOf(r *http.Request) clientIdentity {
	peer := r.RemoteAddr
	if host, _, err := net.SplitHostPort(peer); err == nil {
		peer = host
	}
	proto := "http"
	if r.TLS != nil {
		proto = "https"
	}
	id := clientIdentity{ip: peer, forwardedFor: peer, proto: proto}
	trusted := s.listenerOf(r).trusted
	if !isTrusted(peer, trusted) {
		return id
	}
	var chain []string
	for _, v := range r.Header.Values("X-Forwarded-For") {
		for _, hop := range strings.Split(v, ",") {
			if hop = strings.TrimSpace(hop); hop != "" {
				chain = append(chain, hop)
			}
		}
	}
	if len(chain) > 0 {
		id.forwardedFor = strings.Join(chain, ", ") + ", " + peer
		// From the right, past every trusted hop: the first address a trusted proxy vouches for.
		for i := len(chain) - 1; i >= 0; i-- {
			if _, err := netip.ParseAddr(chain[i]); err != nil {
				break // not an address: nothing further left can be believed
			}
			id.ip = chain[i]
			if !isTrusted(chain[i], trusted) {
				break
			}
		}
	} else if real := strings.TrimSpace(r.Header.Get("X-Real-IP")); real != "" {
		if _, err := netip.ParseAddr(real); err == nil {
			id.ip = real
			id.forwardedFor = real + ", " + peer
		}
	}
	if p := r.Header.Get("X-Forwarded-Proto"); p == "http" || p == "https" {
		id.proto = p
	}
	return id
}

func isTrusted(ip string, trusted []netip.Prefix) bool {
	if len(trusted) == 0 {
		return false
	}
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return false
	}
	a = a.Unmap()
	for _, p := range trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// setForwarded describes the client to the upstream: X-Forwarded-For, X-Real-IP, X-Forwarded-Host and
// X-Forwarded-Proto replace whatever the request carried, and Forwarded is dropped, so that an upstream
// reads only what the relay vouches for. Their spellings with "_" for "-" (X_Forwarded_For) are dropped
// too: CGI and the servers that follow it (PHP's $_SERVER, WSGI) turn both into HTTP_X_FORWARDED_FOR,
// and which one wins there is not the relay's to decide.
func setForwarded(h http.Header, r *http.Request, client clientIdentity) {
	for name := range h {
		if strings.Contains(name, "_") && isIdentityHeader(name) {
			delete(h, name)
		}
	}
	h.Del("Forwarded")
	h.Set("X-Forwarded-For", client.forwardedFor)
	h.Set("X-Real-IP", client.ip)
	h.Set("X-Forwarded-Host", r.Host)
	h.Set("X-Forwarded-Proto", client.proto)
}

// identityHeaders are the headers setForwarded replaces or drops.
var identityHeaders = []string{"Forwarded", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Host", "X-Forwarded-Proto"}

// isIdentityHeader says whether name is one of identityHeaders in any case, with "_" for any "-".
func isIdentityHeader(name string) bool {
	dashed := strings.ReplaceAll(name, "_", "-")
	return slices.ContainsFunc(identityHeaders, func(id string) bool { return strings.EqualFold(id, dashed) })
}
