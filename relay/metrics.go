package relay

import (
	"context"
	"net/http"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/upstream"
)

// Metrics are the relay's Prometheus metrics. Each Server registers its own on the registerer it is given,
// so that tests and several servers in one process do not share counters.
//
// The counters by listener and pool start at 0 for every listener served and every pool of the Router in
// force (see knowListener), so that an alert on a rate sees 0, not "no data", before the first event.
// Listener and pool names come from the configuration, which keeps the number of series bounded.
type Metrics struct {
	tunnelsOpened     *prometheus.CounterVec // by listener, pool, datapath; count with tunnelOpened
	tunnelsActive     *prometheus.GaugeVec
	tunnelsEnded      *prometheus.CounterVec // by listener, pool, reason; count with tunnelEnded
	handshakeFailures *prometheus.CounterVec // by listener, pool, reason; count with handshakeFailed
	handshakeDuration prometheus.Histogram
	httpRequests      *prometheus.CounterVec
	datapathFallbacks *prometheus.CounterVec
	kernelDemotions   prometheus.CounterFunc
	kernelResumes     prometheus.CounterFunc
	kernelRepeatsCut  prometheus.CounterFunc
	upstreamRetries   prometheus.Counter
	// tunnelMoves, tunnelMoveFailures and tunnelMovesDeferred count auto's moves of live tunnels (automove.go).
	tunnelMoves, tunnelMoveFailures, tunnelMovesDeferred *prometheus.CounterVec

	mu        sync.Mutex
	listeners map[string]Datapath // served so far, by name: their series start at 0 for each new pool
}

// Handshake failure reasons, the values of sockrelay_handshakes_failed_total{reason}.
const (
	FailBadRequest          = "bad_request"          // the client's upgrade request broke RFC 6455
	FailBadVersion          = "bad_version"          // Sec-WebSocket-Version was not 13
	FailUpstreamUnreachable = "upstream_unreachable" // connecting to the upstream failed or timed out
	FailUpstreamTimeout     = "upstream_timeout"     // the upstream did not answer within the handshake timeout
	FailUpstreamError       = "upstream_error"       // the upstream closed or sent something that is not HTTP
	FailUpstreamRefused     = "upstream_refused"     // the upstream answered with a status other than 101
	FailUpstreamBadSwitch   = "upstream_bad_switch"  // a 101 that is not a valid WebSocket accept
	FailClientGone          = "client_gone"          // the client connection could not be taken over or failed
	FailShuttingDown        = "shutting_down"        // the handshake finished after the relay closed its tunnels
	FailNoRoute             = "no_route"             // no route of the listener matches the request's host and path
	FailNoUpstream          = "no_upstream"          // every server of the route's pool is down, draining or full
	FailOrigin              = "origin"               // the Origin header is not in the route's allow-list
	FailUpstreamRemoved     = "upstream_removed"     // a reload removed the chosen server, closing its tunnels, during the handshake
	FailBadPath             = "bad_path"             // the path has . or .. segments
	FailProxyProtocol       = "proxy_protocol"       // a PROXY protocol listener's connection had no valid header
	FailUpstreamTLS         = "upstream_tls"         // the TLS handshake with a wss upstream failed
	FailLocalResources      = "local_resources"      // the relay ran out of descriptors, memory or ports connecting to an upstream
)

// The reasons a handshake fails for, whose counters start at 0: those before a route chose a pool (counted
// with pool ""), and those after. A new reason belongs in one of them.
var (
	unroutedFailReasons = []string{FailBadRequest, FailBadVersion, FailBadPath, FailNoRoute, FailProxyProtocol,
		FailLimitTunnels, FailLimitTunnelsPerIP, FailLimitRate, FailLimitHandshakes}
	routedFailReasons = []string{FailUpstreamUnreachable, FailUpstreamTimeout, FailUpstreamError, FailUpstreamRefused,
		FailUpstreamBadSwitch, FailClientGone, FailShuttingDown, FailNoUpstream, FailOrigin, FailUpstreamRemoved,
		FailUpstreamTLS, FailLocalResources}
)

// tunnelEndReasons are every reason a tunnel ends for (see Tunnel.Reason), whose counters start at 0.
var tunnelEndReasons = []string{ReasonClosed, ReasonClientReset, ReasonUpstreamReset, ReasonClientError,
	ReasonUpstreamError, ReasonShutdown, ReasonStalled, ReasonUpstreamRemoved, ReasonAdmin, ReasonOverflow,
	ReasonKernelError, ReasonIdleTimeout, ReasonLifetime, ReasonHalfClosed}

// fallbackReasons are the values of sockrelay_datapath_fallbacks_total{reason}: the kernel datapath could
// not be used at start (sockmap_*) or a tunnel could not enter it (the others, see sockmap.Engine.Carry). A
// tunnel with TLS on a side runs on copy by design and is not one of them.
//
// A plain copy or splice tunnel runs on copy goroutines instead of the event loops when the loops cannot start
// (eventloop_start_failed: out of descriptors for epoll_create, most often) or cannot take its sockets
// (eventloop_carry_failed: no descriptor left to duplicate them with, or no room in its epoll set); see
// copyEngine and spliceEngine. (A splice tunnel's direction that cannot have a pipe copies through a buffer on
// its loop, counted in sockrelay_eventloop_pipe_failures_total: not a fallback.)
var fallbackReasons = []string{"sockmap_unavailable", "sockmap_selftest_failed", "insert_failed",
	"socket_closing", "busy_at_handoff", "no_descriptor", "slow_reader", fallbackLoopStart, fallbackLoopCarry}

// The fallback reasons of the copy datapath's event loops.
const (
	fallbackLoopStart = "eventloop_start_failed"
	fallbackLoopCarry = "eventloop_carry_failed"
)

// newMetrics registers the relay's metrics. kernel returns the kernel engine's counts, which the
// sockrelay_kernel_* counters read at scrape time; loops the copy datapath's event loops' counters, which
// the sockrelay_eventloop_* metrics read at scrape time.
func newMetrics(reg prometheus.Registerer, tunnels *Registry, router func() Router, kernel func() sockmap.Stats,
	loops func() datapath.EventLoopStats) *Metrics {
	m := &Metrics{
		tunnelsOpened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_tunnels_total",
			Help: "Tunnels established, by listener, pool and datapath (copy for tunnels with TLS on a side).",
		}, []string{"listener", "pool", "datapath"}),
		tunnelsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sockrelay_tunnels_active",
			Help: "Tunnels open now, by datapath.",
		}, []string{"datapath"}),
		tunnelsEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_tunnels_closed_total",
			Help: "Tunnels ended, by listener, pool and why they ended.",
		}, []string{"listener", "pool", "reason"}),
		handshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_handshakes_failed_total",
			Help: `WebSocket handshakes (and tcp listener connections) that did not open a tunnel, by listener, pool and reason; pool is "" when the relay failed them before choosing one.`,
		}, []string{"listener", "pool", "reason"}),
		handshakeDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sockrelay_handshake_duration_seconds",
			Help:    "Time from a client's upgrade request to its tunnel being open, successful handshakes only.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18), // 100 µs to ~13 s
		}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_http_requests_total",
			Help: "Plain (not upgrade) HTTP requests reverse-proxied, by response status (502/504 when the upstream failed).",
		}, []string{"code"}),
		datapathFallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_datapath_fallbacks_total",
			Help: "Times the kernel datapath could not be used and a userspace one was, by reason (TLS tunnels run on copy by design and are not counted here).",
		}, []string{"reason"}),
		kernelDemotions: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "sockrelay_kernel_demotions_total",
			Help: "Times a kernel tunnel direction held its limit of bytes for a slow reader and was relayed by userspace until it could resume.",
		}, func() float64 { return float64(kernel().Demotions) }),
		kernelRepeatsCut: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "sockrelay_kernel_repeats_cut_total",
			Help: "Skbs whose head repeated bytes already delivered, which the kernel datapath cut off (counted when their tunnel ends).",
		}, func() float64 { return float64(kernel().RepeatsCut) }),
		upstreamRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockrelay_upstream_retries_total",
			Help: "Handshakes sent to another server after one failed to connect or to answer (before any byte reached the client).",
		}),
		kernelResumes: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "sockrelay_kernel_resumes_total",
			Help: "Times a demoted kernel tunnel direction went back to being redirected in the kernel.",
		}, func() float64 { return float64(kernel().Resumes) }),
		listeners: map[string]Datapath{},
	}
	for _, d := range []Datapath{DatapathSockmap, DatapathSplice, DatapathCopy} {
		m.tunnelsActive.WithLabelValues(string(d))
	}
	for _, reason := range fallbackReasons {
		m.datapathFallbacks.WithLabelValues(reason)
	}
	m.tunnelMoves, m.tunnelMoveFailures, m.tunnelMovesDeferred = moveMetrics()
	reg.MustRegister(m.tunnelMoves, m.tunnelMoveFailures, m.tunnelMovesDeferred)
	reg.MustRegister(m.kernelDemotions, m.kernelResumes, m.kernelRepeatsCut, m.datapathFallbacks, m.tunnelsOpened, m.tunnelsActive, m.tunnelsEnded, m.handshakeFailures,
		m.handshakeDuration, m.httpRequests, m.upstreamRetries, &bytesCollector{tunnels: tunnels},
		&upstreamCollector{router: router}, &loopCollector{stats: loops})
	return m
}

// knowListener starts the listener's counters at 0 for no pool (handshakes failed before a route was
// chosen) and for each of pools; dp is the listener's datapath, on which its tunnels run, or on copy.
func (m *Metrics) knowListener(listener string, dp Datapath, pools []*upstream.Pool) {
	m.mu.Lock()
	m.listeners[listener] = dp
	m.mu.Unlock()
	m.initSeries(listener, dp, "")
	for _, p := range pools {
		m.initSeries(listener, dp, p.Name())
	}
}

// knowPools starts every known listener's counters at 0 for each of pools (after a reload added some).
func (m *Metrics) knowPools(pools []*upstream.Pool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for listener, dp := range m.listeners {
		for _, p := range pools {
			m.initSeries(listener, dp, p.Name())
		}
	}
}

func (m *Metrics) initSeries(listener string, dp Datapath, pool string) {
	if pool == "" {
		for _, reason := range unroutedFailReasons {
			m.handshakeFailures.WithLabelValues(listener, pool, reason)
		}
		return // tunnels always have a pool
	}
	for _, reason := range routedFailReasons {
		m.handshakeFailures.WithLabelValues(listener, pool, reason)
	}
	for _, d := range []Datapath{dp, DatapathCopy} {
		m.tunnelsOpened.WithLabelValues(listener, pool, string(d))
	}
	for _, reason := range tunnelEndReasons {
		m.tunnelsEnded.WithLabelValues(listener, pool, reason)
	}
}

// handshakeFailed counts a handshake (or tcp connection) on listener that opened no tunnel; pool is ""
// when none was chosen.
func (m *Metrics) handshakeFailed(listener, pool, reason string) {
	m.handshakeFailures.WithLabelValues(listener, pool, reason).Inc()
}

// tunnelOpened counts a tunnel that was registered.
func (m *Metrics) tunnelOpened(t *Tunnel) {
	m.tunnelsOpened.WithLabelValues(t.Listener, t.Pool, string(t.Datapath())).Inc()
	m.tunnelsActive.WithLabelValues(string(t.Datapath())).Inc()
}

// tunnelEnded counts a tunnel that ended, on dp, the datapath it ran on last.
func (m *Metrics) tunnelEnded(t *Tunnel, dp Datapath) {
	m.tunnelsActive.WithLabelValues(string(dp)).Dec()
	m.tunnelsEnded.WithLabelValues(t.Listener, t.Pool, t.Reason()).Inc()
}

// bytesCollector reports bytes relayed from the tunnel registry at scrape time, so that live tunnels count
// without any metric update on the data path.
type bytesCollector struct{ tunnels *Registry }

var bytesDesc = prometheus.NewDesc("sockrelay_bytes_relayed_total",
	"Bytes relayed through tunnels after the handshake, by direction.", []string{"direction"}, nil)

func (c *bytesCollector) Describe(ch chan<- *prometheus.Desc) { ch <- bytesDesc }

func (c *bytesCollector) Collect(ch chan<- prometheus.Metric) {
	up, down := c.tunnels.BytesRelayed()
	ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(up), "client_to_upstream")
	ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(down), "upstream_to_client")
}

// loopCollector reports the copy datapath's event loops (which carry splice tunnels too) at scrape time: how
// many run, and per loop the tunnels it carries, the bytes of buffer and of pipe it holds for bytes in flight,
// the readiness events it handled, and the pipes it could not make.
// Every loop the engine will start has its series at 0 before it runs.
type loopCollector struct {
	stats func() datapath.EventLoopStats
}

var (
	loopsDesc = prometheus.NewDesc("sockrelay_eventloop_loops",
		"Event loops of the copy datapath running now (0 until the first plain copy tunnel, or at start with --datapath copy).", nil, nil)
	loopTunnelsDesc = prometheus.NewDesc("sockrelay_eventloop_tunnels",
		"Tunnels each event loop of the copy datapath carries now.", []string{"loop"}, nil)
	loopBufferDesc = prometheus.NewDesc("sockrelay_eventloop_buffer_bytes",
		"Bytes of buffer each event loop holds now for bytes its destinations have not taken (buffers lent × buffer size); an idle tunnel holds none.", []string{"loop"}, nil)
	loopEventsDesc = prometheus.NewDesc("sockrelay_eventloop_events_total",
		"Readiness events each event loop of the copy datapath has handled.", []string{"loop"}, nil)
	loopPipeDesc = prometheus.NewDesc("sockrelay_eventloop_pipe_bytes",
		"Bytes of pipe each event loop lends now to splice tunnels for bytes their destinations have not taken (pipes lent × pipe size); an idle tunnel holds none.", []string{"loop"}, nil)
	loopPipeFailuresDesc = prometheus.NewDesc("sockrelay_eventloop_pipe_failures_total",
		"Pipes a splice tunnel's direction could not have (out of descriptors, or the user's pipe allowance spent); each time, the bytes went through a buffer instead.", []string{"loop"}, nil)
)

func (c *loopCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- loopsDesc
	ch <- loopTunnelsDesc
	ch <- loopBufferDesc
	ch <- loopEventsDesc
	ch <- loopPipeDesc
	ch <- loopPipeFailuresDesc
}

func (c *loopCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	running := 0
	if st.BufSize > 0 { // BufSize is 0 until the loops run
		running = len(st.Loops)
	}
	ch <- prometheus.MustNewConstMetric(loopsDesc, prometheus.GaugeValue, float64(running))
	for i, l := range st.Loops {
		loop := strconv.Itoa(i)
		ch <- prometheus.MustNewConstMetric(loopTunnelsDesc, prometheus.GaugeValue, float64(l.Tunnels), loop)
		ch <- prometheus.MustNewConstMetric(loopBufferDesc, prometheus.GaugeValue, float64(l.BuffersInUse)*float64(st.BufSize), loop)
		ch <- prometheus.MustNewConstMetric(loopEventsDesc, prometheus.CounterValue, float64(l.Events), loop)
		ch <- prometheus.MustNewConstMetric(loopPipeDesc, prometheus.GaugeValue, float64(l.PipesInUse)*float64(st.PipeSize), loop)
		ch <- prometheus.MustNewConstMetric(loopPipeFailuresDesc, prometheus.CounterValue, float64(l.PipeFailures), loop)
	}
}

// upstreamCollector reports each upstream server's live tunnels and state from the pools at scrape time.
// Each server has the same series whatever its state, so that a state change is a value change, not a
// series that disappears.
type upstreamCollector struct{ router func() Router }

// upstreamStates are the values of sockrelay_upstream_state{state}.
var upstreamStates = []upstream.State{upstream.StateUp, upstream.StateDown, upstream.StateDraining, upstream.StateForcedDown}

const (
	upstreamUpHelp      = "1 when the upstream server takes new tunnels, 0 when it is down, forced down or draining. In a pool without an active health check (sockrelay_upstream_health_checked 0) the state is passive only: a dead server shows 1 until handshakes to it fail."
	upstreamStateHelp   = "1 for the upstream server's state (up, down, draining, forced_down), 0 for the others."
	upstreamCheckedHelp = "1 when the pool has an active health check, 0 when its servers' state comes from handshake failures only."
)

var (
	upstreamTunnelsDesc = prometheus.NewDesc("sockrelay_upstream_tunnels",
		"Live tunnels (and plain requests in flight) per upstream server.", []string{"pool", "server"}, nil)
	upstreamUpDesc      = prometheus.NewDesc("sockrelay_upstream_up", upstreamUpHelp, []string{"pool", "server"}, nil)
	upstreamStateDesc   = prometheus.NewDesc("sockrelay_upstream_state", upstreamStateHelp, []string{"pool", "server", "state"}, nil)
	upstreamCheckedDesc = prometheus.NewDesc("sockrelay_upstream_health_checked", upstreamCheckedHelp, []string{"pool"}, nil)
)

func (c *upstreamCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- upstreamTunnelsDesc
	ch <- upstreamUpDesc
	ch <- upstreamStateDesc
	ch <- upstreamCheckedDesc
}

func (c *upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.router().Pools() {
		snap := p.Snapshot()
		ch <- prometheus.MustNewConstMetric(upstreamCheckedDesc, prometheus.GaugeValue, oneIf(snap.Checked), snap.Name)
		for _, srv := range snap.Servers {
			ch <- prometheus.MustNewConstMetric(upstreamTunnelsDesc, prometheus.GaugeValue, float64(srv.LiveTunnels), snap.Name, srv.Address)
			ch <- prometheus.MustNewConstMetric(upstreamUpDesc, prometheus.GaugeValue, oneIf(srv.State == upstream.StateUp), snap.Name, srv.Address)
			for _, state := range upstreamStates {
				ch <- prometheus.MustNewConstMetric(upstreamStateDesc, prometheus.GaugeValue, oneIf(srv.State == state),
					snap.Name, srv.Address, string(state))
			}
		}
	}
}

func oneIf(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// poolKey carries the name of the pool a handshake's route chose, for the counters of its failures.
type poolKey struct{}

// withPool is r once its route has chosen pool.
func withPool(r *http.Request, pool *upstream.Pool) *http.Request {
	return r.WithContext(context.WithValue(r.Context(), poolKey{}, pool.Name()))
}

// handshakeFailed counts a failed handshake of r on its listener and, once chosen, pool.
func (s *Server) handshakeFailed(r *http.Request, reason string) {
	pool, _ := r.Context().Value(poolKey{}).(string)
	s.metrics.handshakeFailed(s.listenerOf(r).name, pool, reason)
}
