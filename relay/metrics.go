package relay

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockrelay/sockrelay/upstream"
)

// Metrics are the relay's Prometheus metrics. Each Server registers its own on the registerer it is given,
// so that tests and several servers in one process do not share counters.
type Metrics struct {
	tunnelsTotal      *prometheus.CounterVec
	tunnelsActive     *prometheus.GaugeVec
	tunnelsClosed     *prometheus.CounterVec
	handshakesFailed  *prometheus.CounterVec
	handshakeDuration prometheus.Histogram
	httpRequests      *prometheus.CounterVec
	datapathFallbacks *prometheus.CounterVec
	kernelDemotions   prometheus.Counter
	kernelResumes     prometheus.Counter
	kernelRepeatsCut  prometheus.Counter
	upstreamRetries   prometheus.Counter
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

func newMetrics(reg prometheus.Registerer, tunnels *Registry, router func() Router) *Metrics {
	m := &Metrics{
		tunnelsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_tunnels_total",
			Help: "Tunnels established, by datapath.",
		}, []string{"datapath"}),
		tunnelsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sockrelay_tunnels_active",
			Help: "Tunnels open now, by datapath.",
		}, []string{"datapath"}),
		tunnelsClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_tunnels_closed_total",
			Help: "Tunnels ended, by why they ended.",
		}, []string{"reason"}),
		handshakesFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sockrelay_handshakes_failed_total",
			Help: "WebSocket handshakes that did not open a tunnel, by reason.",
		}, []string{"reason"}),
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
			Help: "Times the kernel datapath could not be used and a userspace one was, by reason.",
		}, []string{"reason"}),
		kernelDemotions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockrelay_kernel_demotions_total",
			Help: "Times a kernel tunnel direction held its limit of bytes for a slow reader and was relayed by userspace until it could resume.",
		}),
		kernelRepeatsCut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockrelay_kernel_repeats_cut_total",
			Help: "Skbs whose head repeated bytes already delivered, which the kernel datapath cut off (counted when their tunnel ends).",
		}),
		upstreamRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockrelay_upstream_retries_total",
			Help: "Handshakes sent to another server after one failed to connect or to answer (before any byte reached the client).",
		}),
		kernelResumes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sockrelay_kernel_resumes_total",
			Help: "Times a demoted kernel tunnel direction went back to being redirected in the kernel.",
		}),
	}
	reg.MustRegister(m.kernelDemotions, m.kernelResumes, m.kernelRepeatsCut, m.datapathFallbacks, m.tunnelsTotal, m.tunnelsActive, m.tunnelsClosed, m.handshakesFailed,
		m.handshakeDuration, m.httpRequests, m.upstreamRetries, &bytesCollector{tunnels: tunnels},
		&upstreamCollector{router: router})
	return m
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

// upstreamCollector reports each upstream server's live tunnels and state from the pools at scrape time.
type upstreamCollector struct{ router func() Router }

var (
	upstreamTunnelsDesc = prometheus.NewDesc("sockrelay_upstream_tunnels",
		"Live tunnels (and plain requests in flight) per upstream server.", []string{"pool", "server"}, nil)
	upstreamUpDesc = prometheus.NewDesc("sockrelay_upstream_up",
		"1 when the upstream server takes new tunnels, 0 when it is down, forced down or draining.", []string{"pool", "server", "state"}, nil)
)

func (c *upstreamCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- upstreamTunnelsDesc
	ch <- upstreamUpDesc
}

func (c *upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.router().Pools() {
		snap := p.Snapshot()
		for _, srv := range snap.Servers {
			ch <- prometheus.MustNewConstMetric(upstreamTunnelsDesc, prometheus.GaugeValue, float64(srv.LiveTunnels), snap.Name, srv.Address)
			up := 0.0
			if srv.State == upstream.StateUp {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(upstreamUpDesc, prometheus.GaugeValue, up, snap.Name, srv.Address, string(srv.State))
		}
	}
}
