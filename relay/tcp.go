package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"syscall"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// SNIReader, when set on a TCP listener, reads the server name a client's TLS ClientHello asks for, and
// returns the bytes it read so that they reach the upstream first (TLS passthrough: routing by SNI
// without terminating). An error ends the connection.
type SNIReader func(conn net.Conn, timeout time.Duration) (serverName string, replay []byte, err error)

// ServeTCP relays every connection accepted on l, as a raw TCP stream with no HTTP, to a server of the
// pool its listener's route names, until Shutdown: the relay for databases, MQTT or game servers. The
// Router sees each connection as a request with no path and, with opts.SNI, the ClientHello's server name
// as its host. Tunnels use the listener's datapath, half-close and limits as WebSocket tunnels do; a
// connection refused by a limit is closed at once (there is no protocol to answer in).
func (s *Server) ServeTCP(l net.Listener, opts ListenerOptions, sni SNIReader) error {
	p, err := s.PrepareTCP(l, opts, sni)
	if err != nil {
		return err
	}
	return p.Serve()
}

// PrepareTCP is PrepareListener for a TCP listener (ServeTCP): Serve then relays its connections.
func (s *Server) PrepareTCP(l net.Listener, opts ListenerOptions, sni SNIReader) (*PreparedListener, error) {
	info, err := s.listenerSetup(opts) // no trusted proxies: there are no headers to believe
	if err != nil {
		l.Close()
		return nil, err
	}
	serve := func(p *PreparedListener) error { return s.serveTCP(p.l, p.opts, p.info, sni) }
	return &PreparedListener{s: s, l: l, opts: opts, info: info, serve: serve}, nil
}

// serveTCP accepts on a prepared TCP listener until Shutdown.
func (s *Server) serveTCP(l net.Listener, opts ListenerOptions, info listenerInfo, sni SNIReader) error {
	// The loop counts in tcpOpening until it returns, so that each connection it accepts is counted
	// before Shutdown can see the count at 0.
	if !s.track(func() { s.tcpListeners = append(s.tcpListeners, l); s.tcpOpening.Add(1) }) {
		l.Close()
		return http.ErrServerClosed
	}
	defer s.tcpOpening.Done()
	l = s.wrapListener(l, opts)
	var backoff time.Duration
	for {
		conn, err := l.Accept()
		if err != nil {
			if s.draining.Load() || errors.Is(err, net.ErrClosed) {
				return http.ErrServerClosed
			}
			if temporaryAcceptError(err) {
				// Out of descriptors, or a connection reset before it was accepted: wait for some to
				// close and go on, backing off as net/http does, rather than end the listener.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("tcp listener: accept failed, retrying", "listener", info.name, "err", err, "in", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		s.tcpOpening.Add(1)
		go func() {
			defer s.tcpOpening.Done()
			s.serveTCPConn(conn, info, sni)
		}()
	}
}

// temporaryAcceptError says whether Accept may succeed again after err: descriptor exhaustion, memory
// pressure, a connection aborted in the queue, a timeout.
func temporaryAcceptError(err error) bool {
	var ne net.Error
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS) ||
		errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ECONNABORTED) || (errors.As(err, &ne) && ne.Timeout())
}

// serveTCPConn opens one TCP tunnel. conn is a *net.TCPConn, or a *proxiedConn whose header names the
// client.
func (s *Server) serveTCPConn(conn net.Conn, info listenerInfo, sni SNIReader) {
	start := time.Now()
	peerAddr := conn.RemoteAddr() // reads the PROXY header, if any
	pc, proxied := conn.(*proxiedConn)
	if proxied && pc.err != nil {
		return // refused and closed by the header read
	}
	var client *net.TCPConn
	if proxied {
		client = pc.TCPConn
	} else {
		client = conn.(*net.TCPConn)
	}
	peer := peerAddr.String()
	ip := peer
	if host, _, err := net.SplitHostPort(peer); err == nil {
		ip = host
	}
	var poolName string // once routed
	refuse := func(reason string, err error) {
		s.metrics.handshakeFailed(info.name, poolName, reason)
		s.log.Info("tcp connection refused", "listener", info.name, "client", peer, "reason", reason, "err", err)
		_ = client.SetLinger(0)
		client.Close()
	}
	endHandshake, releaseSlot, lerr := admit(s.limitersFor(info), ip)
	if lerr != nil {
		refuse(lerr.reason, lerr)
		return
	}
	defer endHandshake()
	opened := false
	defer func() {
		if !opened {
			releaseSlot()
		}
	}()

	// The route: a request with no path, and the SNI as its host when the listener routes by it.
	var host string
	var clientPrefix []byte
	if sni != nil {
		var err error
		if host, clientPrefix, err = sni(conn, s.cfg.ClientHeaderTimeout); err != nil {
			refuse(FailBadRequest, fmt.Errorf("read TLS ClientHello: %w", err))
			return
		}
	}
	req := (&http.Request{Method: "CONNECT", Host: host, URL: &url.URL{Path: "/"}, RemoteAddr: peer,
		Header: http.Header{}}).WithContext(context.WithValue(context.Background(), listenerKey{}, info))
	route, ok := s.Router().Route(info.name, req)
	if !ok {
		refuse(FailNoRoute, fmt.Errorf("no route for server name %q on listener %q", host, info.name))
		return
	}
	pool := route.Pool
	poolName = pool.Name()
	if proxied {
		// Bytes read past the header (and past the ClientHello, when peeked) go to the upstream first.
		clientPrefix = append(clientPrefix, pc.leftover()...)
	}
	up, herr, err := s.withRetries(peer, pool, pool.Key(ip, req),
		func(addr string, deadline time.Time) (*dialedUpstream, *refusal, error) {
			ctx, cancel := context.WithDeadline(context.Background(), deadline)
			defer cancel()
			up, herr := s.connectServer(ctx, addr, route, peerAddr, client.LocalAddr())
			return up, herr, nil
		})
	if err == nil && herr != nil {
		err = errors.New(herr.msg)
	}
	if err != nil {
		reason := FailUpstreamUnreachable
		if herr != nil {
			reason = herr.reason
		}
		refuse(reason, err)
		return
	}
	t, err := s.establish(opening{
		listener:          info,
		client:            datapath.Endpoint{Conn: client, Peeked: clientPrefix},
		upstream:          datapath.Endpoint{Conn: up.conn, TLS: up.tls},
		up:                up,
		clientAddr:        peer,
		clientIP:          ip,
		req:               requestInfo{host: host}, // host: the SNI name, when peeked
		pool:              pool.Name(),
		releaseSlot:       releaseSlot,
		halfClosedTimeout: s.cfg.TCPHalfClosedTimeout,
	})
	switch {
	case errors.Is(err, errShuttingDownAtOpen):
		up.conn.Close()
		up.lease.Release()
		refuse(FailShuttingDown, err)
		return
	case errors.Is(err, errEvictedAtOpen):
		// As for WebSockets: a reload that removed the server, closing its tunnels, while this one was dialed.
		opened = true
		s.metrics.handshakeFailed(info.name, poolName, FailUpstreamRemoved)
		return
	}
	opened = true
	s.metrics.handshakeDuration.Observe(time.Since(start).Seconds())
	s.carry(t)
}
