package relay

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/proxyproto"
	"github.com/sockrelay/sockrelay/upstream"
)

// emfileListener fails its first Accept with EMFILE, as accept(2) does when the process is out of
// descriptors, then blocks until closed.
type emfileListener struct {
	net.Listener
	once   sync.Once
	closed chan struct{}
}

func (l *emfileListener) Accept() (net.Conn, error) {
	var first bool
	l.once.Do(func() { first = true })
	if first {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept", syscall.EMFILE)}
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *emfileListener) Close() error {
	select {
	case <-l.closed:
	default:
		close(l.closed)
	}
	return l.Listener.Close()
}

// TestTCPListenerSurvivesEMFILE: running out of descriptors is temporary; net/http sleeps and
// accepts again. ServeTCP must not return (cmd/sockrelay then stops the whole relay, tunnels and all).
func TestTCPListenerSurvivesEMFILE(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &emfileListener{Listener: inner, closed: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- r.ServeTCP(l, ListenerOptions{Name: "tcp"}, nil) }()
	select {
	case err := <-done:
		t.Fatalf("ServeTCP returned on a temporary EMFILE accept error: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	l.Close()
}

// TestPlainRequestSendsProxyHeader: a pool with proxy_protocol gets a PROXY header on every
// connection (its servers refuse connections without one, as nginx `listen ... proxy_protocol` does);
// the reverse-proxied plain requests to the same pool must carry one too.
func TestPlainRequestSendsProxyHeader(t *testing.T) {
	addr := serveEach(t, nil, func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := proxyproto.Read(br); err != nil {
			return // a server behind proxy_protocol drops such a connection
		}
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
	})
	pool := newPool(t, "p", []string{addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool, sendProxy: "v1"}}, pools: []*upstream.Pool{pool}}
	})
	resp, err := http.Get("http://" + r.Addr + "/page")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("plain request to a proxy_protocol pool: status %d, want 200 (no PROXY header was sent)", resp.StatusCode)
	}
}

// TestIdleTimeoutStalledReader: a reader that consumes only what its own receive queue already holds
// moves nothing on the wire, so the tunnel is idle to the relay (as to nginx's send timeout and HAProxy's
// tunnel timeout); but the relay still holds bytes for it, so the end is a reset, never a FIN that would
// pass the truncated stream off as complete. (From review: the first version closed it with a FIN.)
func TestIdleTimeoutStalledReader(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.TunnelIdleTimeout = time.Second })
	c, u := openTunnel(t, r.Addr, up, nil, nil)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		buf := make([]byte, 32<<10)
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = u.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
			u.Write(buf)
		}
	}()
	// The reader takes 1 KiB every 100 ms from what its receive queue already holds (megabytes on
	// loopback): nothing moves on the wire, and the relay still holds bytes for it.
	buf := make([]byte, 1024)
	for deadline := time.Now().Add(10 * time.Second); r.Tunnels().Len() > 0; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stalled tunnel was not closed within 10 s of a 1 s idle timeout")
		}
		c.R.Read(buf)
	}
	if !contains(r.Log.String(), "unsent_bytes_reset=true") || !contains(r.Log.String(), "reason=idle_timeout") {
		t.Errorf("the stalled tunnel was not reset for its unsent bytes: %s", tunnelReasons(r))
	}
}

func tunnelReasons(r *testRelay) string {
	if m := r.Log.String(); m != "" {
		for _, line := range splitLines(m) {
			if contains(line, "tunnel closed") || contains(line, "tunnel idle") {
				return line
			}
		}
	}
	return "?"
}

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

var _ = errors.New

// TestTCPListenerWssPool: a tcp listener whose route's pool is a wss pool (UpstreamTLS set) must
// speak TLS to the server, or be refused by configuration; serveTCPConn ignores UpstreamTLS and sends the
// client's bytes in the clear to a server that expects TLS.
func TestTCPListenerWssPool(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	first := make(chan byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 1)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, b); err == nil {
			first <- b[0]
		}
		close(first)
	}()
	pool := newPool(t, "p", []string{ln.Addr().String()}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool,
			upstreamTLS: func(string) *tls.Config { return &tls.Config{InsecureSkipVerify: true} }}}, pools: []*upstream.Pool{pool}}
	})
	relayAddr := serveTCP(t, r, ListenerOptions{Name: "tcp"}, nil)
	// The relay dials the pool on accept, before the client's first byte, and resets the client when that
	// TLS handshake fails: the reset may come before Dial has returned. Only the upstream's first byte matters.
	c, err := net.Dial("tcp", relayAddr)
	switch {
	case err == nil:
		defer c.Close()
		c.Write([]byte("plaintext"))
	case !errors.Is(err, syscall.ECONNRESET):
		t.Fatal(err)
	}
	if b, ok := <-first; ok && b != 0x16 {
		t.Fatalf("the wss pool's server got %q in the clear as its first byte, not a TLS handshake record", b)
	}
}
