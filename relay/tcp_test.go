package relay

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/proxyproto"
	"github.com/sockrelay/sockrelay/upstream"
)

// rawEcho is a TCP upstream that, for each connection, reads an optional PROXY header (with proxy), then
// echoes every byte back and half-closes after the client's FIN. It reports each header it read.
func rawEcho(t testing.TB, proxy bool) (addr string, headers chan *proxyproto.Header) {
	t.Helper()
	headers = make(chan *proxyproto.Header, 16)
	addr = serveEach(t, nil, func(c net.Conn) {
		br := bufio.NewReader(c)
		if proxy {
			h, err := proxyproto.Read(br)
			if err != nil {
				return
			}
			headers <- h
		}
		io.Copy(c, br)
		c.(*net.TCPConn).CloseWrite()
	})
	return addr, headers
}

// serveTCP starts a TCP listener of r with opts and sni, routed to pool.
func serveTCP(t *testing.T, r *testRelay, opts ListenerOptions, sni SNIReader) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeTCP(ln, opts, sni)
	return ln.Addr().String()
}

// TestTCPListener: a raw TCP stream (no HTTP) is relayed byte-exact both ways, with its half-close, on
// every datapath, and nothing is left once it ends.
func TestTCPListener(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			addr, _ := rawEcho(t, false)
			pool := newPool(t, "db", []string{addr}, nil)
			r := startRelay(t, dp, nil, func(c *Config) {
				c.Router = &pathRouter{routes: []pathRoute{{listener: "tcp", prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
			})
			relayAddr := serveTCP(t, r, ListenerOptions{Name: "tcp"}, nil)
			c, err := net.Dial("tcp", relayAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			want := make([]byte, 1<<20)
			rand.Read(want)
			go func() {
				c.Write(want)
				c.(*net.TCPConn).CloseWrite()
			}()
			got, err := readAllWithin(c, c, 20*time.Second)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("echo through the tcp listener: %d bytes, %v; want the 1 MiB sent, then EOF", len(got), err)
			}
			waitTunnelsGone(t, r)
			if st := serverState(t, pool, addr); st.TotalTunnels != 1 || st.LiveTunnels != 0 {
				t.Errorf("server state %+v; want 1 tunnel, none live", st)
			}
		})
	}
}

// TestTCPListenerRoutesBySNI: with an SNIReader, the server name picks the route, and the bytes it read
// reach the upstream first.
func TestTCPListenerRoutesBySNI(t *testing.T) {
	a, _ := rawEcho(t, false)
	b, _ := rawEcho(t, false)
	poolA, poolB := newPool(t, "a", []string{a}, nil), newPool(t, "b", []string{b}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = hostRouter{"a.example": poolA, "b.example": poolB}
	})
	// A stand-in for the ClientHello: the name on the first line.
	firstLine := func(conn net.Conn, _ time.Duration) (string, []byte, error) {
		var line []byte
		one := make([]byte, 1)
		for {
			if _, err := conn.Read(one); err != nil {
				return "", nil, err
			}
			line = append(line, one[0])
			if one[0] == '\n' {
				return strings.TrimSpace(string(line)), line, nil
			}
		}
	}
	relayAddr := serveTCP(t, r, ListenerOptions{Name: "tls"}, firstLine)
	for _, name := range []string{"b.example", "a.example"} {
		c, err := net.Dial("tcp", relayAddr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(name + "\nhello"))
		c.(*net.TCPConn).CloseWrite()
		got, err := readAllWithin(c, c, 5*time.Second)
		c.Close()
		if err != nil || string(got) != name+"\nhello" {
			t.Errorf("%s: echo %q, %v; want the peeked line and the rest", name, got, err)
		}
	}
	if serverState(t, poolA, a).TotalTunnels != 1 || serverState(t, poolB, b).TotalTunnels != 1 {
		t.Error("each name did not reach its own pool once")
	}
	// An unknown name has no route: the connection is closed.
	c, err := net.Dial("tcp", relayAddr)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("c.example\n"))
	if got, _ := readAllWithin(c, c, 5*time.Second); len(got) != 0 {
		t.Errorf("unknown name: got %q, want the connection closed", got)
	}
}

// hostRouter routes by Host alone (the SNI on tcp listeners).
type hostRouter map[string]*upstream.Pool

func (h hostRouter) Route(_ string, r *http.Request) (Route, bool) {
	p, ok := h[r.Host]
	return Route{Pool: p}, ok
}

func (h hostRouter) Pools() []*upstream.Pool {
	var out []*upstream.Pool
	for _, p := range h {
		out = append(out, p)
	}
	return out
}

// TestProxyProtocolAccepted: on a PROXY protocol listener the client is who the header says (v1 and v2),
// bytes pipelined behind the header and the request still come first, and a connection without a
// header is refused.
func TestProxyProtocolAccepted(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeListenerWith(ln, ListenerOptions{Name: "behind-lb", ProxyProtocol: true})
	src := netipAddrPort(t, "198.51.100.7:5000")
	dst := netipAddrPort(t, "10.0.0.1:8080")
	for _, header := range [][]byte{proxyproto.AppendV1(nil, src, dst), proxyproto.AppendV2(nil, src, dst)} {
		uc := make(chan *upstreamConn, 1)
		go func() { u := up.next(t); u.accept(t, []byte("first")); uc <- u }()
		c := dialRelay(t, ln.Addr().String(), string(header)+upgradeRequest("/"), []byte("piped"))
		u := <-uc
		if c.Resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status %d, want 101", c.Resp.StatusCode)
		}
		if xff := u.Req.Header.Get("X-Forwarded-For"); xff != "198.51.100.7" {
			t.Errorf("upstream saw X-Forwarded-For %q, want the PROXY header's source 198.51.100.7", xff)
		}
		got := make([]byte, 5)
		if _, err := io.ReadFull(u.R, got); err != nil || string(got) != "piped" {
			t.Errorf("upstream first bytes %q, %v; want the pipelined bytes", got, err)
		}
		if _, err := io.ReadFull(c.R, got); err != nil || string(got) != "first" {
			t.Errorf("client first bytes %q, %v", got, err)
		}
		ts := r.Tunnels().Tunnels()
		if len(ts) == 0 || ts[len(ts)-1].ClientAddr != "198.51.100.7:5000" {
			t.Errorf("tunnel client address is not the PROXY header's: %v", ts)
		}
		c.Close()
		u.Close()
	}
	// No header: refused, and counted.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte(upgradeRequest("/")))
	if got, _ := readAllWithin(c, c, 5*time.Second); len(got) != 0 {
		t.Errorf("a connection without a PROXY header got %q; want it closed", got)
	}
	if m := scrape(t, r); !strings.Contains(m, `reason="proxy_protocol"} 1`) {
		t.Errorf("refusal not counted:\n%s", grepLines(m, "handshakes_failed"))
	}
}

// TestProxyProtocolSent: a route with SendProxy starts each upstream connection of a tcp tunnel with a
// PROXY header naming the client (TestProxyProtocolSentWebSocket does the same for handshakes).
func TestProxyProtocolSent(t *testing.T) {
	addr, headers := rawEcho(t, true)
	pool := newPool(t, "p", []string{addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool, sendProxy: "v2"}}, pools: []*upstream.Pool{pool}}
	})
	relayAddr := serveTCP(t, r, ListenerOptions{Name: "tcp"}, nil)
	c, err := net.Dial("tcp", relayAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("ping"))
	c.(*net.TCPConn).CloseWrite()
	if got, err := readAllWithin(c, c, 5*time.Second); err != nil || string(got) != "ping" {
		t.Fatalf("echo %q, %v", got, err)
	}
	select {
	case h := <-headers:
		if h.Version != 2 || h.Source.String() != c.LocalAddr().String() || h.Destination.String() != relayAddr {
			t.Errorf("PROXY header %+v; want v2 from %s to %s", h, c.LocalAddr(), relayAddr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream got no PROXY header")
	}
}

func netipAddrPort(t *testing.T, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// TestProxyProtocolSentWebSocket: the upstream of a WebSocket handshake reads a PROXY v1 header naming
// the client, then the request.
func TestProxyProtocolSentWebSocket(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	seen := make(chan *proxyproto.Header, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		h, err := proxyproto.Read(br)
		if err != nil {
			seen <- nil
			return
		}
		req, err := http.ReadRequest(br)
		if err != nil {
			seen <- nil
			return
		}
		seen <- h
		c.Write([]byte(switchResponse(req)))
		io.Copy(io.Discard, br)
	}()
	pool := newPool(t, "p", []string{ln.Addr().String()}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool, sendProxy: "v1"}}, pools: []*upstream.Pool{pool}}
	})
	c := dialRelay(t, r.Addr, upgradeRequest("/"), nil)
	if c.Resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", c.Resp.StatusCode)
	}
	if h := <-seen; h == nil || h.Version != 1 || h.Source.String() != c.LocalAddr().String() {
		t.Errorf("PROXY header %+v; want v1 from %s", h, c.LocalAddr())
	}
}
