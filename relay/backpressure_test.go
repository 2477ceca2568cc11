package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sockrelay/sockrelay/internal/streamtest"
)

// heldBound is the most a stopped reader may leave in flight between the upstream's writes and the
// client's reads, on every datapath: the socket buffers on the path (autotuned up to 4 MiB to send and
// 6 MiB to receive on each of the four sockets) plus, on the kernel path, its held limit. A relay without
// backpressure lets the sender push gigabytes in the same time (docs/datapath.md, "Backpressure").
const heldBound = 48 << 20

// countingStreamWriter writes src to c in 64 KiB chunks until it ends or a write fails, counting what
// the kernel accepted, then half-closes c.
func countingStreamWriter(c *net.TCPConn, src io.Reader, sent *atomic.Int64, done chan<- error) {
	if err := writeStream(c, src, sent); err != nil {
		done <- err
		return
	}
	done <- c.CloseWrite()
}

// readerPattern is how the client reads: pauses of off after each on of reading, or one pause of off at
// the start when on is zero.
type readerPattern struct {
	name    string
	on, off time.Duration
}

// TestBackpressureSlowReader streams from the upstream to a client that stops reading (or stutters). What
// the upstream gets to send beyond what the client read must stay bounded, the stream must arrive byte-exact
// when the client reads again, and the FIN, sent while the reader is stopped, must come after every byte.
func TestBackpressureSlowReader(t *testing.T) {
	patterns := []readerPattern{
		{name: "stops-2s", off: 2 * time.Second},
		{name: "stutters-20ms", on: 20 * time.Millisecond, off: 20 * time.Millisecond},
	}
	for _, dp := range testDatapaths {
		for _, p := range patterns {
			t.Run(string(dp)+"/"+p.name, func(t *testing.T) {
				up := startUpstream(t)
				r := startRelay(t, dp, []string{up.Addr})
				c, u := openTunnel(t, r.Addr, up, nil, nil)
				if dp == DatapathSockmap {
					// In the kernel before the stream starts: a source already pouring bytes at the
					// handoff is left on copy (busy_at_handoff), and this test is about the kernel's
					// backpressure (seen under -race: no demotion, the tunnel was on copy).
					waitInKernel(t, r)
				}
				size := int64(512 << 20)
				if p.on > 0 {
					size = 128 << 20
				}
				var sent atomic.Int64
				wrote := make(chan error, 1)
				go countingStreamWriter(u.TCPConn, streamReader(7, size), &sent, wrote)

				got := newStreamCheck(7, size) // what the client read, checked as it comes
				buf := make([]byte, 256<<10)
				var maxHeld int64
				phaseEnd := time.Now().Add(p.off)
				reading := p.on == 0 // a stopped reader sleeps first, then reads; a stutterer reads first
				if !reading {
					phaseEnd = time.Now().Add(p.on)
				}
				if p.on == 0 {
					time.Sleep(p.off)
					maxHeld = sent.Load()
					reading = true
					phaseEnd = time.Now().Add(time.Hour)
				}
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
				for {
					if !reading {
						time.Sleep(p.off)
						maxHeld = max(maxHeld, sent.Load()-got.Len())
						reading, phaseEnd = true, time.Now().Add(p.on)
					}
					n, err := c.R.Read(buf)
					got.Write(buf[:n])
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						t.Fatalf("client read %d of %d bytes, then: %v", got.Len(), size, err)
					}
					if p.on > 0 && time.Now().After(phaseEnd) {
						reading = false
					}
				}
				if err := <-wrote; err != nil {
					t.Fatalf("upstream write: %v", err)
				}
				if d := got.Diff(); d != "" {
					t.Fatalf("stream to the client: %s", d)
				}
				t.Logf("most in flight while the reader paused: %.1f MiB", float64(maxHeld)/(1<<20))
				if maxHeld > heldBound {
					t.Errorf("the upstream sent %d bytes beyond what the client read while it paused; want at most %d", maxHeld, heldBound)
				}
				if dp == DatapathSockmap {
					t.Logf("demotions %v, resumes %v", testutil.ToFloat64(r.metrics.kernelDemotions), testutil.ToFloat64(r.metrics.kernelResumes))
				}
				if dp == DatapathSockmap && p.on == 0 {
					if n := testutil.ToFloat64(r.metrics.kernelDemotions); n < 1 {
						t.Errorf("sockrelay_kernel_demotions_total = %v after a reader stopped, want at least 1", n)
					}
				}
				c.CloseWrite()
				waitTunnelsGone(t, r)
			})
		}
	}
}

// TestBackpressureBothStopReading has a client that floods the relay and never reads, in front of an
// upstream that echoes: both ends stop reading while both send. Every datapath must bound what it holds:
// the userspace ones by blocking, the kernel one by charging the bytes queued behind the stopped reader to
// the relay's socket (a raised send buffer), so TCP's window stops the sender, and by resetting the tunnel
// only if that room runs out (kernelBothStoppedBound).
func TestBackpressureBothStopReading(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			go func() { io.Copy(u, u.R) }() // the echo blocks once the client's receive buffer is full
			var sent atomic.Int64
			wrote := make(chan error, 1)
			go countingStreamWriter(c.TCPConn, streamReader(9, 1<<30), &sent, wrote)
			var err error
			select {
			case err = <-wrote:
			case <-time.After(3 * time.Second):
			}
			n := sent.Load()
			t.Logf("client sent %.1f MiB in 3 s without reading (write error: %v)", float64(n)/(1<<20), err)
			bound := int64(2 * heldBound)
			if dp == DatapathSockmap {
				bound = kernelBothStoppedBound(t)
			}
			if n > bound {
				t.Errorf("client sent %d bytes without reading any; want at most %d", n, bound)
			}
			c.SetLinger(0)
			c.Close()
			waitTunnelsGone(t, r)
		})
	}
}

// TestBackpressureFINWhileDemoted sends a stream and its FIN while the client does not read, so that the FIN
// reaches the relay while the kernel direction is demoted; the client must then read every byte, then EOF,
// and the other direction keeps working after it.
func TestBackpressureFINWhileDemoted(t *testing.T) {
	requireSockmap(t)
	up := startUpstream(t)
	r := startRelay(t, DatapathSockmap, []string{up.Addr})
	for i := range 3 {
		c, u := openTunnel(t, r.Addr, up, nil, nil)
		const size = 48 << 20
		var sent atomic.Int64
		wrote := make(chan error, 1)
		go countingStreamWriter(u.TCPConn, streamReader(uint64(20+i), size), &sent, wrote)
		time.Sleep(500 * time.Millisecond) // the upstream fills the path and the direction is demoted
		got := newStreamCheck(uint64(20+i), size)
		if n, err := copyWithin(c, got, c.R, time.Minute); err != nil {
			t.Fatalf("tunnel %d: client read %d bytes, then: %v", i, n, err)
		}
		if werr := <-wrote; werr != nil {
			t.Fatalf("tunnel %d: upstream write: %v", i, werr)
		}
		if d := got.Diff(); d != "" {
			t.Fatalf("tunnel %d: stream to the client: %s", i, d)
		}
		// The other direction still flows after the FIN, then closes.
		msg := []byte(fmt.Sprintf("after the fin %d", i))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		c.CloseWrite()
		back, err := readAllWithin(u, u.R, 10*time.Second)
		if err != nil || string(back) != string(msg) {
			t.Fatalf("tunnel %d: upstream got %q, %v; want %q then EOF", i, back, err, msg)
		}
	}
	if n := testutil.ToFloat64(r.metrics.kernelDemotions); n < 1 {
		t.Errorf("sockrelay_kernel_demotions_total = %v, want at least 1", n)
	}
	waitTunnelsGone(t, r)
}

// TestBackpressureEchoBothWays streams whole 64 KiB chunks both ways through sockmap tunnels whose upstream
// echoes and whose client reads all the time, as `wsbench throughput -mode echo` does: both peers read, so
// no tunnel may be reset for overflow, and every echoed byte must come back exact. Passed bytes that wait a
// moment behind the other direction's (a psock retry tick, CPU contention) once tripped the overflow reset
// of 3 of these 4 tunnels (docs/datapath.md, "Backpressure").
func TestBackpressureEchoBothWays(t *testing.T) {
	requireSockmap(t)
	up := startUpstream(t)
	r := startRelay(t, DatapathSockmap, []string{up.Addr})
	const tunnels, size = 4, 128 << 20
	errs := make(chan error, 2*tunnels)
	for i := range tunnels {
		c, u := openTunnel(t, r.Addr, up, nil, nil)
		go echoUntilEOF(u, errs)
		go func() { errs <- echoRoundTrip(c, uint64(50+i), size) }()
	}
	for range 2 * tunnels {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": ReasonOverflow}); n != 0 {
		t.Errorf("%v tunnels were reset for overflow while both peers read", n)
	}
	waitTunnelsGone(t, r)
}

// echoUntilEOF writes back what u reads until EOF, then half-closes u.
func echoUntilEOF(u *upstreamConn, errs chan<- error) {
	if _, err := io.Copy(u, u.R); err != nil {
		errs <- fmt.Errorf("upstream echo: %w", err)
		return
	}
	errs <- u.CloseWrite()
}

// echoRoundTrip writes size bytes of the seeded stream to c while it reads them back, checks them, and
// half-closes c; the echo must end with EOF after the last byte.
func echoRoundTrip(c *clientConn, seed uint64, size int64) error {
	wrote := make(chan error, 1)
	go countingStreamWriter(c.TCPConn, streamReader(seed, size), new(atomic.Int64), wrote)
	got := newStreamCheck(seed, size)
	n, err := copyWithin(c, got, c.R, time.Minute)
	if err != nil {
		c.Close() // unblocks the writer
		return fmt.Errorf("client read %d of %d echoed bytes, then: %w", n, size, err)
	}
	if err := <-wrote; err != nil {
		return fmt.Errorf("client write: %w", err)
	}
	if d := got.Diff(); d != "" {
		return fmt.Errorf("echoed stream: %s", d)
	}
	return nil
}

// kernelBothStoppedBound is the most a client may send into a kernel tunnel whose peers both stopped
// reading. The kernel engine does not reset such a tunnel while TCP backpressure holds it: it charges the
// bytes queued behind a stopped reader to the relay's socket by raising that socket's send buffer (by at
// most twice the held limit and a quarter, and some skbs, per direction), so each direction may hold the
// four sockets' buffers at the largest this machine lets them grow (net.ipv4.tcp_rmem and tcp_wmem, which
// heldBound takes as 6 and 4 MiB: here the receive side may reach 32 MiB), the held limit and that room,
// and the passed bytes that may pile up before the overflow rule clamps the window (docs/datapath.md,
// "Backpressure"). Still a small part of what a relay without backpressure lets through (the whole 1 GiB).
func kernelBothStoppedBound(t *testing.T) int64 {
	t.Helper()
	const skb = 64 << 10 // the kernel engine's roomAheadSkb
	return max(2*heldBound, streamtest.KernelBothStoppedBound(t, int64(DefaultKernelHeldLimit), skb))
}
