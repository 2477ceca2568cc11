package sockmap

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/streamtest"
)

// TestOneStoppedReaderIsNoOverflow streams both ways through a kernel tunnel while the client stops reading
// for 3 s and keeps writing, and the upstream reads everything. Only one peer stopped reading, so the tunnel
// must not be reset for overflow: the relay applies backpressure to the client, as nginx or HAProxy would,
// and once the client reads again both streams arrive whole and the tunnel ends closed. Under CPU load the
// client → upstream direction, demoted for a psock retry stall, had its passed bytes wait in the client's
// socket behind upstream → client bytes the client did not read, and the overflow reset took such tunnels
// for both peers having stopped (docs/datapath.md, "Backpressure"). What the client sent beyond what the
// upstream read must stay bounded meanwhile.
func TestOneStoppedReaderIsNoOverflow(t *testing.T) {
	for _, tc := range []struct {
		name      string
		heldLimit uint64 // 0: the default
	}{
		{"256 KiB held limit", 256 << 10},
		{"the default held limit", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, logs := newTestEngine(t)
			if tc.heldLimit != 0 {
				k.heldLimit = tc.heldLimit
			}
			client, upstream, p := carryPair(t, k)
			kernelDirOf(t, k, true) // in the kernel before the streams start (see TestBackpressureLostEvents)
			const size, chunk, pause = 128 << 20, 32 << 10, 3 * time.Second
			toUp, toClient := stream(61, size), stream(62, size)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			errs := make(chan error, 4)
			var wg sync.WaitGroup
			var clientSent, upstreamRead atomic.Int64
			var inFlight int64 // client → upstream, as the client's reader ends its pause
			for _, e := range []struct {
				name       string
				conn       *net.TCPConn
				send, exp  []byte
				sent, read *atomic.Int64
				pause      time.Duration // the reader stops for pause once it has read its first MiB
			}{
				{"client", client, toUp, toClient, &clientSent, new(atomic.Int64), pause},
				{"upstream", upstream, toClient, toUp, new(atomic.Int64), &upstreamRead, 0},
			} {
				wg.Add(2)
				go func() {
					defer wg.Done()
					if err := pacedStream(ctx, e.conn, e.send, chunk, e.sent); err != nil {
						errs <- fmt.Errorf("%s: %w", e.name, err)
					}
				}()
				go func() {
					defer wg.Done()
					resume := func() { inFlight = clientSent.Load() - upstreamRead.Load() }
					if err := readPausing(ctx, e.conn, e.exp, e.pause, e.read, resume); err != nil {
						errs <- fmt.Errorf("%s: %w", e.name, err)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			waitEnded(t, p)
			if p.Reason() != datapath.ReasonClosed {
				t.Errorf("the pair ended with %q (%v), want %q: only the client stopped reading", p.Reason(), p.Err(), datapath.ReasonClosed)
			}
			t.Logf("client → upstream in flight as the client's pause ended: %.1f MiB; demotions %d, resumes %d, send buffers raised %d",
				float64(inFlight)/(1<<20), k.demotions.Load(), k.resumes.Load(), strings.Count(logs.String(), "raised the send buffer"))
			if bound := streamtest.KernelOneWayBound(t, int64(k.heldLimit), roomAheadSkb); inFlight > bound {
				t.Errorf("the client had sent %d bytes the upstream had not read as its pause ended; want at most %d", inFlight, bound)
			}
		})
	}
}

// pacedStream writes data to c in chunks, one a millisecond, so that the writer keeps sending through a
// reader's pause, counting in sent what it wrote, then half-closes c.
func pacedStream(ctx context.Context, c *net.TCPConn, data []byte, chunk int, sent *atomic.Int64) error {
	deadline, _ := ctx.Deadline()
	_ = c.SetWriteDeadline(deadline)
	for off := 0; off < len(data); off += chunk {
		n, err := c.Write(data[off:min(off+chunk, len(data))])
		sent.Add(int64(n))
		if err != nil {
			return fmt.Errorf("write at %d of %d bytes: %w", off, len(data), err)
		}
		time.Sleep(time.Millisecond)
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	return nil
}

// readPausing reads c to EOF, counting in read what it read, stopping for pause once it has read its first
// MiB and calling resume at the end of the pause, and reports how what it read differs from want.
func readPausing(ctx context.Context, c *net.TCPConn, want []byte, pause time.Duration, read *atomic.Int64, resume func()) error {
	deadline, _ := ctx.Deadline()
	_ = c.SetReadDeadline(deadline)
	got := make([]byte, 0, len(want))
	buf := make([]byte, 64<<10)
	for {
		if pause > 0 && len(got) >= 1<<20 {
			time.Sleep(pause)
			resume()
			pause = 0
		}
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		read.Add(int64(n))
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read %d of %d bytes, then: %w", len(got), len(want), err)
		}
	}
	if d := diffStreams(got, want); d != "" {
		return fmt.Errorf("received a wrong stream: %s", d)
	}
	return nil
}

// TestBothStoppedReadersStayBounded has a client that floods the tunnel and never reads, in front of an
// upstream that echoes until its writes block: both peers stop reading while both send. What the client
// gets to send must stay bounded, by backpressure or by the overflow reset; the room makeRoomAhead gives
// the client → upstream direction must not let it through unbounded (streamtest.KernelBothStoppedBound).
func TestBothStoppedReadersStayBounded(t *testing.T) {
	for _, tc := range []struct {
		name      string
		heldLimit uint64 // 0: the default
	}{
		{"256 KiB held limit", 256 << 10},
		{"the default held limit", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, logs := newTestEngine(t)
			if tc.heldLimit != 0 {
				k.heldLimit = tc.heldLimit
			}
			client, upstream, p := carryPair(t, k)
			kernelDirOf(t, k, true) // in the kernel before the streams start (see TestBackpressureLostEvents)
			go func() { _, _ = io.Copy(upstream, upstream) }()
			var sent atomic.Int64
			wrote := make(chan error, 1)
			go func() {
				data := stream(63, 1<<20)
				for {
					n, err := client.Write(data)
					sent.Add(int64(n))
					if err != nil {
						wrote <- err
						return
					}
				}
			}()
			var err error
			select {
			case err = <-wrote:
			case <-time.After(5 * time.Second):
			}
			n := sent.Load()
			t.Logf("client sent %.1f MiB in 5 s without reading (write error: %v); the pair ended %q; send buffers raised %d",
				float64(n)/(1<<20), err, p.Reason(), strings.Count(logs.String(), "raised the send buffer"))
			if bound := streamtest.KernelBothStoppedBound(t, int64(k.heldLimit), roomAheadSkb); n > bound {
				t.Errorf("client sent %d bytes without reading any; want at most %d", n, bound)
			}
			if p.Ending() && p.Reason() != datapath.ReasonOverflow {
				t.Errorf("the pair ended with %q (%v), want it carried on or reset for overflow", p.Reason(), p.Err())
			}
		})
	}
}
