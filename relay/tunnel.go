package relay

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// Tunnel is one relayed WebSocket after its handshake: a client socket, an upstream socket, and the bytes
// moved between them. The Registry owns every live Tunnel, so that it can be listed, counted and closed.
type Tunnel struct {
	ID       uint64
	Client   *net.TCPConn
	Upstream *net.TCPConn
	// clientTLS and upstreamTLS, when set, are the TLS connections over Client and Upstream (a TLS
	// listener, a wss upstream): the tunnel's bytes are read from and written to them, on the copy
	// datapath, since without kernel TLS neither splice nor sockmap can carry them.
	clientTLS, upstreamTLS *tls.Conn
	Started                time.Time

	// ClientAddr and UpstreamAddr are the remote addresses, kept as strings so they survive Close.
	ClientAddr   string
	UpstreamAddr string
	// Pool names the upstream pool the tunnel's server was chosen from.
	Pool string
	// Listener names the listener the client came in on.
	Listener string
	// req is what the tunnel's log lines say about the request that opened it and its listener.
	req requestInfo

	// lease holds the tunnel's slot on its upstream server; tunnelEnded releases it.
	lease *upstream.Lease
	// releaseSlot gives back the tunnel's place under the limits; tunnelEnded calls it.
	releaseSlot func()

	// clientPrefix holds bytes the client sent after its request and net/http already read: they go to the
	// upstream before anything else. upstreamPrefix is the same for bytes that came with the 101.
	clientPrefix   []byte
	upstreamPrefix []byte

	// Bytes relayed by userspace, and for kernel tunnels, the kernel's final counts once folded in.
	toUpstream atomic.Uint64
	toClient   atomic.Uint64

	mu       sync.Mutex
	datapath Datapath
	ending   bool
	// release, set by the kernel datapath, takes the tunnel out of the BPF maps and the event loop; end
	// calls it once, before closing the sockets.
	release func()
	// live, set by the kernel datapath while the tunnel is in the maps, returns the kernel's counters
	// that are not yet in toUpstream and toClient.
	live func() (toUpstream, toClient uint64)
	// lastSkb, set by the kernel datapath while the tunnel is in the maps, returns when the BPF verdict last
	// saw a segment either way (zero before the first).
	lastSkb func() time.Time

	// pipes are a splice tunnel's pipes, client → upstream and upstream → client, made before the client
	// sees its 101 (reservePipes), so that running out of descriptors never fails a tunnel already
	// promised. Until the directions run (pipesInUse), end closes them; after, runDirections does once
	// both directions have returned.
	pipes      [2]*pipe
	pipesInUse bool // guarded by mu

	// halfClosedTimeout, when positive, ends the tunnel once one direction has carried its FIN and nothing
	// has moved either way for that long (enforceTunnelTimeouts); halfClosedAt is when the first FIN was
	// carried (UnixNano), 0 until then.
	halfClosedTimeout time.Duration
	halfClosedAt      atomic.Int64

	endOnce sync.Once
	ended   chan struct{}
	reason  string // why the tunnel ended; written once, before ended is closed
	err     error  // the failure that ended it, if one did; written with reason
	onEnd   func(*Tunnel)
}

// Reason names why a tunnel ended; it labels logs and sockrelay_tunnels_closed_total.
const (
	ReasonClosed        = "closed"         // both sides sent FIN
	ReasonClientReset   = "client_reset"   // the client reset its connection
	ReasonUpstreamReset = "upstream_reset" // the upstream reset its connection
	ReasonClientError   = "client_error"   // reading from or writing to the client failed
	ReasonUpstreamError = "upstream_error" // reading from or writing to the upstream failed
	ReasonShutdown      = "shutdown"       // the relay closed it when its drain time ran out
	ReasonStalled       = "stalled"        // kernel tunnel whose bytes stopped reaching the peer
	// ReasonUpstreamRemoved: a reload removed the tunnel's server from its pool, whose
	// close_tunnels_on_removal is set.
	ReasonUpstreamRemoved = "upstream_removed"
	// ReasonAdmin: an operator closed the tunnel through the admin API.
	ReasonAdmin = "admin"
	// ReasonOverflow: a kernel tunnel whose peers both stopped reading while both kept sending; the kernel
	// would otherwise hold their bytes without bound (relay/sockmap_backpressure.go).
	ReasonOverflow = "overflow"
	// ReasonKernelError: the kernel datapath could not keep a tunnel's stream exact (bpf/sockrelay.c,
	// trim_head), so the tunnel is reset rather than corrupted.
	ReasonKernelError = "kernel_error"
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
func (t *Tunnel) Datapath() Datapath {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.datapath
}

// Bytes counts bytes relayed so far each way, handshake excluded, live kernel counters included.
func (t *Tunnel) Bytes() (toUpstream, toClient uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	toUpstream, toClient = t.toUpstream.Load(), t.toClient.Load()
	if t.live != nil {
		up, down := t.live()
		toUpstream += up
		toClient += down
	}
	return toUpstream, toClient
}

// kernelLastActive is, for a tunnel the kernel datapath carries, when its verdict last saw a segment
// either way; false for other tunnels and before the first segment.
func (t *Tunnel) kernelLastActive() (time.Time, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lastSkb == nil {
		return time.Time{}, false
	}
	at := t.lastSkb()
	return at, !at.IsZero()
}

// markHalfClosed records that a direction has carried its FIN; only the first call counts.
func (t *Tunnel) markHalfClosed() {
	t.halfClosedAt.CompareAndSwap(0, time.Now().UnixNano())
}

// halfClosedSince is when the tunnel's first FIN was carried; false while neither direction has finished.
func (t *Tunnel) halfClosedSince() (time.Time, bool) {
	ns := t.halfClosedAt.Load()
	if ns == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, ns), true
}

// Done is closed when the tunnel has ended and both sockets are closed.
func (t *Tunnel) Done() <-chan struct{} { return t.ended }

// Reason says why the tunnel ended; it is empty until Done is closed.
func (t *Tunnel) Reason() string {
	select {
	case <-t.ended:
		return t.reason
	default:
		return ""
	}
}

// end closes both sockets and reports the tunnel's end once. With abort, both sockets are reset (SO_LINGER 0)
// rather than closed: an error in one direction means the stream is incomplete, and a peer must not mistake
// it for a clean end.
func (t *Tunnel) end(reason string, abort bool) { t.fail(reason, nil, abort) }

// fail is end with the error that ended the tunnel, which its close line says.
func (t *Tunnel) fail(reason string, err error, abort bool) {
	t.endOnce.Do(func() {
		t.mu.Lock()
		t.ending = true
		if t.release != nil {
			t.release()
			t.release, t.live, t.lastSkb = nil, nil, nil
		}
		if !t.pipesInUse {
			t.closePipes()
		}
		t.mu.Unlock()
		if abort {
			_ = t.Client.SetLinger(0)
			_ = t.Upstream.SetLinger(0)
		}
		_ = t.Client.Close()
		_ = t.Upstream.Close()
		t.reason, t.err = reason, err
		close(t.ended)
		if t.onEnd != nil {
			t.onEnd(t)
		}
	})
}

// Close ends the tunnel at once, resetting both sides. It is safe to call more than once.
func (t *Tunnel) Close() { t.end(ReasonShutdown, true) }

// direction is one way through a tunnel: bytes read from src are written to dst.
type direction struct {
	src, dst *net.TCPConn
	// srcTLS and dstTLS, when set, are what bytes are read from and written to instead of the sockets.
	srcTLS, dstTLS *tls.Conn
	// prefix points at the tunnel's own field, so bytes written once are never written again, even when a
	// tunnel that could not enter the kernel datapath falls back to a userspace one.
	prefix  *[]byte
	counter *atomic.Uint64
	// fromClient is true for client → upstream; it decides which side an error is blamed on.
	fromClient bool
	// pipe is the direction's splice pipe; nil on other datapaths.
	pipe *pipe
}

func (t *Tunnel) directions() [2]*direction {
	return [2]*direction{
		{src: t.Client, dst: t.Upstream, srcTLS: t.clientTLS, dstTLS: t.upstreamTLS, prefix: &t.clientPrefix,
			counter: &t.toUpstream, fromClient: true, pipe: t.pipes[0]},
		{src: t.Upstream, dst: t.Client, srcTLS: t.upstreamTLS, dstTLS: t.clientTLS, prefix: &t.upstreamPrefix,
			counter: &t.toClient, pipe: t.pipes[1]},
	}
}

// ioError says which socket an operation of a direction failed on.
type ioError struct {
	onSrc bool // the failing socket is the direction's source (a read), not its destination (a write)
	err   error
}

func (e *ioError) Error() string { return e.err.Error() }
func (e *ioError) Unwrap() error { return e.err }

func readErr(err error) error  { return &ioError{onSrc: true, err: err} }
func writeErr(err error) error { return &ioError{onSrc: false, err: err} }

// reasonFor names a direction's failure by the side whose socket failed.
func (d *direction) reasonFor(err error) string {
	var ioe *ioError
	client := d.fromClient // a failure on the source of client → upstream is the client's
	if errors.As(err, &ioe) && !ioe.onSrc {
		client = !client
	}
	switch {
	case client && isReset(err):
		return ReasonClientReset
	case client:
		return ReasonClientError
	case isReset(err):
		return ReasonUpstreamReset
	default:
		return ReasonUpstreamError
	}
}

// reader is what the direction reads bytes from: the source socket, or its TLS connection.
func (d *direction) reader() io.Reader {
	if d.srcTLS != nil {
		return d.srcTLS
	}
	return d.src
}

// writer is what the direction writes bytes to: the destination socket, or its TLS connection.
func (d *direction) writer() io.Writer {
	if d.dstTLS != nil {
		return d.dstTLS
	}
	return d.dst
}

// writePrefix sends the bytes userspace already holds for dst, before any byte the datapath moves.
func (d *direction) writePrefix() error {
	p := *d.prefix
	if len(p) == 0 {
		return nil
	}
	*d.prefix = nil
	n, err := d.writer().Write(p)
	d.counter.Add(uint64(n))
	if err != nil {
		return writeErr(err)
	}
	return nil
}

// finish carries the source's FIN to the destination, after every byte before it has been written.
func (d *direction) finish() error {
	if d.dstTLS != nil {
		// close_notify first, so that the peer can tell the end from a truncation; then the FIN.
		if err := d.dstTLS.CloseWrite(); err != nil {
			return writeErr(fmt.Errorf("TLS close_notify: %w", err))
		}
	}
	if err := d.dst.CloseWrite(); err != nil {
		return writeErr(fmt.Errorf("shutdown write: %w", err))
	}
	return nil
}

// runDirections runs pump for both directions of t, each in its own goroutine, and ends the tunnel when both
// have carried their FIN or either has failed. The goroutines run named functions (pumpDirection,
// awaitDirections) so that a stack dump of many tunnels says what each goroutine is.
func runDirections(t *Tunnel, pump func(*direction) error) {
	dirs := t.directions()
	var wg sync.WaitGroup
	wg.Add(len(dirs))
	for _, d := range dirs {
		go pumpDirection(t, d, pump, &wg)
	}
	go awaitDirections(t, &wg)
}

// pumpDirection carries one direction of t: the bytes userspace holds for it, then pump until the
// source's EOF, then the FIN.
func pumpDirection(t *Tunnel, d *direction, pump func(*direction) error, wg *sync.WaitGroup) {
	defer wg.Done()
	err := d.writePrefix()
	if err == nil {
		err = pump(d)
	}
	if err == nil {
		err = d.finish()
	}
	if err == nil {
		t.markHalfClosed()
	}
	if err != nil {
		// The first failure ends the tunnel; the other direction then fails on the closed socket, and
		// its error is ignored because end runs once.
		t.fail(d.reasonFor(err), err, true)
	}
}

// awaitDirections ends t cleanly once both of its directions have returned.
func awaitDirections(t *Tunnel, wg *sync.WaitGroup) {
	wg.Wait()
	t.mu.Lock()
	t.closePipes() // no direction uses them any more
	t.mu.Unlock()
	t.end(ReasonClosed, false)
}

// usePipes hands the tunnel's splice pipes to its directions; false when the tunnel has already ended
// (and end closed them).
func (t *Tunnel) usePipes() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ending {
		return false
	}
	t.pipesInUse = true
	return true
}

// closePipes closes the tunnel's splice pipes, if any. The caller holds t.mu.
func (t *Tunnel) closePipes() {
	for _, p := range t.pipes {
		if p != nil {
			p.Close()
		}
	}
}
