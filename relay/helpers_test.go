package relay

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
)

// isReset reports whether err says the peer reset the connection (datapath.IsReset).
var isReset = datapath.IsReset

// userspaceDatapaths are the datapaths that run anywhere.
var userspaceDatapaths = []Datapath{DatapathCopy, DatapathSplice}

// testDatapaths are the datapaths every invariant test runs on: the userspace ones, and sockmap wherever the
// kernel allows it (TestMain decides).
var testDatapaths = userspaceDatapaths

// testKey is a valid Sec-WebSocket-Key (the one in RFC 6455 section 1.3).
const testKey = "dGhlIHNhbXBsZSBub25jZQ=="

// testRelay is a Server serving on loopback, with the registry its metrics live in and its log.
type testRelay struct {
	*Server
	Addr string
	Reg  *prometheus.Registry
	Log  *syncbuf.Buffer
}

// startRelay serves a relay on 127.0.0.1 in front of upstreams until the test ends.
func startRelay(t testing.TB, dp Datapath, upstreams []string, opts ...func(*Config)) *testRelay {
	t.Helper()
	logs := &syncbuf.Buffer{}
	reg := prometheus.NewRegistry()
	cfg := Config{
		Upstreams:  upstreams,
		Datapath:   dp,
		Logger:     slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer: reg,
	}
	for _, o := range opts {
		o(&cfg)
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		s.Shutdown(ctx)
		if t.Failed() {
			t.Logf("relay log:\n%s", logs.String())
		}
	})
	return &testRelay{Server: s, Addr: ln.Addr().String(), Reg: reg, Log: logs}
}

// upstreamConn is one connection a fake upstream accepted: its parsed handshake request and a reader that
// holds whatever came after it.
type upstreamConn struct {
	*net.TCPConn
	R   *bufio.Reader
	Req *http.Request
}

// fakeUpstream is a TCP server whose answer to each request the test decides.
type fakeUpstream struct {
	Addr  string
	Conns chan *upstreamConn // every accepted connection whose request parsed, for the test to drive
	mu    sync.Mutex
	n     int // connections accepted
}

// Accepted returns how many connections the upstream has accepted.
func (u *fakeUpstream) Accepted() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n
}

// startUpstream starts a fake upstream that reads each connection's request and hands it to Conns; the
// test answers it.
func startUpstream(t testing.TB) *fakeUpstream {
	t.Helper()
	return startUpstreamOn(t, "127.0.0.1:0")
}

// startUpstreamOn is startUpstream on a given address.
func startUpstreamOn(t testing.TB, addr string) *fakeUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &fakeUpstream{Addr: ln.Addr().String(), Conns: make(chan *upstreamConn, 1024)}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.n++
			u.mu.Unlock()
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				br := bufio.NewReader(c)
				req, err := http.ReadRequest(br)
				if err != nil {
					c.Close()
					return
				}
				u.Conns <- &upstreamConn{TCPConn: c.(*net.TCPConn), R: br, Req: req}
			}()
		}
	}()
	return u
}

// next waits for the upstream's next connection.
func (u *fakeUpstream) next(t testing.TB) *upstreamConn {
	t.Helper()
	select {
	case c := <-u.Conns:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("upstream: no connection within 10s")
		return nil
	}
}

// switchResponse is a valid 101 for the request's key.
func switchResponse(req *http.Request) string {
	return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + AcceptKey(req.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
}

// accept answers c's request with a valid 101, followed in the same write by first (the upstream's first
// tunnel bytes, which then reach the relay in the same segment as the 101).
func (c *upstreamConn) accept(t testing.TB, first []byte) {
	t.Helper()
	if _, err := c.Write(append([]byte(switchResponse(c.Req)), first...)); err != nil {
		t.Fatalf("upstream: write 101: %v", err)
	}
}

// upgradeRequest is a valid client handshake for path.
func upgradeRequest(path string) string {
	return "GET " + path + " HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + testKey + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
}

// clientConn is the client end of a tunnel after its handshake; R holds bytes that came behind the 101.
type clientConn struct {
	*net.TCPConn
	R    *bufio.Reader
	Resp *http.Response
}

// dialRelay connects to the relay and sends request followed, in the same write, by pipelined bytes.
// It returns the relay's response.
func dialRelay(t testing.TB, addr, request string, pipelined []byte) *clientConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial relay: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(append([]byte(request), pipelined...)); err != nil {
		t.Fatalf("client: send handshake: %v", err)
	}
	br := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		t.Fatalf("client: read handshake response: %v", err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return &clientConn{TCPConn: c.(*net.TCPConn), R: br, Resp: resp}
}

// openTunnel runs a whole handshake through the relay to up: client pipelined bytes and upstream first
// bytes ride with the request and the 101. It fails the test unless the client gets a valid 101.
func openTunnel(t testing.TB, relayAddr string, up *fakeUpstream, pipelined, first []byte) (*clientConn, *upstreamConn) {
	t.Helper()
	return openTunnelWith(t, relayAddr, up, upgradeRequest("/tunnel"), pipelined, first)
}

// openTunnelWith is openTunnel with the client's handshake request given.
func openTunnelWith(t testing.TB, relayAddr string, up *fakeUpstream, request string, pipelined, first []byte) (*clientConn, *upstreamConn) {
	t.Helper()
	uc := make(chan *upstreamConn, 1)
	go func() {
		// The upstream answers beside the client, whose read of the response waits for it.
		select {
		case u := <-up.Conns:
			if _, err := u.Write(append([]byte(switchResponse(u.Req)), first...)); err != nil {
				u.Close()
				u = nil
			}
			uc <- u
		case <-time.After(10 * time.Second):
			uc <- nil
		}
	}()
	c := dialRelay(t, relayAddr, request, pipelined)
	u := <-uc
	if u == nil {
		t.Fatal("upstream: no connection, or writing its 101 failed")
	}
	t.Cleanup(func() { u.Close() })
	if c.Resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("client: status %d, want 101", c.Resp.StatusCode)
	}
	if got, want := c.Resp.Header.Get("Sec-WebSocket-Accept"), AcceptKey(testKey); got != want {
		t.Fatalf("client: Sec-WebSocket-Accept %q, want %q", got, want)
	}
	return c, u
}

// readAllWithin reads r (which reads conn) to EOF, giving up with a timeout error after d.
func readAllWithin(conn net.Conn, r io.Reader, d time.Duration) ([]byte, error) {
	_ = conn.SetReadDeadline(time.Now().Add(d))
	defer conn.SetReadDeadline(time.Time{})
	return io.ReadAll(r)
}

// serveEach listens on loopback and runs handle, in its own goroutine, for every connection accepted
// (through wrap when it is not nil, e.g. a TLS listener), until the test ends; handle's connection is
// closed when it returns. It returns the listener's address.
func serveEach(t testing.TB, wrap func(net.Listener) net.Listener, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().String()
	if wrap != nil {
		ln = wrap(ln)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return addr
}

// failures is how many handshakes the relay failed for reason, over every listener and pool.
func (r *testRelay) failures(reason string) float64 {
	return metricSum(r.Reg, "sockrelay_handshakes_failed_total", map[string]string{"reason": reason})
}

// metricSum adds up the values of the gathered series of the metric name whose labels include want; it
// panics when the registry cannot be gathered.
func metricSum(reg prometheus.Gatherer, name string, want map[string]string) float64 {
	families, err := reg.Gather()
	if err != nil {
		panic(fmt.Sprintf("gather metrics: %v", err))
	}
	sum := 0.0
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue series
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// assertMapsEmpty fails t if any BPF map of k still holds an entry.
func assertMapsEmpty(t testing.TB, k *sockmap.Engine) {
	t.Helper()
	n, err := k.Entries()
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range n {
		if c != 0 {
			t.Errorf("BPF map %s holds %d entries after every tunnel ended", name, c)
		}
	}
}

// waitInKernel waits until r's kernel engine holds a tunnel's sockets in its maps (r carries one tunnel):
// the client may see its 101 a moment before the tunnel enters the kernel.
func waitInKernel(t testing.TB, r *testRelay) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		n, err := r.kernel.Entries()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range n {
			if c > 0 {
				return
			}
		}
	}
	t.Fatal("no kernel tunnel after 5s")
}
