package relay

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// TestCopyCarriesPlainTunnelsOnEventLoops: with --datapath copy the loops run from the start, one per two CPUs, each
// with its series at 0; a plain tunnel is carried by a loop (sockrelay_eventloop_tunnels) and holds no buffer
// while idle; once it has ended the loops carry nothing.
func TestCopyCarriesPlainTunnelsOnEventLoops(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	want := []string{fmt.Sprintf("sockrelay_eventloop_loops %d", copyLoops())}
	for i := range copyLoops() {
		want = append(want, fmt.Sprintf(`sockrelay_eventloop_tunnels{loop="%d"} 0`, i),
			fmt.Sprintf(`sockrelay_eventloop_buffer_bytes{loop="%d"} 0`, i))
	}
	want = append(want, `sockrelay_datapath_fallbacks_total{reason="eventloop_start_failed"} 0`,
		`sockrelay_datapath_fallbacks_total{reason="eventloop_carry_failed"} 0`)
	waitScrapeHas(t, r, want...)

	c, u := openTunnel(t, r.Addr, up, []byte("ping"), []byte("pong"))
	waitMetric(t, r, "sockrelay_eventloop_tunnels", 1)
	if ts := r.Tunnels().Tunnels(); len(ts) != 1 || !ts[0].Info().EventLoop {
		t.Errorf("/debug/tunnels does not say the tunnel runs on an event loop: %+v", ts)
	}
	// The handshake's bytes have crossed: the idle tunnel holds no buffer.
	got := make([]byte, 4)
	if _, err := u.Read(got); err != nil || string(got) != "ping" {
		t.Fatalf("upstream read %q, %v; want ping", got, err)
	}
	waitMetric(t, r, "sockrelay_eventloop_buffer_bytes", 0)
	_ = c.Close()
	_ = u.Close()
	waitTunnelsGone(t, r)
	waitMetric(t, r, "sockrelay_eventloop_tunnels", 0)
}

// waitMetric waits until the series of name, summed, read want.
func waitMetric(t *testing.T, r *testRelay, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := metricSum(r.Reg, name, nil)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", name, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCopyLoopsUnavailable: when the event loops cannot start (out of descriptors for epoll_create), plain
// copy tunnels run on goroutines instead, byte-exact and ending cleanly, each counted as a fallback with the
// cause in the log; no tunnel is reset or blamed on a peer.
func TestCopyLoopsUnavailable(t *testing.T) {
	up := startUpstream(t)
	fail := func(eventloop.Options) (*datapath.EventLoop, error) {
		return nil, fmt.Errorf("copy datapath: start event loop 0: epoll_create1: %w", unix.EMFILE)
	}
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.startLoops = fail })
	for i := range 2 {
		runDuplex(t, r, up, duplexCase{toUpstream: 1 << 20, toClient: 1 << 20, pipelined: 100, with101: 100}, uint64(i))
	}
	if n := metricSum(r.Reg, "sockrelay_datapath_fallbacks_total", map[string]string{"reason": fallbackLoopStart}); n != 3 {
		t.Errorf("eventloop_start_failed fallbacks = %v, want 3 (at start, then one per tunnel)", n)
	}
	if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": ReasonClosed}); n != 2 {
		t.Errorf("sockrelay_tunnels_closed_total{reason=%q} = %v, want 2", ReasonClosed, n)
	}
	if n := metricSum(r.Reg, "sockrelay_eventloop_loops", nil); n != 0 {
		t.Errorf("sockrelay_eventloop_loops = %v with loops that could not start", n)
	}
	if logs := r.Log.String(); !strings.Contains(logs, "event loops cannot start, the tunnel runs on goroutines") ||
		!strings.Contains(logs, "too many open files") {
		t.Errorf("log lacks the fallback and its cause:\n%s", logs)
	}
}

// TestMoveEventLoopToSockmap hands a live pair from the copy datapath's event loop to the kernel engine
// between two MiB of each stream: every byte arrives once and in order, each FIN after the last byte, and the
// pair ends closed on sockmap with the maps left empty.
func TestMoveEventLoopToSockmap(t *testing.T) {
	requireSockmap(t)
	k, err := newKernelPath(slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	loops, err := datapath.StartEventLoop(eventloop.Options{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loops.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, relayClient, err := loopbackPair(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	relayUp, up, err := loopbackPair(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); up.Close() })
	const half = 1 << 20
	toUp, toClient := stream(21, 2*half), stream(22, 2*half)
	p := datapath.NewPair(datapath.Copy, datapath.Endpoint{Conn: relayClient, Peeked: toUp[:100]},
		datapath.Endpoint{Conn: relayUp, Peeked: toClient[:100]}, nil)
	t.Cleanup(func() { p.End(ReasonShutdown, true) })
	loops.Carry(p)

	sides := []struct {
		name      string
		conn      *net.TCPConn
		send, exp []byte
	}{{"client", client, toUp, toClient}, {"upstream", up, toClient, toUp}}
	// Each phase sends a part of each stream and reads what the other side sent of it, so that no byte is
	// in flight when the pair moves (a busy source would make the kernel engine hand it to copy).
	phase := func(from, to int, last bool) {
		var wg sync.WaitGroup
		for _, s := range sides {
			wg.Add(2)
			go func() {
				defer wg.Done()
				_ = s.conn.SetWriteDeadline(time.Now().Add(20 * time.Second))
				if _, err := s.conn.Write(s.send[from:to]); err != nil {
					t.Errorf("%s write: %v", s.name, err)
				}
				if last {
					_ = s.conn.CloseWrite()
				}
			}()
			go func() {
				defer wg.Done()
				start := from
				if start == 100 {
					start = 0 // the peeked bytes come first
				}
				want := s.exp[start:to]
				got := make([]byte, len(want))
				_ = s.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
				if _, err := io.ReadFull(s.conn, got); err != nil {
					t.Errorf("%s read: %v", s.name, err)
				} else if d := diffStreams(got, want); d != "" {
					t.Errorf("%s received a wrong stream: %s", s.name, d)
				}
				if last {
					if n, err := s.conn.Read(make([]byte, 1)); n != 0 || err != io.EOF {
						t.Errorf("%s: after the last byte read %d bytes, %v; want EOF", s.name, n, err)
					}
				}
			}()
		}
		wg.Wait()
	}
	phase(100, half, false)
	if t.Failed() {
		return
	}
	if err := datapath.Move(p, k); err != nil {
		t.Fatalf("move from the event loop to sockmap: %v", err)
	}
	if got := p.Kind(); got != DatapathSockmap {
		t.Fatalf("after the move the pair runs on %s", got)
	}
	phase(half, 2*half, true)
	select {
	case <-p.Done():
	case <-ctx.Done():
		t.Fatal("the pair did not end after both sides half-closed")
	}
	if p.Reason() != ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), ReasonClosed)
	}
	if up, down := p.Bytes(); up != 2*half || down != 2*half {
		t.Errorf("counted %d and %d bytes, want %d each", up, down, 2*half)
	}
	assertMapsEmpty(t, k)
}
