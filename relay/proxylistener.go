package relay

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/sockrelay/sockrelay/proxyproto"
)

// proxiedConn is a client connection from an L4 balancer that starts with a PROXY protocol header: its
// RemoteAddr is the client the header names, and its reads start after the header. The header is read at
// the first Read or RemoteAddr, in the connection's own goroutine, so that a slow balancer holds up no
// other connection's accept.
type proxiedConn struct {
	*net.TCPConn
	timeout time.Duration
	log     *slog.Logger
	onFail  func()

	once   sync.Once
	br     *bufio.Reader
	remote net.Addr
	err    error
}

func (c *proxiedConn) init() {
	c.once.Do(func() {
		c.br = bufio.NewReaderSize(c.TCPConn, 512)
		c.remote = c.TCPConn.RemoteAddr()
		h, err := proxyproto.ReadTimeout(c.TCPConn, c.br, c.timeout)
		if err != nil {
			c.err = fmt.Errorf("PROXY protocol header from %s: %w", c.remote, err)
			c.log.Info("connection refused", "client", c.remote.String(), "reason", FailProxyProtocol, "err", c.err)
			if c.onFail != nil {
				c.onFail()
			}
			_ = c.TCPConn.SetLinger(0)
			_ = c.TCPConn.Close()
			return
		}
		if src := h.SourceAddr(); src != nil { // LOCAL (the balancer's own health check): the real peer
			c.remote = src
		}
	})
}

func (c *proxiedConn) Read(p []byte) (int, error) {
	if c.init(); c.err != nil {
		return 0, c.err
	}
	return c.br.Read(p)
}

func (c *proxiedConn) RemoteAddr() net.Addr {
	c.init()
	return c.remote
}

// leftover returns the bytes read from the socket past the header that no Read has returned yet.
func (c *proxiedConn) leftover() []byte {
	c.init()
	if c.br == nil {
		return nil
	}
	b, _ := c.br.Peek(c.br.Buffered())
	return b
}

// proxyListener gives every accepted connection a PROXY protocol header to read first. A listener is
// configured for it only behind a balancer that always sends one: a header from anyone else would let a
// client claim any address, and a connection without one is refused.
type proxyListener struct {
	net.Listener
	timeout time.Duration
	log     *slog.Logger
	onFail  func()
}

func (l *proxyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, errors.New("PROXY protocol listener: accepted a connection that is not TCP")
	}
	return &proxiedConn{TCPConn: tc, timeout: l.timeout, log: l.log, onFail: l.onFail}, nil
}

// proxyHeader is the PROXY protocol header that tells an upstream who the client is: version "v1" or
// "v2", the client's address and the address it connected to. An address that is not IP:port gives an
// UNKNOWN (v1) or LOCAL-like UNSPEC (v2) header, which the upstream answers with the connection's own.
func proxyHeader(version string, client, local net.Addr) []byte {
	src, dst := addrPort(client), addrPort(local)
	if version == "v1" {
		return proxyproto.AppendV1(nil, src, dst)
	}
	return proxyproto.AppendV2(nil, src, dst)
}

// sendProxyHeader writes header to a new upstream connection before anything else, within deadline
// (none when zero), and leaves the connection without a write deadline.
func sendProxyHeader(conn net.Conn, header []byte, deadline time.Time) error {
	_ = conn.SetWriteDeadline(deadline)
	_, err := conn.Write(header)
	_ = conn.SetWriteDeadline(time.Time{})
	return err
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	if a == nil {
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
