package relay

import (
	"context"
	"errors"
	"fmt"
	"github.com/sockrelay/sockrelay/internal/settings"
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
	"github.com/sockrelay/sockrelay/datapath/auto"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
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
	// `timeout tunnel`); TunnelLifetime, when positive, closes tunnels that old. At least 1s (settings.TunnelTimeout).
	TunnelIdleTimeout time.Duration
	TunnelLifetime    time.Duration
	// HalfClosedTimeout ends a WebSocket tunnel (http listeners) once one side has sent its FIN and nothing
	// has moved either way for that long; TCPHalfClosedTimeout is the same for tcp listeners' tunnels
	// (HAProxy's client-fin and server-fin). 0 takes the default, a negative value turns it off; else at
	// least 1s (settings.TunnelTimeout).
	HalfClosedTimeout    time.Duration
	TCPHalfClosedTimeout time.Duration
	// TunnelLogInterval, when positive, logs every tunnel that has lived that long again at that interval,
	// with its bytes so far (see logLongLivedTunnels); at least 1s (settings.TunnelTimeout).
	TunnelLogInterval time.Duration
	// KernelHeldLimit bounds, on the sockmap datapath, the bytes the kernel holds per tunnel direction for
	// a reader slower than its sender; past it the direction is relayed by userspace until it catches up.
	KernelHeldLimit int
	// EventLoops is how many event loops carry the copy and splice datapaths' plain tunnels; 0 takes the
	// default, one per two CPUs (copyLoops). At most settings.EventLoops.
	EventLoops int

	// Reload, when set, re-reads the configuration file: POST /admin/reload calls it. It returns why a
	// configuration was refused; the one in force then stays.
	Reload func() error
	// Upgrade, when set, starts a new relay process, hands it the listeners and returns once it serves:
	// POST /admin/upgrade calls it. Its error says why the new process did not take over; this one then
	// keeps everything. An error that is ErrUpgradeRefused was a request refused before anything started.
	Upgrade func(context.Context, UpgradeRequest) (UpgradeResult, error)

	Logger     *slog.Logger
	Registerer prometheus.Registerer

	// KernelObjects are the BPF objects of the relay this one replaces in an upgrade, by name
	// (loader.Export): when the datapath is sockmap (or auto) the kernel engine adopts them instead of
	// loading its own, so that the old relay's kernel tunnels can move here (kernelhandoff.go). NewServer
	// takes and closes them.
	KernelObjects map[string]*os.File

	// startKernel, set only by tests, stands in for sockmap.Start when the relay starts the kernel datapath.
	startKernel func(log *slog.Logger, onFallback func(*datapath.Pair, string), heldLimit uint64) (*sockmap.Engine, error)
	// newPipe, set only by tests, stands in for pipe2(2) when the event loops make pipes for splice tunnels.
	newPipe func(size int) (r, w int, err error)
	// startLoops, set only by tests, stands in for datapath.StartEventLoop when the copy datapath starts its
	// event loops.
	startLoops func(eventloop.Options) (*datapath.EventLoop, error)
	// dialControl, set only by tests, runs on each upstream socket before its connect (net.Dialer.Control):
	// an error from it is the relay's own socket failing.
	dialControl func(network, address string, c syscall.RawConn) error
	// Auto are the settings of auto's per-tunnel policy (AutoOptions); the zero value measures at start.
	Auto AutoOptions
	// autoPolicy and autoDecide, set only by tests, stand in for auto.DefaultPolicy and auto.Decide in the
	// per-tunnel policy of auto (automove.go).
	autoPolicy *auto.Policy
	autoDecide func(auto.Policy, auto.Sample, auto.History) auto.Decision
	// probeEngine, set only by tests, stands in for the engine that carries a path's pairs in the start
	// measurement (autoprobe.go) where it returns one.
	probeEngine func(probePath) datapath.Engine
}

// Defaults for Config's zero values (see package settings for why each is what it is).
const (
	DefaultClientHeaderTimeout     = settings.DefaultClientHeaderTimeout
	DefaultConnectTimeout          = settings.DefaultConnectTimeout
	DefaultUpstreamResponseTimeout = settings.DefaultUpstreamResponseTimeout
	DefaultHTTPIdleTimeout         = settings.DefaultHTTPIdleTimeout
	DefaultMaxHeaderBytes          = settings.DefaultMaxHeaderBytes
	DefaultKernelHeldLimit         = settings.DefaultKernelHeldLimit
	DefaultHalfClosedTimeout       = settings.DefaultHalfClosedTimeout
	DefaultTCPHalfClosedTimeout    = settings.DefaultTCPHalfClosedTimeout
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
	accepting    []net.Listener // the sockets the listeners' servers accept on
	tcpListeners []net.Listener // of ServeTCP
	// listenerLimiters are the listeners' own limits by name (those with any), for adopted tunnels.
	listenerLimiters map[string]*limiter
	// autoListeners are the listeners prepared here, by name, each with whether auto's policy moves its
	// tunnels (listenerInfo.perTunnel), for tunnels adopted in an upgrade or resumed after a failed park.
	autoListeners map[string]bool
	// adoptedEarly are tunnels carried again on a listener not prepared yet, by its name: the policy takes
	// them when it is prepared on auto (trackCarried, listenerSetup).
	adoptedEarly map[string][]*Tunnel
	// waitingEarly says whether adoptedEarly may hold a tunnel, so that an ending tunnel looks there only
	// then (forgetWaiting).
	waitingEarly atomic.Bool
	// unread are the connections accepted whose first request head has not been read yet
	// (http.StateNew). Shutdown lets them send it before it stops the servers, which close such a
	// connection unanswered once they are shutting down.
	unreadMu sync.Mutex
	unread   map[net.Conn]struct{}
	kernel   *sockmap.Engine // nil unless the datapath is sockmap
	splicer  *spliceEngine
	copier   *copyEngine // event loops for plain tunnels, goroutines for TLS ones
	// kernelAdopted: kernel runs over the BPF objects of the relay this one replaced (Config.KernelObjects).
	kernelAdopted bool
	auto          *autoMover   // moves auto's tunnels between sockmap and the loops; nil unless auto loaded sockmap
	kernelShares  kernelShares // which other processes read the kernel engine's ring buffer (kernelhandoff.go)

	// drainHolds keep Shutdown from waiting for the live tunnels (and then closing them) until released:
	// see HoldDrain.
	drainHolds sync.WaitGroup
	// tcpOpening counts the tcp listeners' accept loops and the connections they accepted whose tunnel
	// is not open (or refused) yet: Shutdown waits for them, as http.Server.Shutdown does for handshakes.
	tcpOpening sync.WaitGroup
	// settled is closed by Shutdown once no tunnel can be added any more (see Settled).
	settled    chan struct{}
	settleOnce sync.Once
	// kernelSkipped is why auto stepped down from sockmap: the kernel datapath did not load.
	kernelSkipped error

	draining atomic.Bool
	limiter  *limiter // Config.Limits
	// evictedServers are servers whose tunnels CloseTunnelsTo closed (see evicted).
	evictMu        sync.Mutex
	evictedServers map[*upstream.Server]bool
	stop           chan struct{} // closed by Shutdown: ends the server's own goroutines
	stopOnce       sync.Once
}

// checkRanges checks cfg's bounded settings, with their defaults filled in, against package settings: the
// ranges the command line and the configuration file accept too. In Config a negative half-closed timeout
// is off (0 is the default), where the file and the flags write 0.
func (cfg *Config) checkRanges() error {
	for _, d := range []struct {
		name string
		v    time.Duration
		r    settings.Duration
	}{
		{"ClientHeaderTimeout", cfg.ClientHeaderTimeout, settings.Timeout},
		{"ConnectTimeout", cfg.ConnectTimeout, settings.Timeout},
		{"UpstreamResponseTimeout", cfg.UpstreamResponseTimeout, settings.Timeout},
		{"HTTPIdleTimeout", cfg.HTTPIdleTimeout, settings.Timeout},
		{"TunnelIdleTimeout", cfg.TunnelIdleTimeout, settings.TunnelTimeout},
		{"TunnelLifetime", cfg.TunnelLifetime, settings.TunnelTimeout},
		{"TunnelLogInterval", cfg.TunnelLogInterval, settings.TunnelTimeout},
		{"HalfClosedTimeout", max(cfg.HalfClosedTimeout, 0), settings.TunnelTimeout},
		{"TCPHalfClosedTimeout", max(cfg.TCPHalfClosedTimeout, 0), settings.TunnelTimeout},
	} {
		if err := d.r.Check(d.v); err != nil {
			if strings.Contains(d.name, "HalfClosed") {
				return fmt.Errorf("%s: %w (here a negative value is off, 0 the default)", d.name, err)
			}
			return fmt.Errorf("%s: %w", d.name, err)
		}
	}
	if err := settings.MaxHeaderBytes.Check(int64(cfg.MaxHeaderBytes)); err != nil {
		return fmt.Errorf("MaxHeaderBytes: %w", err)
	}
	if err := settings.KernelHeldLimit.Check(int64(cfg.KernelHeldLimit)); err != nil {
		return fmt.Errorf("KernelHeldLimit: %w", err)
	}
	if err := settings.EventLoops.Check(int64(cfg.EventLoops)); err != nil {
		return fmt.Errorf("EventLoops: %w", err)
	}
	return nil
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
	cfg.MaxHeaderBytes = orDefault(cfg.MaxHeaderBytes, DefaultMaxHeaderBytes)
	cfg.KernelHeldLimit = orDefault(cfg.KernelHeldLimit, DefaultKernelHeldLimit)
	cfg.HalfClosedTimeout = orDefault(cfg.HalfClosedTimeout, DefaultHalfClosedTimeout)
	cfg.TCPHalfClosedTimeout = orDefault(cfg.TCPHalfClosedTimeout, DefaultTCPHalfClosedTimeout)
	if err := cfg.checkRanges(); err != nil {
		return nil, err
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
		settled: make(chan struct{}),
		limiter: newLimiter(cfg.Limits),
	}
	s.SetRouter(router)
	s.copier = &copyEngine{log: cfg.Logger, start: cfg.startLoops,
		opts: eventloop.Options{Loops: copyLoops(cfg.EventLoops), NewPipe: cfg.newPipe}, loopsSet: cfg.EventLoops > 0}
	s.splicer = &spliceEngine{copy: s.copier}
	s.metrics = newMetrics(cfg.Registerer, s.tunnels, s.Router, s.kernelStats, s.copier.Stats)
	s.copier.metrics = s.metrics
	s.copier.probeFellBack = func(p *datapath.Pair, why string) bool { return s.auto.probeFellBack(p, why) }
	defer s.dropKernelObjects() // those the kernel engine did not adopt
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

// HoldDrain keeps Shutdown, once it has stopped accepting, from waiting for the live tunnels until
// release is called (or Shutdown's ctx is done). A process that adopts an upgrade's tunnels holds it until
// the old process is done sending them: tunnels still on the way then find a registry open, and a process
// that has none yet does not end its drain, and exit, before they come.
func (s *Server) HoldDrain() (release func()) {
	s.drainHolds.Add(1)
	return sync.OnceFunc(s.drainHolds.Done)
}

// Settled is closed once Shutdown has stopped accepting, the handshakes in progress have ended (opened
// their tunnel or failed) and every HoldDrain is released, or Shutdown's ctx is done: from then on no
// tunnel is added (but by Adopt, which a process that is itself upgraded calls no more once its holds
// are released), while the live ones drain. An upgrade's old process is done handing tunnels over then,
// not when its drain ends: those it keeps (TLS) need not hold up the new one.
func (s *Server) Settled() <-chan struct{} { return s.settled }

// awaitDrainHolds waits until every HoldDrain is released, or ctx is done.
func (s *Server) awaitDrainHolds(ctx context.Context) { awaitGroup(ctx, &s.drainHolds) }

// awaitGroup waits until wg's count is 0, or ctx is done.
func awaitGroup(ctx context.Context, wg *sync.WaitGroup) {
	released := make(chan struct{})
	go func() {
		wg.Wait()
		close(released)
	}()
	select {
	case <-released:
	case <-ctx.Done():
	}
}

// Shutdown stops accepting clients, lets handshakes in progress and live tunnels finish until ctx is done,
// then resets the tunnels that are left. It returns ctx's error if it had to close tunnels.
func (s *Server) Shutdown(ctx context.Context) error {
	s.listenersMu.Lock()
	s.draining.Store(true)
	listeners, tcpListeners, accepting := s.listeners, s.tcpListeners, s.accepting
	s.listenersMu.Unlock()
	for _, l := range tcpListeners {
		l.Close()
	}
	// Stop accepting first, then let the clients accepted just before send their request head: an HTTP
	// server that is shutting down closes a connection whose request it reads after that, unanswered
	// (net/http's conn.serve). Clients connecting through an upgrade's last moment in this process are
	// such clients.
	for _, l := range accepting {
		l.Close()
	}
	s.awaitRequestHeads(ctx, acceptedHeadGrace)
	// Every listener stops accepting at once; then each waits for its handshakes in progress. One after
	// the other, a listener would keep accepting while an earlier one waited.
	errs := make(chan error, len(listeners))
	for _, hs := range listeners {
		go func() {
			herr := hs.Shutdown(ctx)
			if errors.Is(herr, net.ErrClosed) {
				// The listener closed above, before Serve's accept loop saw it: http.Server closes it
				// again and says so. Not a failure of the drain.
				herr = nil
			}
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
	awaitGroup(ctx, &s.tcpOpening)
	s.awaitDrainHolds(ctx)
	s.settleOnce.Do(func() { close(s.settled) })
	if werr := s.tunnels.Wait(ctx); werr != nil {
		err = werr
		s.log.Warn("drain time over, closing tunnels", "tunnels", s.tunnels.Len())
	}
	s.tunnels.CloseAll()
	s.auto.close() // after CloseAll: no move still waits on a reader, or carries a pair onto a closed engine
	s.stopOnce.Do(func() { close(s.stop) })
	if s.kernel != nil {
		s.kernel.Close()
	}
	_ = s.copier.Close()
	return err
}

// acceptedHeadGrace bounds how long Shutdown waits for a connection accepted before it to send its
// request head; a client that sends nothing is closed after it, as net/http closes a silent one (5s).
const acceptedHeadGrace = time.Second

// trackUnread is the listeners' servers' ConnState hook: it keeps the connections in StateNew.
func (s *Server) trackUnread(c net.Conn, state http.ConnState) {
	s.unreadMu.Lock()
	defer s.unreadMu.Unlock()
	if state == http.StateNew {
		if s.unread == nil {
			s.unread = map[net.Conn]struct{}{}
		}
		s.unread[c] = struct{}{}
		return
	}
	delete(s.unread, c)
}

// awaitRequestHeads waits until no accepted connection is waiting for its request head to be read, for
// at most grace or until ctx is done.
func (s *Server) awaitRequestHeads(ctx context.Context, grace time.Duration) {
	deadline := time.Now().Add(grace)
	for {
		s.unreadMu.Lock()
		n := len(s.unread)
		s.unreadMu.Unlock()
		if n == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return
		}
		time.Sleep(time.Millisecond)
	}
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
			s.refuse(w, r, &refusal{status: http.StatusBadRequest, reason: FailBadPath, msg: msg})
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
