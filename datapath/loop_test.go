package datapath_test

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
	"github.com/sockrelay/sockrelay/internal/fdlimit"
)

// startEventLoop starts an event-loop engine of one loop, closed at the test's end.
func startEventLoop(t testing.TB) *datapath.EventLoop {
	t.Helper()
	e, err := datapath.StartEventLoop(eventloop.Options{Loops: 1, BufSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// startLoopEngine starts an event-loop engine of one loop as startEventLoop does, and returns its splice
// engine (EventLoop.Splice) when splice is set.
func startLoopEngine(t testing.TB, splice bool) *datapath.EventLoop {
	t.Helper()
	e := startEventLoop(t)
	if splice {
		return e.Splice()
	}
	return e
}

// forEachLoopEngine runs test on the event loop's copy engine and on its splice engine: both meet the pair
// contract.
func forEachLoopEngine(t *testing.T, test func(t *testing.T, splice bool)) {
	for _, m := range []struct {
		name   string
		splice bool
	}{{"copy", false}, {"splice", true}} {
		t.Run(m.name, func(t *testing.T) { test(t, m.splice) })
	}
}

// awaitEnd waits for p to end and returns its reason.
func awaitEnd(t testing.TB, p *datapath.Pair) string {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the pair did not end")
	}
	return p.Reason()
}

// The event loop meets the pair contract as the Copier does: peeked bytes first, both streams byte-exact, the
// client's FIN carried while the other direction still flows (the pair is half-closed meanwhile), a clean end
// once both FINs are carried, the counts in the pair's counters, and no buffer held once the pair has ended.
func TestEventLoopCarriesPair(t *testing.T) { forEachLoopEngine(t, testEventLoopCarriesPair) }

func testEventLoopCarriesPair(t *testing.T, splice bool) {
	e := startLoopEngine(t, splice)
	tn := newTunnel(t, e.Kind(), 4<<20)
	ended := make(chan struct{})
	var halfClosedSeen atomic.Bool
	tn.pair = datapath.NewPair(e.Kind(), datapath.Endpoint{Conn: tn.pair.Client().Conn, Peeked: tn.toUpstream[:100]},
		datapath.Endpoint{Conn: tn.pair.Upstream().Conn, Peeked: tn.toClient[:100]}, func(*datapath.Pair) { close(ended) })
	e.Carry(tn.pair)
	if got := tn.pair.Kind(); got != e.Kind() || !tn.pair.OnEventLoop() {
		t.Errorf("the carried pair is of kind %s, on the loop: %v; want %s on the loop", got, tn.pair.OnEventLoop(), e.Kind())
	}
	tn.exchange(t, func() {
		if _, ok := tn.pair.HalfClosedSince(); ok {
			halfClosedSeen.Store(true)
		}
	})
	if got := awaitEnd(t, tn.pair); got != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", got, tn.pair.Err(), datapath.ReasonClosed)
	}
	<-ended
	if !halfClosedSeen.Load() {
		t.Error("the pair was never seen half-closed while the upstream still sent (OnFIN → MarkHalfClosed)")
	}
	up, down := tn.pair.Bytes()
	if up != uint64(len(tn.toUpstream)) || down != uint64(len(tn.toClient)) {
		t.Errorf("counted %d and %d bytes, want %d and %d", up, down, len(tn.toUpstream), len(tn.toClient))
	}
	if st := e.Stats().Loops[0]; st.Tunnels != 0 || st.BuffersInUse != 0 || st.PipesInUse != 0 {
		t.Errorf("after the pair ended the loop carries %d tunnels and lends %d buffers and %d pipes, want none",
			st.Tunnels, st.BuffersInUse, st.PipesInUse)
	}
}

// A reset on one side resets the other, and the pair ends once, blamed on the side that reset (Blame).
func TestEventLoopResetBlamesTheSide(t *testing.T) {
	forEachLoopEngine(t, testEventLoopResetBlamesTheSide)
}

func testEventLoopResetBlamesTheSide(t *testing.T, splice bool) {
	for _, tc := range []struct {
		name string
		side func(tn *tunnel) (resets, other *net.TCPConn)
		want string
	}{
		{"client resets", func(tn *tunnel) (*net.TCPConn, *net.TCPConn) { return tn.client, tn.upstream }, datapath.ReasonClientReset},
		{"upstream resets", func(tn *tunnel) (*net.TCPConn, *net.TCPConn) { return tn.upstream, tn.client }, datapath.ReasonUpstreamReset},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startLoopEngine(t, splice)
			tn := newTunnel(t, e.Kind(), 1<<10)
			e.Carry(tn.pair)
			resets, other := tc.side(tn)
			_ = resets.SetLinger(0)
			_ = resets.Close()
			if got := awaitEnd(t, tn.pair); got != tc.want {
				t.Errorf("the pair ended with %q (%v), want %q", got, tn.pair.Err(), tc.want)
			}
			_ = other.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(other); !datapath.IsReset(err) {
				t.Errorf("the other peer read to %v, want a reset", err)
			}
		})
	}
}

// Ending a live pair from outside (an idle timeout, a drain) releases it from its loop: both peers see the
// end (a FIN without abort, a reset with it), the pair's counters hold what the loop moved, and the loop holds
// nothing of it.
func TestEventLoopReleaseEndsTheTunnel(t *testing.T) {
	forEachLoopEngine(t, testEventLoopReleaseEndsTheTunnel)
}

func testEventLoopReleaseEndsTheTunnel(t *testing.T, splice bool) {
	for _, abort := range []bool{false, true} {
		t.Run(map[bool]string{false: "close", true: "abort"}[abort], func(t *testing.T) {
			e := startLoopEngine(t, splice)
			tn := newTunnel(t, e.Kind(), 1<<10)
			e.Carry(tn.pair)
			got := make([]byte, 100)
			_ = tn.upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(tn.upstream, got); err != nil {
				t.Fatalf("read the peeked bytes: %v", err)
			}
			// The loop counts a write right after it returns, which may be after the peer has read it.
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
				if up, _ := tn.pair.Bytes(); up == 100 {
					break
				} else if time.Now().After(deadline) {
					t.Fatalf("live count to the upstream is %d, want 100", up)
				}
			}
			tn.pair.End("test", abort)
			_, err := tn.client.Read(make([]byte, 1<<10)) // the client got its 100 peeked bytes first
			for err == nil {
				_, err = tn.client.Read(make([]byte, 1<<10))
			}
			if abort != datapath.IsReset(err) || !abort && err != io.EOF {
				t.Errorf("the client read to %v after End(abort %v)", err, abort)
			}
			if up, down := tn.pair.Bytes(); up != 100 || down != 100 {
				t.Errorf("after the end the pair counts %d and %d bytes, want 100 each (the loop's final counts)", up, down)
			}
			if st := e.Stats().Loops[0]; st.Tunnels != 0 {
				t.Errorf("the loop still carries %d tunnels", st.Tunnels)
			}
		})
	}
}

// The timeouts' view of a loop pair comes from the loop: LastActive and Progress move with the bytes, and a
// reader that stopped leaves bytes unsent, which the pair reports (so that an idle timeout resets rather
// than hides them behind a FIN).
func TestEventLoopActivityAndUnsent(t *testing.T) {
	forEachLoopEngine(t, testEventLoopActivityAndUnsent)
}

func testEventLoopActivityAndUnsent(t *testing.T, splice bool) {
	e := startLoopEngine(t, splice)
	tn := newTunnel(t, e.Kind(), 1<<10)
	start := time.Now()
	e.Carry(tn.pair)
	if at, ok := tn.pair.LastActive(); !ok || at.Before(start.Add(-time.Second)) {
		t.Fatalf("LastActive = %v, %v right after Carry, want about now", at, ok)
	}
	_ = tn.upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(tn.upstream, make([]byte, 100)); err != nil {
		t.Fatal(err)
	}
	// The loop counts a write right after it returns, which may be after the peer has read it.
	before := tn.pair.Progress()
	for deadline := time.Now().Add(5 * time.Second); before < 100; before = tn.pair.Progress() {
		if time.Now().After(deadline) {
			t.Fatalf("Progress = %d after 200 peeked bytes were written, want at least 100", before)
		}
		time.Sleep(time.Millisecond)
	}
	// The upstream stops reading; the client writes until the relay stops taking bytes.
	chunk := make([]byte, 64<<10)
	for {
		_ = tn.client.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := tn.client.Write(chunk); err != nil {
			if !errors.Is(err, net.ErrClosed) && !isTimeout(err) {
				t.Fatal(err)
			}
			break
		}
	}
	if tn.pair.Progress() <= before {
		t.Error("Progress did not move while the client's bytes crossed")
	}
	if !tn.pair.Unsent() {
		t.Error("Unsent is false with a stopped reader and bytes in the loop and the send queues")
	}
	if tn.pair.Ending() {
		t.Fatalf("the pair ended (%s)", tn.pair.Reason())
	}
}

// A slow reader (2 KiB every 10 ms) drains the relay's full send buffer a little at a time. The loop writes
// again only when its EPOLLOUT edge comes, after about a third of that buffer has drained (seconds at this
// rate), but Progress must move with every byte TCP moves, or the timeouts would end a download that
// flows. Progress is sampled every 500 ms for 3 s; nearly every sample must differ from the one before (on
// loopback, whose MSS is 64 KiB, the reader's window opens and TCP acknowledges about every 320 ms).
func TestEventLoopProgressMovesWithASlowReader(t *testing.T) {
	forEachLoopEngine(t, testEventLoopProgressMovesWithASlowReader)
}

func testEventLoopProgressMovesWithASlowReader(t *testing.T, splice bool) {
	e := startLoopEngine(t, splice)
	tn := newTunnel(t, e.Kind(), 1<<10)
	e.Carry(tn.pair)
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	go func() { // the upstream sends until the test ends
		chunk := make([]byte, 64<<10)
		for {
			_ = tn.upstream.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := tn.upstream.Write(chunk); err != nil && !isTimeout(err) {
				return
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	go func() { // the client reads 2 KiB every 10 ms
		buf := make([]byte, 2<<10)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			_ = tn.client.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := io.ReadFull(tn.client, buf); err != nil {
				return
			}
		}
	}()
	time.Sleep(time.Second) // the buffers fill
	const samples = 6
	moved, last := 0, tn.pair.Progress()
	for range samples {
		time.Sleep(500 * time.Millisecond)
		if p := tn.pair.Progress(); p != last {
			moved, last = moved+1, p
		}
	}
	if moved < samples-1 {
		t.Errorf("Progress moved in %d of %d samples 500 ms apart while the reader took 200 KiB/s, want at least %d",
			moved, samples, samples-1)
	}
	if tn.pair.Ending() {
		t.Fatalf("the pair ended (%s)", tn.pair.Reason())
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TLS endpoints are refused: their bytes must be decrypted on a goroutine (the Copier).
func TestEventLoopRefusesTLS(t *testing.T) {
	e := startEventLoop(t)
	tn := newTunnel(t, datapath.Copy, 1<<10)
	client, up := tn.pair.Client(), tn.pair.Upstream()
	if !e.Accepts(client, up) {
		t.Error("the event loop refuses plain endpoints")
	}
	client.TLS = tls.Client(client.Conn, &tls.Config{})
	if e.Accepts(client, up) {
		t.Error("the event loop accepts a TLS endpoint")
	}
}

// Out of descriptors (EMFILE when the loop duplicates a socket), the pair runs on the Copier instead: the
// fallback is reported with the error, no peer is blamed, and the bytes cross as on any engine.
func TestEventLoopOutOfDescriptorsFallsBack(t *testing.T) {
	forEachLoopEngine(t, testEventLoopOutOfDescriptorsFallsBack)
}

func testEventLoopOutOfDescriptorsFallsBack(t *testing.T, splice bool) {
	e := startLoopEngine(t, splice)
	tn := newTunnel(t, e.Kind(), 256<<10)
	var fellBack error
	e.OnFallback = func(_ *datapath.Pair, err error) { fellBack = err }
	fdlimit.WithDescriptorsLeft(t, 1, func() { e.Carry(tn.pair) })
	if !errors.Is(fellBack, unix.EMFILE) {
		t.Fatalf("fallback reported %v, want EMFILE", fellBack)
	}
	tn.exchange(t, func() {})
	if got := awaitEnd(t, tn.pair); got != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", got, tn.pair.Err(), datapath.ReasonClosed)
	}
	if st := e.Stats().Loops[0]; st.Tunnels != 0 {
		t.Errorf("the loop carries %d tunnels, want 0: the pair ran on the Copier", st.Tunnels)
	}
}

// A pair that moves onto the loop after one direction carried its FIN: the loop neither reads that direction
// nor shuts its destination down again, and the other direction flows to its own FIN; the pair ends closed.
func TestMoveToEventLoopHalfClosed(t *testing.T) { forEachLoopEngine(t, testMoveToEventLoopHalfClosed) }

func testMoveToEventLoopHalfClosed(t *testing.T, splice bool) {
	e := startLoopEngine(t, splice)
	tn := newTunnel(t, e.Kind(), 1<<20)
	datapath.Copier{}.Carry(tn.pair)
	if _, err := tn.client.Write(tn.toUpstream[100:]); err != nil {
		t.Fatal(err)
	}
	if err := tn.client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := readAllWithin(tn.upstream, 10*time.Second)
	if err != nil || diffStreams(got, tn.toUpstream) != "" {
		t.Fatalf("upstream read %d bytes, %v: %s", len(got), err, diffStreams(got, tn.toUpstream))
	}
	if err := datapath.Move(tn.pair, e); err != nil {
		t.Fatalf("move the half-closed pair to the loop: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); e.Stats().Loops[0].Tunnels != 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the loop carries %d tunnels after the move, want 1", e.Stats().Loops[0].Tunnels)
		}
	}
	go func() {
		_, _ = tn.upstream.Write(tn.toClient[100:])
		_ = tn.upstream.CloseWrite()
	}()
	got, err = readAllWithin(tn.client, 10*time.Second)
	if err != nil || diffStreams(got, tn.toClient) != "" {
		t.Fatalf("client read %d bytes, %v: %s", len(got), err, diffStreams(got, tn.toClient))
	}
	if got := awaitEnd(t, tn.pair); got != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", got, tn.pair.Err(), datapath.ReasonClosed)
	}
	up, down := tn.pair.Bytes()
	if up != uint64(len(tn.toUpstream)) || down != uint64(len(tn.toClient)) {
		t.Errorf("counted %d and %d bytes, want %d each", up, down, len(tn.toUpstream))
	}
}

// readAllWithin reads c to EOF, failing after d.
func readAllWithin(c *net.TCPConn, d time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	return io.ReadAll(c)
}

// Out of descriptors for the connections a move off the loop needs (EMFILE), the move fails and the pair
// stays on the loop, untouched: its bytes still cross exactly and it ends closed.
func TestMoveOffEventLoopOutOfDescriptors(t *testing.T) {
	forEachLoopEngine(t, testMoveOffEventLoopOutOfDescriptors)
}

func testMoveOffEventLoopOutOfDescriptors(t *testing.T, splice bool) {
	e := startLoopEngine(t, splice)
	tn := newTunnel(t, e.Kind(), 1<<20)
	e.Carry(tn.pair)
	for _, left := range []int{1, 2} { // the loop's second duplicate fails, or the new connection's
		var err error
		fdlimit.WithDescriptorsLeft(t, left, func() { err = datapath.Move(tn.pair, datapath.Copier{}) })
		if !errors.Is(err, unix.EMFILE) {
			t.Fatalf("move off the loop with %d descriptors left: %v, want EMFILE", left, err)
		}
	}
	if st := e.Stats().Loops[0]; st.Tunnels != 1 {
		t.Fatalf("the loop carries %d tunnels after the failed moves, want 1", st.Tunnels)
	}
	tn.exchange(t, func() {})
	if got := awaitEnd(t, tn.pair); got != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", got, tn.pair.Err(), datapath.ReasonClosed)
	}
	up, down := tn.pair.Bytes()
	if up != uint64(len(tn.toUpstream)) || down != uint64(len(tn.toClient)) {
		t.Errorf("counted %d and %d bytes, want %d each", up, down, len(tn.toUpstream))
	}
}

// openFDs counts the process's open descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries) - 1 // the directory's own
}

// waitOpenFDs waits until the process has want descriptors open: a Go connection closed while a goroutine
// still reads it closes its descriptor once that read returns.
func waitOpenFDs(t testing.TB, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for got := openFDs(t); got != want; got = openFDs(t) {
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors open, want %d", got, want)
		}
		time.Sleep(time.Millisecond)
	}
}
