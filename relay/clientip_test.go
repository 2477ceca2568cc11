package relay

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/netip"
	"testing"
)

// TestClientOf: X-Forwarded-For and X-Real-IP are believed only from trusted peers, and then only as far
// as the chain of trusted hops goes; the upstream gets the chain plus the peer.
func TestClientOf(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	for _, tc := range []struct {
		name, peer   string
		header       http.Header
		tls          bool
		ip, xff, pro string
	}{
		{"untrusted peer: its claims replaced", "203.0.113.9:5000",
			http.Header{"X-Forwarded-For": {"6.6.6.6"}, "X-Real-Ip": {"7.7.7.7"}, "X-Forwarded-Proto": {"https"}},
			false, "203.0.113.9", "203.0.113.9", "http"},
		{"trusted peer, one hop", "10.1.2.3:5000", http.Header{"X-Forwarded-For": {"198.51.100.7"}},
			false, "198.51.100.7", "198.51.100.7, 10.1.2.3", "http"},
		{"trusted chain: the first untrusted from the right", "10.1.2.3:5000",
			http.Header{"X-Forwarded-For": {"6.6.6.6, 198.51.100.7", "10.9.9.9"}},
			false, "198.51.100.7", "6.6.6.6, 198.51.100.7, 10.9.9.9, 10.1.2.3", "http"},
		{"all trusted: the leftmost", "10.1.2.3:5000", http.Header{"X-Forwarded-For": {"10.0.0.1, 10.0.0.2"}},
			false, "10.0.0.1", "10.0.0.1, 10.0.0.2, 10.1.2.3", "http"},
		{"garbage stops the walk", "10.1.2.3:5000", http.Header{"X-Forwarded-For": {"198.51.100.7, unknown, 10.0.0.5"}},
			false, "10.0.0.5", "198.51.100.7, unknown, 10.0.0.5, 10.1.2.3", "http"},
		{"X-Real-IP without X-Forwarded-For", "[::1]:5000", http.Header{"X-Real-Ip": {"2001:db8::1"}},
			false, "2001:db8::1", "2001:db8::1, ::1", "http"},
		{"bad X-Real-IP ignored", "10.1.2.3:5000", http.Header{"X-Real-Ip": {"me"}},
			false, "10.1.2.3", "10.1.2.3", "http"},
		{"proto from a trusted proxy", "10.1.2.3:5000", http.Header{"X-Forwarded-Proto": {"https"}},
			false, "10.1.2.3", "10.1.2.3", "https"},
		{"proto: only http or https", "10.1.2.3:5000", http.Header{"X-Forwarded-Proto": {"gopher"}},
			true, "10.1.2.3", "10.1.2.3", "https"},
		{"v4-mapped peer is trusted as v4", "[::ffff:10.1.2.3]:5000", http.Header{"X-Forwarded-For": {"198.51.100.7"}},
			false, "198.51.100.7", "198.51.100.7, ::ffff:10.1.2.3", "http"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Server{}
			r := (&http.Request{RemoteAddr: tc.peer, Header: tc.header}).WithContext(
				context.WithValue(context.Background(), listenerKey{}, listenerInfo{name: "x", trusted: trusted}))
			if tc.tls {
				r.TLS = &tlsStateForTest
			}
			got := s.clientOf(r)
			if got.ip != tc.ip || got.forwardedFor != tc.xff || got.proto != tc.pro {
				t.Errorf("clientOf = %+v; want ip %q, X-Forwarded-For %q, proto %q", got, tc.ip, tc.xff, tc.pro)
			}
			h := http.Header{"Forwarded": {"for=1.1.1.1"}}
			setForwarded(h, r, got)
			if h.Get("Forwarded") != "" || h.Get("X-Real-IP") != tc.ip || h.Get("X-Forwarded-For") != tc.xff {
				t.Errorf("upstream headers %v; want X-Real-IP %s, X-Forwarded-For %s, no Forwarded", h, tc.ip, tc.xff)
			}
		})
	}
}

var tlsStateForTest = tls.ConnectionState{}
