package relay

import (
	"bufio"
	"bytes"
	"context"
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

// FuzzHandshake feeds arbitrary bytes to the handshake path as a client's request: net/http's parser,
// then the relay's checks, then the request the upstream would get. Whatever the input, the relay must
// not panic, and a request it accepts must become exactly one well-formed upgrade request for the
// upstream: same target and Host, no hop-by-hop header but the upgrade, no Transfer-Encoding or body
// (nothing an upstream could read as a second request), and the client described only by the relay.
func FuzzHandshake(f *testing.F) {
	f.Add([]byte(upgradeRequest("/chat")))
	f.Add([]byte(upgradeRequest("/a?b=c") + "pipelined bytes"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade, X-Secret\r\n" +
		"X-Secret: 1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"X-Forwarded-For: 6.6.6.6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 5\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nhello"))
	f.Add([]byte("POST / HTTP/1.0\r\nUpgrade: h2c\r\n\r\n"))
	s := &Server{}
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			return
		}
		r.RemoteAddr = "10.1.2.3:4000"
		r = r.WithContext(context.WithValue(context.Background(), listenerKey{}, listenerInfo{name: "f", trusted: trusted}))
		pathProblem(r.URL.Path)
		if !isUpgradeRequest(r) {
			return
		}
		if _, herr := validateUpgrade(r); herr != nil {
			if herr.status < 400 || herr.status > 499 {
				t.Fatalf("refusal with status %d: a bad request is the client's fault", herr.status)
			}
			return
		}
		client := s.clientOf(r)
		out := upstreamRequest(r, client)
		br := bufio.NewReader(bytes.NewReader(out))
		up, err := http.ReadRequest(br)
		if err != nil {
			t.Fatalf("the upstream request does not parse: %v\n%q", err, out)
		}
		if br.Buffered() != 0 {
			t.Fatalf("%d bytes after the upstream request: an upstream would read them as another request\n%q", br.Buffered(), out)
		}
		if up.Method != http.MethodGet || up.URL.RequestURI() != r.URL.RequestURI() || up.Host != r.Host {
			t.Fatalf("upstream request %s %s Host %q; want GET %s Host %q", up.Method, up.URL.RequestURI(), up.Host, r.URL.RequestURI(), r.Host)
		}
		if up.ContentLength > 0 || len(up.TransferEncoding) > 0 {
			t.Fatalf("upstream request has a body (length %d, encoding %v)", up.ContentLength, up.TransferEncoding)
		}
		if !strings.EqualFold(up.Header.Get("Upgrade"), "websocket") || !strings.EqualFold(up.Header.Get("Connection"), "Upgrade") {
			t.Fatalf("upstream request lost its upgrade: Upgrade %q, Connection %q", up.Header.Get("Upgrade"), up.Header.Get("Connection"))
		}
		for _, h := range []string{"Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Forwarded"} {
			if up.Header.Get(h) != "" {
				t.Fatalf("upstream request carries %s", h)
			}
		}
		if got := up.Header.Values("X-Forwarded-For"); len(got) != 1 || got[0] != client.forwardedFor {
			t.Fatalf("upstream X-Forwarded-For %q, want only %q", got, client.forwardedFor)
		}
	})
}
