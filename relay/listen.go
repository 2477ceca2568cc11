package relay

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// Serve accepts clients on l, as the listener named DefaultListener with the server's datapath, until
// Shutdown. It returns http.ErrServerClosed after Shutdown.
func (s *Server) Serve(l net.Listener) error {
	return s.ServeListener(DefaultListener, l, DatapathAuto)
}

// ServeListener accepts clients on l until Shutdown; the Router sees name as the listener of their
// requests, and their tunnels use dp (auto: the server's datapath, which NewServer resolved). It fails at
// once when dp is sockmap and the server did not load the kernel datapath. It returns
// http.ErrServerClosed after Shutdown.
func (s *Server) ServeListener(name string, l net.Listener, dp Datapath) error {
	return s.ServeListenerWith(l, ListenerOptions{Name: name, Datapath: dp})
}

// ListenerOptions are one listener's settings.
type ListenerOptions struct {
	// Name is what the Router sees as the listener of its requests.
	Name string
	// Datapath of the listener's tunnels; auto (or empty) is the server's.
	Datapath Datapath
	// TrustedProxies are the peers whose X-Forwarded-For and X-Real-IP are believed (see clientOf).
	TrustedProxies []netip.Prefix
	// Limits apply to this listener's handshakes and tunnels, besides the server's Config.Limits.
	Limits Limits
	// TLS, when set, terminates TLS on the listener (tlsconf.Server.Config); its tunnels use the copy
	// datapath.
	TLS *tls.Config
	// ProxyProtocol makes every connection start with a PROXY protocol v1 or v2 header naming the client,
	// from an L4 balancer in front; a connection without one is refused.
	ProxyProtocol bool
}

// wrapListener applies the listener options that change what a connection is.
func (s *Server) wrapListener(l net.Listener, opts ListenerOptions) net.Listener {
	if opts.ProxyProtocol {
		l = &proxyListener{Listener: l, timeout: s.cfg.ClientHeaderTimeout, log: s.log,
			onFail: func() { s.metrics.handshakeFailed(opts.Name, "", FailProxyProtocol) }}
	}
	if opts.TLS != nil {
		l = tls.NewListener(l, opts.TLS) // under the PROXY header reader: the header is not encrypted
	}
	return l
}

// ServeListenerWith is ServeListener with every listener setting: PrepareListener, then Serve.
func (s *Server) ServeListenerWith(l net.Listener, opts ListenerOptions) error {
	p, err := s.PrepareListener(l, opts)
	if err != nil {
		return err
	}
	return p.Serve()
}

// PreparedListener is a listener whose settings the server has checked and set up (its datapath, limits
// and metric series), not accepting yet: a relay prepares every listener before it says it serves, so that
// one it would refuse fails the start, not the relay after it said so.
type PreparedListener struct {
	s     *Server
	l     net.Listener
	opts  ListenerOptions
	info  listenerInfo
	serve func(*PreparedListener) error // WebSocket or TCP
}

// PrepareListener checks a WebSocket listener's options and sets up what its requests carry; Serve then
// accepts clients on l. On an error, which names the listener, l is closed.
func (s *Server) PrepareListener(l net.Listener, opts ListenerOptions) (*PreparedListener, error) {
	info, err := s.listenerSetup(opts)
	if err != nil {
		l.Close()
		return nil, err
	}
	info.trusted = opts.TrustedProxies
	return &PreparedListener{s: s, l: l, opts: opts, info: info, serve: (*PreparedListener).serveHTTP}, nil
}

// Datapath is the datapath of the listener's tunnels, resolved (never auto).
func (p *PreparedListener) Datapath() Datapath { return p.info.datapath }

// Serve accepts clients until Shutdown. It returns http.ErrServerClosed after Shutdown.
func (p *PreparedListener) Serve() error { return p.serve(p) }

// serveHTTP serves a WebSocket listener.
func (p *PreparedListener) serveHTTP() error {
	s, info := p.s, p.info
	l := s.wrapListener(p.l, p.opts)
	hs := &http.Server{
		Handler:           s.withAccessLog(s),
		ReadHeaderTimeout: s.cfg.ClientHeaderTimeout,
		MaxHeaderBytes:    httpServerHeaderBytes(s.cfg.MaxHeaderBytes),
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		ConnState:         s.trackUnread,
		BaseContext: func(net.Listener) context.Context {
			return context.WithValue(context.Background(), listenerKey{}, info)
		},
	}
	if !s.track(func() { s.listeners, s.accepting = append(s.listeners, hs), append(s.accepting, l) }) {
		l.Close()
		return http.ErrServerClosed
	}
	err := hs.Serve(l)
	if s.draining.Load() {
		return http.ErrServerClosed // Shutdown closed l before it stopped hs
	}
	return err
}

// netHTTPHeaderSlop is what net/http reads of a request head past http.Server.MaxHeaderBytes before it
// answers 431 (net/http's initialReadLimitSize: "bufio slop").
const netHTTPHeaderSlop = 4096

// httpServerHeaderBytes is the http.Server.MaxHeaderBytes under which net/http refuses a request head
// (request line, header lines and the blank line) longer than maxHeaderBytes, and not one byte shorter.
// net/http has no limit below 4097 bytes (0 is its 1 MiB default): a smaller maxHeaderBytes acts as 4097.
// The limit counts bytes read from the connection for the head, so a request pipelined behind another may
// pass by what net/http's reader had already buffered (at most 4 KiB).
func httpServerHeaderBytes(maxHeaderBytes int) int {
	return max(maxHeaderBytes-netHTTPHeaderSlop, 1)
}

// ListenerDatapath returns the datapath ServeListener would give a listener that asks for dp (auto: the
// server's), or why it would refuse it: sockmap on a server whose own datapath is not sockmap, since only
// that loads the kernel datapath.
func (s *Server) ListenerDatapath(dp Datapath) (Datapath, error) {
	info, err := s.listenerInfo("", dp)
	return info.datapath, err
}

// listenerSetup checks a listener's options and makes what its requests and connections carry.
func (s *Server) listenerSetup(opts ListenerOptions) (listenerInfo, error) {
	info, err := s.listenerInfo(opts.Name, opts.Datapath)
	if err != nil {
		return listenerInfo{}, err
	}
	if err := opts.Limits.Validate(); err != nil {
		return listenerInfo{}, fmt.Errorf("listener %q: %w", opts.Name, err)
	}
	if opts.Limits != (Limits{}) {
		info.limiter = newLimiter(opts.Limits)
		s.listenersMu.Lock()
		if s.listenerLimiters == nil {
			s.listenerLimiters = map[string]*limiter{}
		}
		s.listenerLimiters[info.name] = info.limiter
		s.listenersMu.Unlock()
	}
	s.listenersMu.Lock()
	if s.autoListeners == nil {
		s.autoListeners = map[string]bool{}
	}
	s.autoListeners[info.name] = info.perTunnel
	early := s.adoptedEarly[info.name]
	delete(s.adoptedEarly, info.name)
	s.waitingEarly.Store(len(s.adoptedEarly) > 0)
	s.listenersMu.Unlock()
	for _, t := range early {
		s.auto.track(t, info)
	}
	s.metrics.knowListener(info.name, info.datapath, s.Router().Pools())
	return info, nil
}

// track registers a listener for Shutdown to stop, or says that the server is already shutting down.
func (s *Server) track(add func()) bool {
	s.listenersMu.Lock()
	defer s.listenersMu.Unlock()
	if s.draining.Load() {
		return false
	}
	add()
	return true
}

func (s *Server) listenerInfo(name string, dp Datapath) (listenerInfo, error) {
	perTunnel := false
	switch dp {
	case DatapathAuto, "":
		dp = s.cfg.Datapath
		perTunnel = s.auto != nil
	case DatapathCopy, DatapathSplice:
	case DatapathSockmap:
		if s.kernel == nil && s.kernelSkipped != nil {
			return listenerInfo{}, fmt.Errorf("listener %q: datapath sockmap: %w: the relay's datapath is auto, and its kernel datapath did not load (%v), so it runs on %s; accepted here: copy, splice or auto",
				name, ErrDatapathUnavailable, s.kernelSkipped, s.cfg.Datapath)
		}
		if s.kernel == nil {
			return listenerInfo{}, fmt.Errorf("listener %q: datapath sockmap: %w: the relay's datapath is %s, and only sockmap or auto load the kernel datapath; accepted here: copy, splice or auto",
				name, ErrDatapathUnavailable, s.cfg.Datapath)
		}
	default:
		accepted := "copy, splice or auto"
		if s.kernel != nil {
			accepted = "copy, splice, sockmap or auto"
		}
		return listenerInfo{}, fmt.Errorf("listener %q: datapath %q: %w; accepted here: %s", name, dp, ErrDatapathUnavailable, accepted)
	}
	return listenerInfo{name: name, datapath: dp, perTunnel: perTunnel}, nil
}
