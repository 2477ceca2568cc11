package relay

import (
	"sync/atomic"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/upstream"
)

// Tunnel is one relayed WebSocket (or TCP connection) after its handshake: what the front knows of it
// (identity, addresses, pool, its lease and limits slot) and the datapath.Pair that an engine carries.
// The Registry owns every live Tunnel, so that it can be listed, counted and closed.
type Tunnel struct {
	ID      uint64
	Started time.Time

	// ClientAddr and UpstreamAddr are the remote addresses, kept as strings so they survive Close.
	ClientAddr   string
	UpstreamAddr string
	// Pool names the upstream pool the tunnel's server was chosen from.
	Pool string
	// Listener names the listener the client came in on.
	Listener string
	// req is what the tunnel's log lines say about the request that opened it.
	req requestInfo

	// lease holds the tunnel's slot on its upstream server; tunnelEnded releases it.
	lease *upstream.Lease
	// releaseSlot gives back the tunnel's place under the limits; tunnelEnded calls it.
	releaseSlot func()
	// clientIP is the client address the limits count the tunnel under (behind a trusted proxy, the one
	// it vouches for); an upgrade hands it over with the tunnel.
	clientIP string

	// halfClosedTimeout, when positive, ends the tunnel once one direction has carried its FIN and nothing
	// has moved either way for that long (enforceTunnelTimeouts).
	halfClosedTimeout time.Duration

	// pair is the two sockets and the bytes between them; its end is the tunnel's.
	pair *datapath.Pair

	// parked: no engine carries the tunnel while an upgrade hands it over (Server.Park, Server.Adopt);
	// the timeouts leave it alone meanwhile.
	parked atomic.Bool
	// moves is how many moves auto's policy made of the tunnel in this process, for /debug/tunnels: kept
	// here, in parked's padding, since the sampler forgets a tunnel it can no longer move.
	moves atomic.Uint32
	// adopted is what only a tunnel adopted in an upgrade keeps; nil for this process's own tunnels, which
	// are then 32 bytes smaller for their whole life.
	adopted *adoption
}

// adoption is what a tunnel another process handed over keeps besides what every tunnel keeps.
type adoption struct {
	// activeAt is when a byte last moved before this process adopted the tunnel.
	activeAt time.Time
	// kernel is the kernel engine's state of an adopted kernel tunnel, until CarryAdopted.
	kernel *sockmap.TunnelState
}

// activeAt is when a byte last moved before this process adopted the tunnel; zero if it did not.
func (t *Tunnel) activeAt() time.Time {
	if t.adopted == nil {
		return time.Time{}
	}
	return t.adopted.activeAt
}

// Reason names why a tunnel ended; it labels logs and sockrelay_tunnels_closed_total.
const (
	ReasonClosed        = datapath.ReasonClosed        // both sides sent FIN
	ReasonClientReset   = datapath.ReasonClientReset   // the client reset its connection
	ReasonUpstreamReset = datapath.ReasonUpstreamReset // the upstream reset its connection
	ReasonClientError   = datapath.ReasonClientError   // reading from or writing to the client failed
	ReasonUpstreamError = datapath.ReasonUpstreamError // reading from or writing to the upstream failed
	ReasonShutdown      = "shutdown"                   // the relay closed it when its drain time ran out
	ReasonStalled       = datapath.ReasonStalled       // kernel tunnel whose bytes stopped reaching the peer
	// ReasonUpstreamRemoved: a reload removed the tunnel's server from its pool, whose
	// close_tunnels_on_removal is set.
	ReasonUpstreamRemoved = "upstream_removed"
	// ReasonAdmin: an operator closed the tunnel through the admin API.
	ReasonAdmin = "admin"
	// ReasonOverflow: a kernel tunnel whose peers both stopped reading while both kept sending.
	ReasonOverflow = datapath.ReasonOverflow
	// ReasonKernelError: the kernel datapath could not keep a tunnel's stream exact.
	ReasonKernelError = datapath.ReasonKernelError
	// ReasonIdleTimeout: no byte either way for the tunnel idle timeout; both sides are closed with FIN.
	ReasonIdleTimeout = "idle_timeout"
	// ReasonLifetime: the tunnel reached the maximum tunnel lifetime; both sides are reset, since bytes
	// may have been in flight and a peer must not take the cut for a clean end.
	ReasonLifetime = "lifetime"
	// ReasonHalfClosed: one side sent its FIN and the other did not finish within the half-close timeout;
	// both sides are closed (reset if bytes are still unsent), as HAProxy's client-fin and server-fin do.
	ReasonHalfClosed = "half_closed"
)

// Datapath is the datapath carrying the tunnel.
func (t *Tunnel) Datapath() Datapath { return t.pair.Kind() }

// Bytes counts bytes relayed so far each way, handshake excluded, live kernel counters included.
func (t *Tunnel) Bytes() (toUpstream, toClient uint64) { return t.pair.Bytes() }

// Done is closed when the tunnel has ended and both sockets are closed.
func (t *Tunnel) Done() <-chan struct{} { return t.pair.Done() }

// Reason says why the tunnel ended; it is empty until Done is closed.
func (t *Tunnel) Reason() string { return t.pair.Reason() }

// end closes both sockets and reports the tunnel's end once; with abort, both sockets are reset.
func (t *Tunnel) end(reason string, abort bool) { t.pair.End(reason, abort) }

// fail is end with the error that ended the tunnel, which its close line says.
func (t *Tunnel) fail(reason string, err error, abort bool) { t.pair.Fail(reason, err, abort) }

// Close ends the tunnel at once, resetting both sides. It is safe to call more than once.
func (t *Tunnel) Close() { t.end(ReasonShutdown, true) }
