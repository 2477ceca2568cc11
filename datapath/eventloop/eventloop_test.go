package eventloop

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/internal/fdlimit"
	"golang.org/x/sys/unix"
)

func TestCarryIsByteExactBothWays(t *testing.T) { forEachMode(t, testCarryIsByteExactBothWays) }

func testCarryIsByteExactBothWays(t *testing.T, splice bool) {
	cases := []struct {
		name             string
		aToB, bToA       int // bytes each way, peeked bytes included
		aPeeked, bPeeked int // how many of them were peeked before Carry
	}{
		{name: "small both ways", aToB: 1000, bToA: 1000},
		{name: "megabytes both ways", aToB: 3 << 20, bToA: 2 << 20},
		{name: "one way only", aToB: 2 << 20},
		{name: "peeked first, then the rest", aToB: 1 << 20, bToA: 1 << 20, aPeeked: 517, bPeeked: 33},
		{name: "peeked bytes only", aToB: 10, bToA: 7, aPeeked: 10, bPeeked: 7},
		{name: "nothing either way"},
	}
	ls := startLoops(t, Options{Loops: 2, BufSize: 16 << 10})
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			seed := uint64(i) * 1000
			sendA, sendB := newStream(seed+1), newStream(seed+2)
			r := carryAs(t, ls, splice, sendA.next(tc.aPeeked), sendB.next(tc.bPeeked), nil)
			var wg sync.WaitGroup
			errs := make(chan error, 6)
			send := func(c *net.TCPConn, s *stream, n int, chunkSeed uint64) {
				defer wg.Done()
				errs <- writeStream(c, s, n, chunkSeed)
				errs <- c.CloseWrite()
			}
			check := func(c *net.TCPConn, seed uint64, n int) {
				defer wg.Done()
				errs <- checkStream(c, newStream(seed), n)
			}
			wg.Add(4)
			go send(r.peerA, sendA, tc.aToB-tc.aPeeked, seed+3)
			go send(r.peerB, sendB, tc.bToA-tc.bPeeked, seed+4)
			go check(r.peerB, seed+1, tc.aToB)
			go check(r.peerA, seed+2, tc.bToA)
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			e := r.end(t)
			if e.Reason != ReasonClosed || e.AToB != int64(tc.aToB) || e.BToA != int64(tc.bToA) || e.Unsent != 0 {
				t.Errorf("end = %+v, want closed with %d bytes a→b, %d b→a, none unsent", e, tc.aToB, tc.bToA)
			}
		})
	}
}

// One side's FIN reaches the other after all of that side's bytes, and the other direction keeps flowing
// after it.
func TestCarryHalfCloseKeepsTheOtherDirection(t *testing.T) {
	forEachMode(t, testCarryHalfCloseKeepsTheOtherDirection)
}

func testCarryHalfCloseKeepsTheOtherDirection(t *testing.T, splice bool) {
	ls := startLoops(t, Options{Loops: 1})
	r := carryAs(t, ls, splice, nil, nil, nil)
	if err := writeStream(r.peerA, newStream(1), 100<<10, 1); err != nil {
		t.Fatal(err)
	}
	if err := r.peerA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := checkStream(r.peerB, newStream(1), 100<<10); err != nil {
		t.Fatalf("a→b before a's FIN: %v", err)
	}
	// a's FIN has arrived at peerB; b→a must still carry a stream of its own, and then b's FIN.
	errs := make(chan error, 1)
	go func() { errs <- checkStream(r.peerA, newStream(2), 1<<20) }()
	if err := writeStream(r.peerB, newStream(2), 1<<20, 2); err != nil {
		t.Fatalf("b→a after a's FIN: %v", err)
	}
	if err := r.peerB.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := <-errs; err != nil {
		t.Fatalf("b→a after a's FIN: %v", err)
	}
	if e := r.end(t); e.Reason != ReasonClosed || e.First != SideA {
		t.Errorf("end = %+v, want closed, a first", e)
	}
}

// reset closes c with SO_LINGER 0, so its peer gets an RST.
func reset(t *testing.T, c *net.TCPConn) {
	t.Helper()
	if err := c.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// readUntilError reads c until it fails and returns how.
func readUntilError(c *net.TCPConn) error {
	_, err := io.Copy(io.Discard, c)
	if err == nil {
		return io.EOF
	}
	return err
}

func TestCarryResetOnOneSideResetsTheOther(t *testing.T) {
	forEachMode(t, testCarryResetOnOneSideResetsTheOther)
}

func testCarryResetOnOneSideResetsTheOther(t *testing.T, splice bool) {
	cases := []struct {
		name    string
		resetB  bool // which peer resets: b's, else a's
		stalled bool // the reset comes while a→b holds bytes peerB does not read
		want    Reason
	}{
		{name: "a resets", want: ReasonResetByA},
		{name: "b resets", resetB: true, want: ReasonResetByB},
		{name: "a resets while a→b is stalled", stalled: true, want: ReasonResetByA},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ls := startLoops(t, Options{Loops: 1, BufSize: 4 << 10})
			r := carryAs(t, ls, splice, nil, nil, smallBuffers)
			if tc.stalled {
				fillUntilStalled(t, r, newStream(9))
			}
			resetter, other, first := r.peerA, r.peerB, SideA
			if tc.resetB {
				resetter, other, first = r.peerB, r.peerA, SideB
			}
			reset(t, resetter)
			// The end comes before the other peer reads anything: a stalled direction must not wait for
			// its reader to learn of the reset.
			if e := r.end(t); e.Reason != tc.want || e.First != first {
				t.Errorf("end = %+v, want %v, %v first", e, tc.want, first)
			}
			if err := readUntilError(other); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("the other peer's read ended with %v, want ECONNRESET", err)
			}
		})
	}
}

// smallBuffers sizes a socket's buffers to 16 KiB (the kernel doubles that), so a stalled stream fills them
// in a few hundred KiB.
func smallBuffers(fd uintptr) {
	_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, 16<<10)
	_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 16<<10)
}

// fillUntilStalled writes s to peerA, which peerB does not read, until a write makes no progress for 300 ms,
// and returns how many bytes were accepted. A loop that read on without bound would take the whole 64 MiB
// limit, far above what 16 KiB socket buffers and one loop buffer hold; that fails the test.
func fillUntilStalled(t *testing.T, r *rig, s *stream) int64 {
	t.Helper()
	const limit = 64 << 20
	var accepted int64
	chunk := make([]byte, 4<<10)
	for accepted < limit {
		_, _ = s.src.Read(chunk)
		_ = r.peerA.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		n, err := r.peerA.Write(chunk)
		accepted += int64(n)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			_ = r.peerA.SetWriteDeadline(time.Now().Add(testTimeout))
			return accepted
		}
		if err != nil {
			t.Fatalf("fill a→b: %v", err)
		}
	}
	t.Fatalf("the relay accepted %d bytes from a writer whose reader had stopped", accepted)
	return 0
}

// A reader that stops makes the writer stop: the loop holds at most one buffer for the stalled direction
// and reads no more from its source, so what the writer got accepted is bounded by the socket buffers on the
// way plus that one buffer. Once the reader resumes, every byte arrives in order.
func TestCarryStoppedReaderStopsTheWriter(t *testing.T) {
	const bufSize = 8 << 10
	ls := startLoops(t, Options{Loops: 1, BufSize: bufSize})
	r := carry(t, ls, nil, nil, smallBuffers)
	accepted := fillUntilStalled(t, r, newStream(7))
	bound := socketBuffers(t, r) + bufSize
	if accepted > bound {
		t.Fatalf("writer got %d bytes accepted with its reader stopped, more than socket buffers + one loop buffer = %d",
			accepted, bound)
	}
	st := ls.Stats()[0]
	if st.BuffersInUse > 1 || r.h.Unsent() > bufSize {
		t.Errorf("stalled direction holds %d buffers and %d unsent bytes, want at most 1 and %d",
			st.BuffersInUse, r.h.Unsent(), bufSize)
	}
	// The reader resumes: everything accepted arrives in order (a write cut by its deadline counts what it
	// wrote, so the stream's tail past that is never expected).
	if err := r.peerA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := checkStream(r.peerB, newStream(7), int(accepted)); err != nil {
		t.Fatalf("after the reader resumed: %v", err)
	}
	if st := ls.Stats()[0]; st.BuffersInUse != 0 {
		t.Errorf("drained tunnel holds %d buffers, want 0", st.BuffersInUse)
	}
}

// socketBuffers sums the send and receive buffers of the four sockets between peerA's writes and peerB's
// reads, as the kernel reports them (it doubles what was set, for its bookkeeping).
func socketBuffers(t *testing.T, r *rig) int64 {
	t.Helper()
	var sum int64
	for _, c := range []*net.TCPConn{r.peerA, r.peerB} {
		raw, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		_ = raw.Control(func(fd uintptr) {
			for _, opt := range []int{unix.SO_SNDBUF, unix.SO_RCVBUF} {
				v, _ := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt)
				sum += int64(v)
			}
		})
	}
	// The relay's two sockets were made with the same setup, so they hold as much again.
	return 2 * sum
}

func TestCarryThousandPingPongTunnels(t *testing.T) { forEachMode(t, testCarryThousandPingPongTunnels) }

func testCarryThousandPingPongTunnels(t *testing.T, splice bool) {
	const tunnels, rounds, size = 1000, 10, 32
	ls := startLoops(t, Options{Loops: 2})
	rigs := make([]*rig, tunnels)
	for i := range rigs {
		rigs[i] = carryAs(t, ls, splice, nil, nil, nil)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*tunnels)
	for i, r := range rigs {
		wg.Add(2)
		go func() {
			defer wg.Done()
			// Not io.Copy: between TCP conns it splices through pipes that Go caches until a collection,
			// and a thousand of them would still be open for the descriptor count of a later test.
			echoUntilEOF(r.peerB)
		}()
		go func() {
			defer wg.Done()
			msg, got := make([]byte, size), make([]byte, size)
			for round := range rounds {
				msg[0], msg[1] = byte(i), byte(round)
				if _, err := r.peerA.Write(msg); err != nil {
					errs <- fmt.Errorf("tunnel %d round %d write: %w", i, round, err)
					return
				}
				if _, err := io.ReadFull(r.peerA, got); err != nil || string(got) != string(msg) {
					errs <- fmt.Errorf("tunnel %d round %d: read %q, %v; want the echo", i, round, got[:2], err)
					return
				}
			}
			_ = r.peerA.CloseWrite()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, r := range rigs {
		if e := r.end(t); e.Reason != ReasonClosed || e.AToB != rounds*size || e.BToA != rounds*size {
			t.Fatalf("end = %+v, want closed with %d bytes each way", e, rounds*size)
		}
	}
	var total int64
	for _, st := range ls.Stats() {
		total += st.Tunnels + st.BuffersInUse
	}
	if total != 0 {
		t.Errorf("after every tunnel ended the loops still count %d tunnels and buffers", total)
	}
}

func TestHandleCloseEndsBothSides(t *testing.T) { forEachMode(t, testHandleCloseEndsBothSides) }

func testHandleCloseEndsBothSides(t *testing.T, splice bool) {
	cases := []struct {
		name    string
		abort   bool
		wantErr error
		want    Reason
	}{
		{name: "close sends FIN both ways", wantErr: io.EOF, want: ReasonLocalClose},
		{name: "abort resets both", abort: true, wantErr: syscall.ECONNRESET, want: ReasonLocalAbort},
	}
	ls := startLoops(t, Options{Loops: 1})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := carryAs(t, ls, splice, []byte("hi"), nil, nil)
			got := make([]byte, 2)
			if _, err := io.ReadFull(r.peerB, got); err != nil || string(got) != "hi" {
				t.Fatalf("peeked bytes: read %q, %v", got, err)
			}
			r.h.Close(tc.abort)
			for name, c := range map[string]*net.TCPConn{"a": r.peerA, "b": r.peerB} {
				if err := readUntilError(c); !errors.Is(err, tc.wantErr) {
					t.Errorf("peer of %s: read ended with %v, want %v", name, err, tc.wantErr)
				}
			}
			if e := r.end(t); e.Reason != tc.want || e.First != SideNone || e.AToB != 2 {
				t.Errorf("end = %+v, want %v with the 2 peeked bytes counted", e, tc.want)
			}
			r.h.Close(true) // closing an ended tunnel does nothing
		})
	}
}

// Tunnels ended every way, and one still open when the loops close, leave no descriptor behind.
func TestCarryLeaksNoDescriptors(t *testing.T) { forEachMode(t, testCarryLeaksNoDescriptors) }

func testCarryLeaksNoDescriptors(t *testing.T, splice bool) {
	before := openFDs(t)
	// The subtest's cleanups close the test's own conns before the count after.
	t.Run("tunnels", func(t *testing.T) {
		ls, err := Start(Options{Loops: 2})
		if err != nil {
			t.Fatal(err)
		}
		closed := carryAs(t, ls, splice, nil, nil, nil)
		_ = closed.peerA.CloseWrite()
		_ = closed.peerB.CloseWrite()
		reset(t, carryAs(t, ls, splice, nil, nil, nil).peerA)
		carryAs(t, ls, splice, nil, nil, nil).h.Close(false)
		carryAs(t, ls, splice, nil, nil, nil).h.Close(true)
		open := carryAs(t, ls, splice, nil, nil, nil)
		closed.end(t)
		ls.Close()
		if e := open.end(t); e.Reason != ReasonLoopsClosed {
			t.Errorf("tunnel open at Close: end = %+v, want loops closed", e)
		}
		ls.Close() // twice is safe
		a, b := tcpPair(t, nil)
		if _, err := ls.CarryWith(a, b, Spec{Splice: splice}); !errors.Is(err, ErrClosed) {
			t.Errorf("Carry after Close = %v, want ErrClosed", err)
		}
	})
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before, %d after", before, after)
	}
}

// When the second descriptor cannot be duplicated (EMFILE), Carry fails and leaves both conns usable and
// nothing open.
func TestCarryOutOfDescriptors(t *testing.T) {
	ls := startLoops(t, Options{Loops: 1})
	peerA, a := tcpPair(t, nil)
	b, peerB := tcpPair(t, nil)
	before := openFDs(t)
	fdlimit.WithDescriptorsLeft(t, 1, func() {
		_, err := ls.Carry(a, b, nil, nil, nil)
		if !errors.Is(err, unix.EMFILE) {
			t.Errorf("Carry with one descriptor left = %v, want EMFILE", err)
		}
	})
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before the failed Carry, %d after", before, after)
	}
	for _, p := range [][2]*net.TCPConn{{peerA, a}, {b, peerB}} {
		if _, err := p[0].Write([]byte("x")); err != nil {
			t.Fatalf("conn unusable after the failed Carry: %v", err)
		}
		got := make([]byte, 1)
		if _, err := io.ReadFull(p[1], got); err != nil {
			t.Fatalf("conn unusable after the failed Carry: %v", err)
		}
	}
}

// When a tunnel's socket cannot be added to the loop's epoll set (ENOSPC at fs.epoll.max_user_watches, ENOMEM),
// that is the relay's failure, not a peer's: Carry fails as it does out of descriptors, leaving both conns
// usable, nothing open, and neither socket in the epoll set.
func TestCarryEpollAddFails(t *testing.T) {
	adds := 0
	epollCtl = func(epfd, op, fd int, ev *unix.EpollEvent) error {
		if op == unix.EPOLL_CTL_ADD {
			if adds++; adds == 2 { // side b's
				return unix.ENOSPC
			}
		}
		return unix.EpollCtl(epfd, op, fd, ev)
	}
	t.Cleanup(func() { epollCtl = unix.EpollCtl }) // after the loops are closed: cleanups run last first
	ls := startLoops(t, Options{Loops: 1})
	peerA, a := tcpPair(t, nil)
	b, peerB := tcpPair(t, nil)
	before := openFDs(t)
	var ends atomic.Int32
	if _, err := ls.Carry(a, b, nil, nil, func(End) { ends.Add(1) }); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Carry with side b's EPOLL_CTL_ADD failing = %v, want ENOSPC", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before the failed Carry, %d after", before, after)
	}
	events := ls.Stats()[0].Events
	for _, p := range [][2]*net.TCPConn{{peerA, a}, {b, peerB}, {a, peerA}, {peerB, b}} {
		if _, err := p[0].Write([]byte("x")); err != nil {
			t.Fatalf("conn unusable after the failed Carry: %v", err)
		}
		_ = p[1].SetReadDeadline(time.Now().Add(testTimeout))
		if _, err := io.ReadFull(p[1], make([]byte, 1)); err != nil {
			t.Fatalf("conn unusable after the failed Carry: %v", err)
		}
	}
	time.Sleep(50 * time.Millisecond) // a loop still watching a socket would have woken by now
	if got := ls.Stats()[0].Events; got != events {
		t.Errorf("the loop saw %d events from the sockets of the failed Carry, want none (still in its epoll set)", got-events)
	}
	if st := ls.Stats()[0]; st.Tunnels != 0 || ends.Load() != 0 {
		t.Errorf("after the failed Carry the loop carries %d tunnels and ended %d, want 0 and 0", st.Tunnels, ends.Load())
	}
}

// Bytes and a FIN that arrived before Carry are carried: the loop hears of them although the readiness
// they raised came before it took the tunnel (the first pass's short read would otherwise wait for an edge
// that never comes, and the FIN would never be read).
func TestCarryFINBeforeCarry(t *testing.T) { forEachMode(t, testCarryFINBeforeCarry) }

func testCarryFINBeforeCarry(t *testing.T, splice bool) {
	ls := startLoops(t, Options{Loops: 1})
	peerA, a := tcpPair(t, nil)
	b, peerB := tcpPair(t, nil)
	if _, err := peerB.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := peerB.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // they have arrived at b
	if _, err := ls.CarryWith(a, b, Spec{Splice: splice}); err != nil {
		t.Fatal(err)
	}
	_ = peerA.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(peerA); err != nil || string(got) != "last words" {
		t.Errorf("side a's peer read %q, then %v; want the bytes, then EOF", got, err)
	}
}

// An idle tunnel holds no buffer, whatever crossed it before: the loops lend buffers only to directions
// with bytes in flight.
func TestIdleTunnelsHoldNoBuffers(t *testing.T) {
	const tunnels = 200
	ls := startLoops(t, Options{Loops: 2})
	for i := range tunnels {
		r := carry(t, ls, []byte("peeked"), nil, nil)
		msg := make([]byte, 100<<10) // more than one buffer's worth, so a buffer is surely borrowed
		go func() { _, _ = r.peerA.Write(msg) }()
		if _, err := io.ReadFull(r.peerB, make([]byte, len(msg)+len("peeked"))); err != nil {
			t.Fatalf("tunnel %d: %v", i, err)
		}
	}
	// The loop gives a buffer back once sendmsg returns, which may be after peerB has the bytes: wait for it.
	for deadline := time.Now().Add(testTimeout); ; time.Sleep(time.Millisecond) {
		var open, buffers int64
		for _, st := range ls.Stats() {
			open += st.Tunnels
			buffers += st.BuffersInUse
		}
		if open == tunnels && buffers == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("loops count %d tunnels and %d buffers in use, want %d and 0", open, buffers, tunnels)
		}
	}
}

// Bytes and LastActive are live: they move while the tunnel carries, before it ends.
func TestHandleCountersAreLive(t *testing.T) { forEachMode(t, testHandleCountersAreLive) }

func testHandleCountersAreLive(t *testing.T, splice bool) {
	ls := startLoops(t, Options{Loops: 1})
	r := carryAs(t, ls, splice, nil, nil, nil)
	started := r.h.LastActive()
	if started.IsZero() || time.Since(started) > testTimeout {
		t.Fatalf("LastActive before any byte = %v, want the tunnel's start", started)
	}
	time.Sleep(10 * time.Millisecond) // the loop's clock must visibly move past the start
	msg := make([]byte, 1000)
	if _, err := r.peerA.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(r.peerB, msg); err != nil {
		t.Fatal(err)
	}
	// The loop counts a write once sendmsg returns, which may be after peerB has the bytes.
	for deadline := time.Now().Add(testTimeout); ; time.Sleep(time.Millisecond) {
		aToB, bToA := r.h.Bytes()
		if aToB == 1000 && bToA == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Bytes = %d, %d, want 1000, 0", aToB, bToA)
		}
	}
	if !r.h.LastActive().After(started) {
		t.Errorf("LastActive = %v after bytes moved, not after the start %v", r.h.LastActive(), started)
	}
	if n := r.h.Unsent(); n != 0 {
		t.Errorf("Unsent = %d with everything delivered, want 0", n)
	}
}

// TestBusyLoopPassesThroughTheScheduler checks that a loop kept busy for several yieldEvery periods passes
// through Go's scheduler (yield): a loop goroutine that never does is preempted and loses its P to sysmon
// over and over while it waits in epoll_wait.
func TestBusyLoopPassesThroughTheScheduler(t *testing.T) {
	ls := startLoops(t, Options{Loops: 1})
	r := carry(t, ls, nil, nil, nil)
	msg := make([]byte, 64)
	// Round trips until the loop's clock has covered four periods: each wakes the loop at least once.
	for start := time.Now(); time.Since(start) < 4*yieldEvery; {
		for _, ends := range [][2]*net.TCPConn{{r.peerA, r.peerB}, {r.peerB, r.peerA}} {
			if _, err := ends[0].Write(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(ends[1], msg); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := ls.loops[0].yields.Load(); n < 2 {
		t.Errorf("the loop yielded %d times over four yield periods of traffic, want at least 2", n)
	}
}
