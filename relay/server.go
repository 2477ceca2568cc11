package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
	"github.com/sockrelay/sockrelay/upstream"
)

// Config is what a Server needs. Zero durations and sizes take the defaults below.
type Config struct {
	// Upstreams is a single round-robin pool for every request, when Router is nil (`--upstream`).
	Upstreams []string
	// Router, when set, chooses the pool per listener, host and path (a configuration file); SetRouter
	// replaces it at run time.
	Router Router
	// Datapath is the datapath tunnels use. Auto is resolved by NewServer: sockmap when this kernel passes
	// the probe and the self-test, else splice, else copy; each step down is logged and counted.
	Datapath Datapath

	// ClientHeaderTimeout bounds how long a client may take to send its request headers (slowloris).
	ClientHeaderTimeout time.Duration
	// ConnectTimeout bounds connecting to an upstream.
	ConnectTimeout time.Duration
	// UpstreamResponseTimeout bounds how long an upstream may take to answer a forwarded request.
	UpstreamResponseTimeout time.Duration
	// HTTPIdleTimeout cuts a plain (reverse-proxied) request through which no byte moved for that long:
	// its body from the client or to the upstream, its response from the upstream or to the client.
	HTTPIdleTimeout time.Duration
	// MaxHeaderBytes bounds a client's request line and headers.
	MaxHeaderBytes int
	// Limits apply to every handshake and tunnel of the server; a listener may add its own.
	Limits Limits
	// TunnelIdleTimeout, when positive, closes a tunnel with no byte either way for that long (HAProxy's
	// `timeout tunnel`); TunnelLifetime, when positive, closes tunnels that old. At least MinTunnelTimeout.
	TunnelIdleTimeout time.Duration
	TunnelLifetime    time.Duration
	// HalfClosedTimeout ends a WebSocket tunnel (http listeners) once one side has sent its FIN and nothing
	// has moved either way for that long; TCPHalfClosedTimeout is the same for tcp listeners' tunnels
	// (HAProxy's client-fin and server-fin). 0 takes the default, a negative value turns it off; else at
	// least MinTunnelTimeout.
	HalfClosedTimeout    time.Duration
	TCPHalfClosedTimeout time.Duration
	// TunnelLogInterval, when positive, logs every tunnel that has lived that long again at that interval,
	// with its bytes so far (see logLongLivedTunnels); at least MinTunnelLogInterval.
	TunnelLogInterval time.Duration
	// KernelHeldLimit bounds, on the sockmap datapath, the bytes the kernel holds per tunnel direction for
	// a reader slower than its sender; past it the direction is relayed by userspace until it catches up.
	KernelHeldLimit int

	// Reload, when set, re-reads the configuration file: POST /admin/reload calls it. It returns why a
	// configuration was refused; the one in force then stays.
	Reload func() error

	Logger     *slog.Logger
	Registerer prometheus.Registerer

	// alterKernelPath, set only by tests and benchmarks, alters the kernel datapath before its self-test.
	alterKernelPath func(*kernelPath)
	// newPipe, set only by tests, stands in for newPipe when splice tunnels get their pipes.
	newPipe func(size int) (*datapath.Pipe, error)
	// dialControl, set only by tests, runs on each upstream socket before its connect (net.Dialer.Control):
	// an error from it is the relay's own socket failing.
	dialControl func(network, address string, c syscall.RawConn) error
}

// Defaults for Config's zero values.
const (
	DefaultClientHeaderTimeout     = 10 * time.Second
	DefaultConnectTimeout          = 5 * time.Second
	DefaultUpstreamResponseTimeout = 15 * time.Second
	DefaultHTTPIdleTimeout         = 60 * time.Second // nginx's client_body_timeout and send_timeout
	DefaultMaxHeaderBytes          = 16 << 10
	// DefaultKernelHeldLimit is 4 MiB, where the backpressure prototype demoted (docs/datapath.md,
	// "Backpressure"). The kernel also holds up to a send
	// buffer in the destination (tcp_wmem, 4 MiB at most by default) and a receive buffer in the source,
	// so a stopped reader costs about 12 MiB per direction, the order of what the userspace paths let
	// the socket buffers hold for them (8–10 MiB measured here).
	DefaultKernelHeldLimit = 4 << 20
	// MinKernelHeldLimit is the least KernelHeldLimit accepted: below a few segments, a direction would
	// be demoted by every burst.
	MinKernelHeldLimit = 64 << 10
	// DefaultHalfClosedTimeout: a WebSocket has no meaningful half-close (RFC 6455 closes both ways
	// with close frames), so a tunnel one side has finished is a dead one; nginx and HAProxy had closed
	// such tunnels within 3 s.
	DefaultHalfClosedTimeout = 5 * time.Second
	// DefaultTCPHalfClosedTimeout is longer: raw TCP protocols do half-close and then answer.
	DefaultTCPHalfClosedTimeout = 60 * time.Second
	// MinTunnelTimeout is the least tunnel idle timeout, lifetime and half-close timeout: shorter ones
	// would close tunnels between two scans' worth of noise.
	MinTunnelTimeout = time.Second
	// MinTunnelLogInterval keeps "tunnel alive" records from flooding the log.
	MinTunnelLogInterval = time.Second
	// MaxKernelHeldLimit: the verdict compares what it holds as a signed 32-bit count (bpf/sockrelay.c).
	MaxKernelHeldLimit = 1 << 30
)

// Server relays WebSockets: it validates each client's upgrade, forwards it to an upstream, and opens a
// tunnel only when the upstream accepts. Other HTTP requests are reverse-proxied to the same upstreams.
type Server struct {
	cfg     Config
	log     *slog.Logger
	router  atomic.Pointer[routerBox]
	tunnels *Registry
	metrics *Metrics
	dialer  net.Dialer
	proxy   *httputil.ReverseProxy
	// listeners are the HTTP servers of Serve and ServeListener, one per listener; Shutdown stops them all.
	listenersMu  sync.Mutex
	listeners    []*http.Server
	tcpListeners []net.Listener // of ServeTCP
	kernel       *kernelPath    // nil unless the datapath is sockmap
	splicer      *datapath.Splicer

	draining atomic.Bool
	limiter  *limiter // Config.Limits
	// evictedServers are servers whose tunnels CloseTunnelsTo closed (see evicted).
	evictMu        sync.Mutex
	evictedServers map[*upstream.Server]bool
	stop           chan struct{} // closed by Shutdown: ends the server's own goroutines
	stopOnce       sync.Once
}

// NewServer checks cfg and returns a Server ready to Serve.
func NewServer(cfg Config) (*Server, error) {
	router := cfg.Router
	if router == nil {
		var err error
		if router, err = NewSinglePoolRouter(cfg.Upstreams); err != nil {
			return nil, err
		}
	}
	switch cfg.Datapath {
	case DatapathAuto, DatapathCopy, DatapathSplice, DatapathSockmap:
	default:
		return nil, fmt.Errorf("datapath %q: %w", cfg.Datapath, ErrDatapathUnavailable)
	}
	cfg.ClientHeaderTimeout = orDefault(cfg.ClientHeaderTimeout, DefaultClientHeaderTimeout)
	cfg.ConnectTimeout = orDefault(cfg.ConnectTimeout, DefaultConnectTimeout)
	cfg.UpstreamResponseTimeout = orDefault(cfg.UpstreamResponseTimeout, DefaultUpstreamResponseTimeout)
	cfg.HTTPIdleTimeout = orDefault(cfg.HTTPIdleTimeout, DefaultHTTPIdleTimeout)
	if cfg.HTTPIdleTimeout < 0 {
		return nil, fmt.Errorf("http idle timeout %v: accepted a positive duration (0 for the default %v)", cfg.HTTPIdleTimeout, DefaultHTTPIdleTimeout)
	}
	cfg.MaxHeaderBytes = orDefault(cfg.MaxHeaderBytes, DefaultMaxHeaderBytes)
	cfg.KernelHeldLimit = orDefault(cfg.KernelHeldLimit, DefaultKernelHeldLimit)
	cfg.HalfClosedTimeout = orDefault(cfg.HalfClosedTimeout, DefaultHalfClosedTimeout)
	cfg.TCPHalfClosedTimeout = orDefault(cfg.TCPHalfClosedTimeout, DefaultTCPHalfClosedTimeout)
	if cfg.KernelHeldLimit < MinKernelHeldLimit || cfg.KernelHeldLimit > MaxKernelHeldLimit {
		return nil, fmt.Errorf("kernel held limit %d: accepted %d to %d", cfg.KernelHeldLimit, MinKernelHeldLimit, MaxKernelHeldLimit)
	}
	if cfg.TunnelLogInterval != 0 && cfg.TunnelLogInterval < MinTunnelLogInterval {
		return nil, fmt.Errorf("tunnel log interval %v: 0 (off) or at least %v", cfg.TunnelLogInterval, MinTunnelLogInterval)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
		off  string
	}{{"tunnel idle timeout", cfg.TunnelIdleTimeout, "0 (off)"}, {"tunnel lifetime", cfg.TunnelLifetime, "0 (off)"},
		{"half-close timeout", cfg.HalfClosedTimeout, "negative (off)"},
		{"tcp half-close timeout", cfg.TCPHalfClosedTimeout, "negative (off)"}} {
		if d.v > 0 && d.v < MinTunnelTimeout {
			return nil, fmt.Errorf("%s %v: %s or at least %v", d.name, d.v, d.off, MinTunnelTimeout)
		}
	}
	if err := cfg.Limits.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}

	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger,
		tunnels: NewRegistry(),
		dialer:  net.Dialer{Timeout: cfg.ConnectTimeout, Control: cfg.dialControl},
		stop:    make(chan struct{}),
		limiter: newLimiter(cfg.Limits),
		splicer: &datapath.Splicer{NewPipe: cfg.newPipe},
	}
	s.SetRouter(router)
	s.metrics = newMetrics(cfg.Registerer, s.tunnels, s.Router, s.kernelStats)
	if err := s.setUpDatapath(); err != nil {
		return nil, err
	}
	s.proxy = s.newReverseProxy()
	if cfg.TunnelLogInterval > 0 {
		go s.logLongLivedTunnels(cfg.TunnelLogInterval, s.stop)
	}
	if max(cfg.TunnelIdleTimeout, cfg.TunnelLifetime, cfg.HalfClosedTimeout, cfg.TCPHalfClosedTimeout) > 0 {
		go s.enforceTunnelTimeouts(cfg.TunnelIdleTimeout, cfg.TunnelLifetime, timeoutTick(cfg.TunnelIdleTimeout,
			cfg.TunnelLifetime, cfg.HalfClosedTimeout, cfg.TCPHalfClosedTimeout), s.stop)
	}
	return s, nil
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Tunnels returns the registry of live tunnels.
func (s *Server) Tunnels() *Registry { return s.tunnels }

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

// ServeListenerWith is ServeListener with every listener setting.
func (s *Server) ServeListenerWith(l net.Listener, opts ListenerOptions) error {
	info, err := s.listenerSetup(opts)
	if err != nil {
		l.Close()
		return err
	}
	info.trusted = opts.TrustedProxies
	l = s.wrapListener(l, opts)
	hs := &http.Server{
		Handler:           s.withAccessLog(s),
		ReadHeaderTimeout: s.cfg.ClientHeaderTimeout,
		MaxHeaderBytes:    httpServerHeaderBytes(s.cfg.MaxHeaderBytes),
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		BaseContext: func(net.Listener) context.Context {
			return context.WithValue(context.Background(), listenerKey{}, info)
		},
	}
	if !s.track(func() { s.listeners = append(s.listeners, hs) }) {
		l.Close()
		return http.ErrServerClosed
	}
	return hs.Serve(l)
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
	if err == nil {
		err = opts.Limits.Validate()
	}
	if err != nil {
		return listenerInfo{}, err
	}
	if opts.Limits != (Limits{}) {
		info.limiter = newLimiter(opts.Limits)
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
	switch dp {
	case DatapathAuto, "":
		dp = s.cfg.Datapath
	case DatapathCopy, DatapathSplice:
	case DatapathSockmap:
		if s.kernel == nil {
			return listenerInfo{}, fmt.Errorf("listener %q: datapath sockmap: %w: the relay's datapath is %s, and only sockmap or auto load the kernel datapath",
				name, ErrDatapathUnavailable, s.cfg.Datapath)
		}
	default:
		return listenerInfo{}, fmt.Errorf("listener %q: datapath %q: %w", name, dp, ErrDatapathUnavailable)
	}
	return listenerInfo{name: name, datapath: dp}, nil
}

// Shutdown stops accepting clients, lets handshakes in progress and live tunnels finish until ctx is done,
// then resets the tunnels that are left. It returns ctx's error if it had to close tunnels.
func (s *Server) Shutdown(ctx context.Context) error {
	s.listenersMu.Lock()
	s.draining.Store(true)
	listeners, tcpListeners := s.listeners, s.tcpListeners
	s.listenersMu.Unlock()
	for _, l := range tcpListeners {
		l.Close()
	}
	// Every listener stops accepting at once; then each waits for its handshakes in progress. One after
	// the other, a listener would keep accepting while an earlier one waited.
	errs := make(chan error, len(listeners))
	for _, hs := range listeners {
		go func() {
			herr := hs.Shutdown(ctx)
			if herr != nil {
				// Handshakes still in progress: cut them off, so none opens a tunnel after the drain.
				_ = hs.Close()
			}
			errs <- herr
		}()
	}
	var err error
	for range listeners {
		if herr := <-errs; herr != nil {
			err = herr
		}
	}
	if werr := s.tunnels.Wait(ctx); werr != nil {
		err = werr
		s.log.Warn("drain time over, closing tunnels", "tunnels", s.tunnels.Len())
	}
	s.tunnels.CloseAll()
	s.stopOnce.Do(func() { close(s.stop) })
	if s.kernel != nil {
		s.kernel.Close()
	}
	return err
}

// ServeHTTP sends upgrade requests through the WebSocket handshake and every other request to the reverse proxy.
//
// A path that could take another route to the upstream than it takes here is refused with 400 before
// routing (see pathProblem): routes match the path unresolved, and "/ws/../admin" must not pass as "/ws"
// to an upstream that resolves it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		// A reverse proxy has no tunnel to open to the authority a CONNECT names: proxying it would send
		// the upstream a request for "/" and the client's tunnel bytes after it.
		s.metrics.httpRequests.WithLabelValues(strconv.Itoa(http.StatusNotImplemented)).Inc()
		w.Header().Set("Connection", "close")
		http.Error(w, "CONNECT is not supported: this is a reverse proxy, not a forward proxy", http.StatusNotImplemented)
		return
	}
	if len(r.TransferEncoding) > 0 {
		// With Transfer-Encoding and Content-Length both, a proxy in front may have framed the body by the
		// latter, and then what follows on this connection is not what it thinks: RFC 9112 section 6.1 says
		// close after responding. net/http drops the Content-Length before a handler sees it, so every
		// chunked request closes its connection (a cost only to clients that send chunked bodies).
		w.Header().Set("Connection", "close")
	}
	if msg := pathProblem(r.URL.Path); msg != "" {
		if isUpgradeRequest(r) {
			s.refuse(w, r, &handshakeError{status: http.StatusBadRequest, reason: FailBadPath, msg: msg})
			return
		}
		s.metrics.httpRequests.WithLabelValues(strconv.Itoa(http.StatusBadRequest)).Inc()
		http.Error(w, msg, http.StatusBadRequest)
		return
	}
	if isUpgradeRequest(r) {
		s.serveUpgrade(w, r)
		return
	}
	s.serveRequest(w, r)
}

// pathProblem says why a (percent-decoded) path is refused, or "" when it is not: a "." or ".." segment,
// or an empty segment ("//") anywhere but at the end. Servers merge or resolve these ("//admin" is
// "/admin" to nginx and most frameworks), so the route chosen for the path as sent would not be the one
// for the path the upstream serves. A segment's ";parameters" are left out first, as servlet containers
// do: "/..;/admin" is "/../admin" to Tomcat. "%2F" decodes to "/" before this check, so "/%2fadmin" is
// "//admin".
func pathProblem(path string) string {
	segs := strings.Split(path, "/")
	for i, seg := range segs {
		seg, _, _ = strings.Cut(seg, ";")
		switch {
		case seg == "." || seg == "..":
			return "the path has . or .. segments"
		case seg == "" && i > 0 && i < len(segs)-1:
			return "the path has an empty segment (//)"
		}
	}
	return ""
}

// upstreamAddrKey carries the server that serveRequest chose to the reverse proxy's Rewrite, and
// upstreamTLSKey its route's TLS settings (for a wss pool) to the transport's dialer.
type (
	upstreamAddrKey struct{}
	upstreamTLSKey  struct{}
	proxyHeaderKey  struct{} // the PROXY header a pool with proxy_protocol gets first on each connection
)

// serveRequest reverse-proxies a plain HTTP request to a server of its route's pool, holding a lease on
// the server while the request runs, so that least_tunnels and max_tunnels see it.
func (s *Server) serveRequest(w http.ResponseWriter, r *http.Request) {
	status := 0
	route, ok := s.route(r)
	pool := route.Pool
	var lease *upstream.Lease
	if !ok {
		status = http.StatusNotFound
	} else {
		var err error
		noteUpstream(r, pool.Name(), "")
		if lease, err = pool.Pick(pool.Key(s.clientOf(r).ip, r), nil); err != nil {
			status = http.StatusServiceUnavailable
			s.log.Warn("proxy request failed", "client", r.RemoteAddr, "method", r.Method, "uri", r.RequestURI,
				"status", status, "err", err)
		}
	}
	if status != 0 {
		s.metrics.httpRequests.WithLabelValues(strconv.Itoa(status)).Inc()
		http.Error(w, http.StatusText(status), status)
		return
	}
	defer lease.Release()
	noteUpstream(r, pool.Name(), lease.Server.Address())
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	iw := newIdleWatch(w, s.cfg.HTTPIdleTimeout, s.cfg.UpstreamResponseTimeout, cancel, func(waitingFor string) {
		s.log.Info("plain request cut: nothing moved", "client", r.RemoteAddr, "method", r.Method,
			"uri", r.RequestURI, "upstream", lease.Server.Address(), "idle", s.cfg.HTTPIdleTimeout, "waiting_for", waitingFor)
	})
	defer iw.stop()
	ctx = context.WithValue(ctx, idleWatchKey{}, iw)
	ctx = context.WithValue(ctx, upstreamAddrKey{}, lease.Server.Address())
	if route.UpstreamTLS != nil {
		ctx = context.WithValue(ctx, upstreamTLSKey{}, route.UpstreamTLS)
	}
	if route.SendProxy != "" {
		local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		ctx = context.WithValue(ctx, proxyHeaderKey{}, proxyHeader(route.SendProxy, clientAddr(r), local))
	}
	r = r.WithContext(ctx)
	if r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
		r.Body = &watchedBody{ReadCloser: r.Body, iw: iw}
	} else {
		iw.upstreamsTurn()
	}
	s.proxy.ServeHTTP(&watchedWriter{ResponseWriter: w, iw: iw}, r)
}

func (s *Server) newReverseProxy() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			scheme := "http"
			if pr.In.Context().Value(upstreamTLSKey{}) != nil {
				scheme = "https"
			}
			pr.SetURL(&url.URL{Scheme: scheme, Host: pr.In.Context().Value(upstreamAddrKey{}).(string)})
			if pr.In.Context().Value(proxyHeaderKey{}) != nil || scheme == "https" {
				// A connection whose PROXY header names this client must carry no other's request; and
				// the transport pools connections by address alone, so one opened with a wss pool's TLS
				// settings (client certificate, server name) must not serve another pool's request.
				pr.Out.Close = true
			}
			pr.Out.Host = pr.In.Host // as in the WebSocket path: the upstream sees the Host the client asked for
			setForwarded(pr.Out.Header, pr.In, s.clientOf(pr.In))
		},
		Transport: &http.Transport{
			DialContext: s.dialUpstream,
			// A wss pool's plain requests: its TLS settings come with the request.
			DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				cfgFor, _ := ctx.Value(upstreamTLSKey{}).(func(string) *tls.Config)
				if cfgFor == nil {
					return nil, fmt.Errorf("https to %s without the pool's TLS settings", addr)
				}
				conn, err := s.dialUpstream(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				tc := tls.Client(conn, cfgFor(addr))
				if err := tc.HandshakeContext(ctx); err != nil {
					conn.Close()
					return nil, fmt.Errorf("TLS handshake with upstream %s: %w", addr, err)
				}
				return tc, nil
			},
			ResponseHeaderTimeout: s.cfg.UpstreamResponseTimeout,
			MaxIdleConnsPerHost:   64,
			IdleConnTimeout:       90 * time.Second,
		},
		ModifyResponse: func(resp *http.Response) error {
			if iw, _ := resp.Request.Context().Value(idleWatchKey{}).(*idleWatch); iw != nil {
				iw.progress() // the answer's head came: from here on, its bytes must keep moving
			}
			s.metrics.httpRequests.WithLabelValues(strconv.Itoa(resp.StatusCode)).Inc()
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			status := http.StatusBadGateway
			if isTimeout(err) {
				status = http.StatusGatewayTimeout
			}
			if iw, _ := r.Context().Value(idleWatchKey{}).(*idleWatch); iw != nil {
				switch iw.cutFor() {
				case cutClientBody:
					status = http.StatusRequestTimeout
					w.Header().Set("Connection", "close")
				case cutOther:
					status = http.StatusGatewayTimeout
					w.Header().Set("Connection", "close")
				}
			}
			s.metrics.httpRequests.WithLabelValues(strconv.Itoa(status)).Inc()
			s.log.Warn("proxy request failed", "client", r.RemoteAddr, "method", r.Method, "uri", r.RequestURI,
				"status", status, "err", err)
			http.Error(w, http.StatusText(status), status)
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// dialUpstream connects the reverse proxy to a server, first sending the PROXY header that the request's
// pool asks for (set by serveRequest).
func (s *Server) dialUpstream(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := s.dialer.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if header, ok := ctx.Value(proxyHeaderKey{}).([]byte); ok {
		deadline, _ := ctx.Deadline()
		if err := sendProxyHeader(conn, header, deadline); err != nil {
			conn.Close()
			return nil, fmt.Errorf("send PROXY header to upstream %s: %w", addr, err)
		}
	}
	return conn, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// refuse answers a client whose handshake will not become a tunnel, and counts and logs why. The client
// connection is closed after the answer: a client that sent an upgrade may have pipelined WebSocket frames
// behind it, and those must never be read as HTTP.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, e *handshakeError) {
	s.handshakeFailed(r, e.reason)
	s.log.Info("handshake refused", "client", r.RemoteAddr, "uri", r.RequestURI, "status", e.status,
		"reason", e.reason, "err", e.msg)
	for k, v := range e.header {
		w.Header()[k] = v
	}
	w.Header().Set("Connection", "close")
	http.Error(w, e.msg, e.status)
}

// serveUpgrade runs one WebSocket handshake. The client's connection is taken over only after the upstream
// has answered with a valid 101; until then the client is an ordinary HTTP client, so no raw byte of it can
// reach an upstream that did not accept the upgrade.
func (s *Server) serveUpgrade(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	key, herr := validateUpgrade(r)
	if herr != nil {
		s.refuse(w, r, herr)
		return
	}

	endHandshake, releaseSlot, lerr := admit(s.limitersFor(s.listenerOf(r)), s.clientOf(r).ip)
	if lerr != nil {
		s.refuse(w, r, lerr.handshakeError())
		return
	}
	defer endHandshake()
	slotTaken := true // until a tunnel holds it
	defer func() {
		if slotTaken {
			releaseSlot()
		}
	}()

	route, ok := s.routeOrRefuse(w, r)
	if !ok {
		return
	}
	pool := route.Pool
	r = withPool(r, pool)
	up, herr, err := s.openUpstream(r, route, key)
	if err != nil {
		s.handshakeFailed(r, FailClientGone)
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailClientGone, "err", err)
		return
	}
	if herr != nil {
		s.refuse(w, r, herr)
		return
	}
	upstream, resp, upstreamPrefix := up.conn, up.resp, up.prefix
	opened := false
	defer func() {
		if !opened {
			upstream.Close()
			up.lease.Release()
		}
	}()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		s.passResponse(w, r, upstream, resp)
		return
	}

	if s.evicted(up.lease.Server) {
		s.refuse(w, r, &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamRemoved,
			msg: fmt.Sprintf("upstream %s was removed by a reload during the handshake", up.lease.Server.Address())})
		return
	}
	client, clientTLS, clientPrefix, err := hijack(w)
	if err != nil {
		s.handshakeFailed(r, FailClientGone)
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailClientGone, "err", err)
		return
	}
	t, err := s.establish(opening{
		listener:          s.listenerOf(r),
		client:            datapath.Endpoint{Conn: client, TLS: clientTLS, Peeked: clientPrefix},
		upstream:          datapath.Endpoint{Conn: upstream, TLS: up.tls, Peeked: upstreamPrefix},
		up:                up,
		clientAddr:        r.RemoteAddr,
		req:               describeRequest(r, s.listenerOf(r).name),
		pool:              pool.Name(),
		releaseSlot:       releaseSlot,
		halfClosedTimeout: s.cfg.HalfClosedTimeout,
	})
	switch {
	case errors.Is(err, errShuttingDownAtOpen):
		client.Close()
		s.handshakeFailed(r, FailShuttingDown)
		return
	case errors.Is(err, errEvictedAtOpen):
		opened, slotTaken = true, false // the tunnel had them, and gave them back as it ended
		s.handshakeFailed(r, FailUpstreamRemoved)
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailUpstreamRemoved, "err", err)
		return
	}
	opened = true // from here on the tunnel owns both sockets, its lease and its slot
	slotTaken = false
	var switchTo net.Conn = client
	if clientTLS != nil {
		switchTo = clientTLS
	}
	if err := writeSwitch(switchTo, resp.Header, s.cfg.UpstreamResponseTimeout); err != nil {
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailClientGone, "err", err)
		t.fail(ReasonClientError, err, true)
		return
	}
	s.metrics.handshakeDuration.Observe(time.Since(start).Seconds())
	s.carry(t)
}

// setUpDatapath resolves and prepares the configured datapath. The kernel datapath is trusted only after
// the probe and the self-test pass on this kernel; asked for by name it is refused otherwise, and under auto
// the relay steps down to splice (or copy) and says so in the log and in the fallback counter.
func (s *Server) setUpDatapath() error {
	requested := s.cfg.Datapath
	if requested == DatapathSockmap || requested == DatapathAuto {
		k, err := s.startKernelPath()
		if err == nil {
			s.kernel, s.cfg.Datapath = k, DatapathSockmap
			s.log.Info("datapath chosen", "datapath", DatapathSockmap, "requested", requested,
				"why", "the kernel passed the probe and the self-test")
			return nil
		}
		if requested == DatapathSockmap {
			return fmt.Errorf("%w: %v", ErrDatapathUnavailable, err)
		}
		var reason string
		switch {
		case errors.Is(err, errSelfTest):
			reason = "sockmap_selftest_failed"
		default:
			reason = "sockmap_unavailable"
		}
		s.metrics.datapathFallbacks.WithLabelValues(reason).Inc()
		s.log.Warn("kernel datapath unavailable, using a userspace one", "reason", reason, "err", err)
		return s.chooseUserspace(requested, []string{err.Error()})
	}
	if err := DatapathAvailable(requested); err != nil {
		return err
	}
	s.log.Info("datapath chosen", "datapath", requested, "requested", requested, "why", "requested by name")
	return nil
}

// chooseUserspace picks the first of splice and copy that can run, logging why.
func (s *Server) chooseUserspace(requested Datapath, skipped []string) error {
	for _, d := range []Datapath{DatapathSplice, DatapathCopy} {
		err := DatapathAvailable(d)
		if err == nil {
			s.cfg.Datapath = d
			s.log.Info("datapath chosen", "datapath", d, "requested", requested,
				"why", "best available; skipped "+strings.Join(skipped, "; "))
			return nil
		}
		skipped = append(skipped, err.Error())
	}
	return fmt.Errorf("%w: no datapath can run: %s", ErrDatapathUnavailable, strings.Join(skipped, "; "))
}

// startKernelPath probes the kernel, loads the BPF objects and runs the self-test on them.
func (s *Server) startKernelPath() (*kernelPath, error) {
	if err := loader.Probe().Err(); err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k, err := newKernelPath(s.log, s.kernelFallback)
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	if s.cfg.alterKernelPath != nil {
		s.cfg.alterKernelPath(k)
	}
	if err := k.selfTest(); err != nil {
		k.Close()
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k.resetStats() // after the self-test: its demotions are not the users'
	k.heldLimit = uint64(s.cfg.KernelHeldLimit)
	return k, nil
}

// kernelStats are the kernel engine's counts, zero when the server runs no kernel engine. The engine is
// set up in NewServer, before anything can scrape the metrics that read it.
func (s *Server) kernelStats() kernelStats {
	if s.kernel == nil {
		return kernelStats{}
	}
	return s.kernel.Stats()
}

// Datapath is the datapath this server's tunnels use, auto resolved.
func (s *Server) Datapath() Datapath { return s.cfg.Datapath }

// kernelFallback counts a tunnel the kernel datapath handed to the copy datapath.
func (s *Server) kernelFallback(_ *datapath.Pair, reason string) {
	s.metrics.tunnelsActive.WithLabelValues(string(DatapathSockmap)).Dec()
	s.metrics.tunnelsActive.WithLabelValues(string(DatapathCopy)).Inc()
	s.metrics.datapathFallbacks.WithLabelValues(reason).Inc()
}

// forwardHandshake sends the client's upgrade request to the upstream and reads its answer, within the
// upstream response timeout. A 101 comes back with the bytes the upstream sent behind it (they belong to the
// tunnel); any other complete response comes back for passResponse.
func (s *Server) forwardHandshake(conn net.Conn, r *http.Request, key string) (*http.Response, []byte, *handshakeError) {
	start := time.Now()
	deadline := start.Add(s.cfg.UpstreamResponseTimeout)
	_ = conn.SetDeadline(deadline)
	fail := func(op string, err error) *handshakeError {
		if isTimeout(err) {
			return &handshakeError{status: http.StatusGatewayTimeout, reason: FailUpstreamTimeout,
				msg: fmt.Sprintf("%s: no answer within %s", op, deadline.Sub(start).Round(time.Millisecond))}
		}
		return &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamError, msg: fmt.Sprintf("%s: %v", op, err)}
	}
	if _, err := conn.Write(upstreamRequest(r, s.clientOf(r))); err != nil {
		return nil, nil, fail("send handshake", err)
	}
	// Interim responses are skipped; the heads may take MaxHeaderBytes together.
	resp, br, err := upstream.ReadAnswer(conn, &http.Request{Method: http.MethodGet}, s.cfg.MaxHeaderBytes)
	if err != nil {
		return nil, nil, fail("read handshake response", err)
	}
	switch {
	case resp.StatusCode == http.StatusSwitchingProtocols:
		if err := validateSwitch(resp, key); err != nil {
			return nil, nil, &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamBadSwitch, msg: err.Error()}
		}
	case resp.StatusCode < 200:
		// Not a status HTTP has (interim ones were skipped): it cannot be passed on as an answer.
		return nil, nil, &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamError,
			msg: fmt.Sprintf("status %d in answer to a websocket handshake", resp.StatusCode)}
	default:
		return resp, nil, nil
	}
	_ = conn.SetDeadline(time.Time{})
	// A 101 has no body, so everything buffered past its header is the upstream's first tunnel bytes.
	prefix, _ := br.Peek(br.Buffered())
	return resp, bytes.Clone(prefix), nil
}

// upstreamRequest is the client's handshake as the upstream gets it: origin-form target, the client's Host,
// its end-to-end headers, no hop-by-hop headers but the upgrade itself, and X-Forwarded-* describing the client.
func upstreamRequest(r *http.Request, client clientIdentity) []byte {
	h := r.Header.Clone()
	removeHopHeaders(h)
	h.Set("Connection", "Upgrade")
	h.Set("Upgrade", "websocket")
	setForwarded(h, r, client)
	var b bytes.Buffer
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\n", r.URL.RequestURI(), r.Host)
	_ = h.Write(&b)
	b.WriteString("\r\n")
	return b.Bytes()
}

// passResponse gives the client the upstream's refusal (a 401, a 403, a redirect, ...) as an ordinary response.
func (s *Server) passResponse(w http.ResponseWriter, r *http.Request, upstream net.Conn, resp *http.Response) {
	defer resp.Body.Close()
	s.handshakeFailed(r, FailUpstreamRefused)
	s.log.Info("handshake refused by upstream", "client", r.RemoteAddr, "uri", r.RequestURI,
		"upstream", upstream.RemoteAddr().String(), "status", resp.StatusCode)
	removeHopHeaders(resp.Header)
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.Header().Set("Connection", "close")
	w.WriteHeader(resp.StatusCode)
	// The body gets a fresh timeout of its own: an upstream that never ends it cannot hold the handler.
	_ = upstream.SetDeadline(time.Now().Add(s.cfg.UpstreamResponseTimeout))
	if _, err := io.Copy(w, resp.Body); err != nil {
		s.log.Info("passing upstream response body failed", "client", r.RemoteAddr, "err", err)
	}
}

// hijack takes the client's connection from net/http, with the bytes net/http had already read past the
// request: the client's pipelined first tunnel bytes. On a TLS listener it also returns the TLS
// connection, which the tunnel's bytes go through; the socket is still returned, for closing it.
func hijack(w http.ResponseWriter) (*net.TCPConn, *tls.Conn, []byte, error) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("hijack client connection: %w", err)
	}
	prefix, _ := brw.Reader.Peek(brw.Reader.Buffered())
	prefix = bytes.Clone(prefix)
	tlsConn, isTLS := conn.(*tls.Conn)
	if isTLS {
		// Ciphertext the TLS connection has not read yet stays where it is, in a PROXY header reader
		// or the socket: the TLS connection goes on reading through what it was given.
		conn = tlsConn.NetConn()
	}
	if pc, ok := conn.(*proxiedConn); ok {
		if isTLS {
			return pc.TCPConn, tlsConn, prefix, nil
		}
		// net/http read through the PROXY header reader: what it holds comes first, then what that
		// reader holds, then the socket.
		return pc.TCPConn, nil, append(prefix, pc.leftover()...), nil
	}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("client connection is a %T, not TCP", conn)
	}
	return tc, tlsConn, prefix, nil
}

// writeSwitch sends the client the upstream's 101 with the upstream's end-to-end headers
// (Sec-WebSocket-Accept, -Protocol, -Extensions, cookies) and this hop's Upgrade and Connection.
func writeSwitch(client net.Conn, upstreamHeader http.Header, timeout time.Duration) error {
	h := upstreamHeader.Clone()
	removeHopHeaders(h)
	h.Set("Upgrade", "websocket")
	h.Set("Connection", "Upgrade")
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	_ = h.Write(&b)
	b.WriteString("\r\n")
	_ = client.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := client.Write(b.Bytes()); err != nil {
		return fmt.Errorf("send 101 to client: %w", err)
	}
	return client.SetWriteDeadline(time.Time{})
}
