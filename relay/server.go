package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
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
	// startLoops, set only by tests, stands in for datapath.StartEventLoop when the copy datapath starts its
	// event loops.
	startLoops func(eventloop.Options) (*datapath.EventLoop, error)
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
	copier       *copyEngine // event loops for plain tunnels, goroutines for TLS ones

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
	s.copier = &copyEngine{log: cfg.Logger, start: cfg.startLoops, opts: eventloop.Options{Loops: copyLoops()}}
	s.metrics = newMetrics(cfg.Registerer, s.tunnels, s.Router, s.kernelStats, s.copier.Stats)
	s.copier.metrics = s.metrics
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
	_ = s.copier.Close()
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

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}
