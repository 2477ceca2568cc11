package sockmap

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/fdlimit"
)

// recordingEngine is a fallback engine that notes each pair it is handed and carries it on the Copier.
type recordingEngine struct {
	mu      sync.Mutex
	carried []*datapath.Pair
}

func (e *recordingEngine) Kind() datapath.Kind                 { return datapath.Copy }
func (e *recordingEngine) Accepts(a, b datapath.Endpoint) bool { return true }
func (e *recordingEngine) Close() error                        { return nil }

func (e *recordingEngine) Carry(p *datapath.Pair) {
	e.mu.Lock()
	e.carried = append(e.carried, p)
	e.mu.Unlock()
	datapath.Copier{}.Carry(p)
}

func (e *recordingEngine) took(p *datapath.Pair) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.carried {
		if c == p {
			return true
		}
	}
	return false
}

// A pair the kernel cannot take runs on the fallback engine the relay set (its event loops, whose counters
// auto's policy reads), not on goroutines for good.
func TestFallbackEngineCarriesRefusedPair(t *testing.T) {
	k, _ := newTestEngine(t)
	rec := &recordingEngine{}
	k.SetFallback(rec)
	client, relayClient, relayUp, upstream := tunnelEnds(t)
	if _, err := client.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil { // a source that sent its FIN cannot enter a sockhash
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	k.Carry(p)
	if !rec.took(p) || p.Kind() != datapath.Copy {
		t.Fatalf("the refused pair runs on %s, taken by the set fallback: %v; want the fallback engine", p.Kind(), rec.took(p))
	}
	_ = upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(upstream); err != nil || string(got) != "bye" {
		t.Errorf("the upstream read %q, then %v; want \"bye\", then EOF", got, err)
	}
}

// A pair the kernel engine cannot duplicate a socket of (no descriptor left, EMFILE) runs on the fallback
// engine, counted with reason no_descriptor: a healthy tunnel is not reset, and no peer is blamed.
func TestCarryOutOfDescriptorsFallsBack(t *testing.T) {
	// One descriptor left, taken first or not: neither side's duplicate, or the client's but not the
	// upstream's. (With none left at all, RLIMIT_NOFILE is 0 and F_DUPFD fails with EINVAL instead.)
	for _, takeLast := range []bool{true, false} {
		t.Run(fmt.Sprintf("last taken %v", takeLast), func(t *testing.T) {
			k, _ := newTestEngine(t)
			rec := &recordingEngine{}
			k.SetFallback(rec)
			var reasons []string
			k.onFallback = func(_ *datapath.Pair, reason string) { reasons = append(reasons, reason) }
			client, relayClient, relayUp, upstream := tunnelEnds(t)
			p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
			t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
			before := openFDs(t)
			fdlimit.WithDescriptorsLeft(t, 1, func() {
				if takeLast {
					fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
					if err != nil {
						t.Fatal(err)
					}
					defer unix.Close(fd)
				}
				k.Carry(p)
			})
			if p.Ending() || !rec.took(p) || !slices.Equal(reasons, []string{"no_descriptor"}) {
				t.Fatalf("out of descriptors: the pair ended %q, taken by the fallback: %v, fallbacks %q; "+
					"want it alive on the fallback, counted once as no_descriptor", p.Reason(), rec.took(p), reasons)
			}
			if got := openFDs(t); got != before {
				t.Errorf("%d descriptors open after the fallback, %d before: the engine leaked a duplicate", got, before)
			}
			if _, err := client.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			_ = upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
			got := make([]byte, 4)
			if _, err := io.ReadFull(upstream, got); err != nil || string(got) != "ping" {
				t.Errorf("the upstream read %q, %v; want \"ping\"", got, err)
			}
		})
	}
}

// A peer that resets while its pair is being given back (out of the loop, which would have seen it) ends the
// pair as that peer's reset: the pair is not handed on with a reset socket whose read the next engine could
// take for a FIN (TCP_CLOSE is no FIN received unless the engine carried one into that socket).
func TestGiveBackOfResetSocketResets(t *testing.T) {
	k, _ := newTestEngine(t)
	client, upstream, p := carryPair(t, k)
	k.beforeSettle(func(kt *kernelTunnel) {
		_ = client.SetLinger(0)
		_ = client.Close()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			if state, err := tcpState(kt.client.fd); err == nil && state == tcpClose {
				return
			}
			if time.Now().After(deadline) {
				t.Error("the relay's client socket is not TCP_CLOSE 5s after the client's reset")
				return
			}
		}
	})
	next := &recordingEngine{}
	err := datapath.Move(p, next)
	if err == nil || next.took(p) {
		t.Fatalf("Move of a pair whose client reset during the give-back: %v, taken by the next engine: %v; "+
			"want an error and the pair not handed on", err, next.took(p))
	}
	waitEnded(t, p)
	if p.Reason() != datapath.ReasonClientReset {
		t.Errorf("the pair ended %q, want %q", p.Reason(), datapath.ReasonClientReset)
	}
	_ = upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, upstream); !datapath.IsReset(err) {
		t.Errorf("the upstream's read ended with %v, want a reset", err)
	}
}

// A destination that does not take the bytes the handoff writes (the event loop's held bytes on a move, or a
// source's queued bytes) does not hold the handoff, and with it both directions, until it reads: after a
// bounded wait the pair runs on the fallback engine, counted as slow_reader, with every byte still to come
// in order.
func TestHandoffSlowReaderFallsBack(t *testing.T) {
	const size = 16 << 20
	for _, peeked := range []bool{true, false} { // the bytes are the pair's peeked ones, or queued in its source
		t.Run(map[bool]string{true: "peeked", false: "queued"}[peeked], func(t *testing.T) {
			k, _ := newTestEngine(t)
			rec := &recordingEngine{}
			k.SetFallback(rec)
			var reasons []string
			k.onFallback = func(_ *datapath.Pair, reason string) { reasons = append(reasons, reason) }
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			client, relayClient, err := loopbackPair(ctx, 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			relayUp, upstream, err := loopbackPair(ctx, 0, 4<<10) // the upstream reads nothing until the end
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close(); upstream.Close() })
			_ = relayUp.SetWriteBuffer(4 << 10)
			want := stream(1, size)
			var toUp []byte
			if peeked {
				toUp = want
			} else {
				go func() { _, _ = client.Write(want) }() // blocks until the relay has read most of it
				time.Sleep(50 * time.Millisecond)
			}
			p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient, Peeked: toUp},
				datapath.Endpoint{Conn: relayUp}, nil)
			t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
			carried := make(chan struct{})
			go func() { k.Carry(p); close(carried) }()
			select {
			case <-carried:
			case <-time.After(5 * time.Second):
				_, _ = io.Copy(io.Discard, io.LimitReader(upstream, size)) // let the handoff go on
				t.Fatal("the handoff's write to a destination that does not read held it for 5s")
			}
			if p.Ending() || !rec.took(p) || !slices.Equal(reasons, []string{"slow_reader"}) {
				t.Fatalf("the pair ended %q, taken by the fallback: %v, fallbacks %q; want it alive on the "+
					"fallback, counted once as slow_reader", p.Reason(), rec.took(p), reasons)
			}
			_ = upstream.SetReadDeadline(time.Now().Add(20 * time.Second))
			got := make([]byte, size)
			if _, err := io.ReadFull(upstream, got); err != nil {
				t.Fatal(err)
			}
			if d := diffStreams(got, want); d != "" {
				t.Errorf("the upstream's stream: %s", d)
			}
		})
	}
}
