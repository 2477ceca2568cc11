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

	"golang.org/x/sys/unix"
)

// A reader that stops makes the writer stop on a spliced tunnel too: the stalled direction holds one pipe
// (and no buffer) and splices no more from its source, so what the writer got accepted is bounded by the
// socket buffers on the way plus one pipe. Once the reader resumes every byte arrives in order and the pipe
// goes back to the pool, empty.
func TestSpliceStoppedReaderHoldsOnePipe(t *testing.T) {
	const pipeSize = 16 << 10
	ls := startLoops(t, Options{Loops: 1, PipeSize: pipeSize})
	r := carryAs(t, ls, true, nil, nil, smallBuffers)
	accepted := fillUntilStalled(t, r, newStream(7))
	if bound := socketBuffers(t, r) + pipeSize; accepted > bound {
		t.Fatalf("writer got %d bytes accepted with its reader stopped, more than socket buffers + one pipe = %d",
			accepted, bound)
	}
	if st := ls.Stats()[0]; st.PipesInUse != 1 || st.BuffersInUse != 0 || r.h.Unsent() == 0 || r.h.Unsent() > pipeSize {
		t.Errorf("stalled direction: %d pipes and %d buffers lent, %d bytes unsent; want 1 pipe, no buffer, "+
			"1 to %d bytes", st.PipesInUse, st.BuffersInUse, r.h.Unsent(), pipeSize)
	}
	if err := r.peerA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := checkStream(r.peerB, newStream(7), int(accepted)); err != nil {
		t.Fatalf("after the reader resumed: %v", err)
	}
	waitStats(t, ls, "the drained pipe back in the pool", func(st LoopStats) bool {
		return st.PipesInUse == 0 && st.PipesFree >= 1
	})
}

// waitStats waits until loop 0's counters satisfy ok: the loop gives a pipe back once splice returns, which
// may be after the peer has the bytes.
func waitStats(t *testing.T, ls *Loops, what string, ok func(LoopStats) bool) LoopStats {
	t.Helper()
	for deadline := time.Now().Add(testTimeout); ; time.Sleep(time.Millisecond) {
		st := ls.Stats()[0]
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: loop counters %+v", what, st)
		}
	}
}

// An idle spliced tunnel holds its two sockets and nothing else, whatever crossed it before: no pipe, no
// buffer, and the loop keeps at most KeepPipes empty pipes for all its tunnels.
func TestSpliceIdleTunnelsHoldNoPipes(t *testing.T) {
	const tunnels, keep = 50, 4
	ls := startLoops(t, Options{Loops: 1, KeepPipes: keep})
	before := openFDs(t)
	for i := range tunnels {
		r := carryAs(t, ls, true, []byte("peeked"), nil, nil)
		msg := make([]byte, 200<<10) // more than one pipe's worth
		go func() { _, _ = r.peerA.Write(msg) }()
		if _, err := io.ReadFull(r.peerB, make([]byte, len(msg)+len("peeked"))); err != nil {
			t.Fatalf("tunnel %d: %v", i, err)
		}
	}
	st := waitStats(t, ls, "every pipe back", func(st LoopStats) bool {
		return st.Tunnels == tunnels && st.PipesInUse == 0 && st.BuffersInUse == 0
	})
	if st.PipesFree > keep {
		t.Errorf("the loop keeps %d empty pipes, want at most KeepPipes = %d", st.PipesFree, keep)
	}
	// Each tunnel's two peers and the loop's two sockets live in this process: 4 descriptors a tunnel.
	if got, want := openFDs(t)-before, 4*tunnels+2*int(st.PipesFree); got != want {
		t.Errorf("%d idle spliced tunnels hold %d descriptors, want %d (4 sockets each, 2 per pooled pipe)",
			tunnels, got, want)
	}
}

// A direction that cannot have a pipe (out of descriptors, or the user's pipe allowance spent) reads into a
// buffer instead, as a copy tunnel does: the stream stays byte-exact, nothing is reset, no peer is blamed, and
// it splices again once pipes can be had.
func TestSplicePipeUnavailableReadsIntoBuffers(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	ls := startLoops(t, Options{Loops: 1, NewPipe: func(size int) (int, int, error) {
		if failing.Load() {
			return -1, -1, fmt.Errorf("pipe2: %w", unix.EMFILE)
		}
		return newPipe(size)
	}})
	runSpliced(t, ls, 4)
	st := ls.Stats()[0]
	if st.PipeFailures == 0 || st.PipesInUse != 0 || st.PipesFree != 0 || st.BuffersInUse != 0 {
		t.Errorf("loop counters %+v: want pipe failures counted, no pipe made, no buffer lent at the end", st)
	}
	failing.Store(false)
	runSpliced(t, ls, 1)
	if after := ls.Stats()[0]; after.PipeFailures != st.PipeFailures || after.PipesFree == 0 {
		t.Errorf("loop counters %+v once pipes can be had: want no new failure, and pipes made", after)
	}
}

// runSpliced carries n spliced tunnels on ls at once, sends 1 MiB each way on each after a peeked prefix,
// and checks every stream arrives whole and every tunnel ends closed.
func runSpliced(t *testing.T, ls *Loops, n int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 4*n)
	rigs := make([]*rig, n)
	for i := range rigs {
		rigs[i] = carryAs(t, ls, true, []byte("peeked"), nil, nil)
	}
	for i, r := range rigs {
		seed := uint64(i) * 10
		wg.Add(4)
		go func() { defer wg.Done(); errs <- sendAndClose(r.peerA, newStream(seed+1), 1<<20, seed+3) }()
		go func() { defer wg.Done(); errs <- sendAndClose(r.peerB, newStream(seed+2), 1<<20, seed+4) }()
		go func() { defer wg.Done(); errs <- checkStreamAfter(r.peerB, []byte("peeked"), newStream(seed+1), 1<<20) }()
		go func() { defer wg.Done(); errs <- checkStream(r.peerA, newStream(seed+2), 1<<20) }()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for i, r := range rigs {
		if e := r.end(t); e.Reason != ReasonClosed || e.Unsent != 0 {
			t.Errorf("tunnel %d: end = %+v, want closed with nothing unsent", i, e)
		}
	}
}

// sendAndClose writes n bytes of s to c in chunks drawn from chunkSeed, then its FIN.
func sendAndClose(c *net.TCPConn, s *stream, n int, chunkSeed uint64) error {
	if err := writeStream(c, s, n, chunkSeed); err != nil {
		return err
	}
	return c.CloseWrite()
}

// checkStreamAfter reads first from r, then checks the rest is n bytes of s up to EOF.
func checkStreamAfter(r io.Reader, first []byte, s *stream, n int) error {
	got := make([]byte, len(first))
	if _, err := io.ReadFull(r, got); err != nil || string(got) != string(first) {
		return fmt.Errorf("first bytes: read %q, %v; want %q", got, err, first)
	}
	return checkStream(r, s, n)
}

// Detach of a spliced tunnel whose pipe holds bytes hands those bytes over as Pending, after the bytes the
// destination already has and before those still in the source socket: carried on from the detached
// descriptors, the stream arrives whole and in order. The pipe goes back to the pool empty.
func TestSpliceDetachHandsOverThePipesBytes(t *testing.T) {
	ls := startLoops(t, Options{Loops: 1, PipeSize: 16 << 10})
	r := carryAs(t, ls, true, nil, nil, smallBuffers)
	accepted := fillUntilStalled(t, r, newStream(5))
	if st := ls.Stats()[0]; st.PipesInUse != 1 || r.h.Unsent() == 0 {
		t.Fatalf("stalled tunnel: %d pipes lent, %d bytes unsent; want bytes in its one pipe", st.PipesInUse, r.h.Unsent())
	}
	inPipe := r.h.Unsent()
	var a, b *os.File
	d, err := r.h.Detach(func(afd, bfd int) error {
		a, b = os.NewFile(uintptr(afd), "a"), os.NewFile(uintptr(bfd), "b")
		return nil
	})
	if err != nil {
		t.Fatalf("Detach: %v", err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	if int64(len(d.Pending[0])) != inPipe || len(d.Pending[1]) != 0 {
		t.Fatalf("Pending = %d and %d bytes, want the %d bytes the pipe held a→b and none b→a",
			len(d.Pending[0]), len(d.Pending[1]), inPipe)
	}
	if st := ls.Stats()[0]; st.PipesInUse != 0 || st.PipesFree == 0 || st.Tunnels != 0 {
		t.Errorf("after Detach the loop counts %+v, want the pipe back in the pool and no tunnel", st)
	}
	// Carry on in userspace: the pending bytes first, then what is left in a's socket.
	if err := r.peerA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		if _, err := b.Write(d.Pending[0]); err != nil {
			done <- err
			return
		}
		if _, err := io.Copy(b, a); err != nil {
			done <- err
			return
		}
		done <- unix.Shutdown(int(b.Fd()), unix.SHUT_WR)
	}()
	if err := checkStream(r.peerB, newStream(5), int(accepted)); err != nil {
		t.Fatalf("a→b across the Detach: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("carry on after Detach: %v", err)
	}
}

// A tunnel that ends while its pipe holds bytes closes that pipe rather than pooling it: a pooled pipe with
// bytes would deliver them to the next tunnel that borrows it.
func TestSpliceEndWithBytesInPipeClosesIt(t *testing.T) {
	ls := startLoops(t, Options{Loops: 1, PipeSize: 16 << 10})
	before := openFDs(t)
	t.Run("tunnel", func(t *testing.T) {
		r := carryAs(t, ls, true, nil, nil, smallBuffers)
		fillUntilStalled(t, r, newStream(3))
		inPipe, pooled := r.h.Unsent(), ls.Stats()[0].PipesFree // b→a may have pooled a pipe it found no bytes for
		r.h.Close(true)
		if e := r.end(t); e.Reason != ReasonLocalAbort || e.Unsent != inPipe || inPipe == 0 {
			t.Errorf("end = %+v, want local abort with the %d bytes in the pipe unsent", e, inPipe)
		}
		if st := ls.Stats()[0]; st.PipesInUse != 0 || st.PipesFree != pooled {
			t.Errorf("after the end the loop counts %+v, want no pipe lent, and the %d pooled before only", st, pooled)
		}
	})
	if got, want := openFDs(t)-before, 2*int(ls.Stats()[0].PipesFree); got != want {
		t.Errorf("%d descriptors more open after the tunnel than before, want %d (the pooled pipes')", got, want)
	}
}

// The bytes behind an urgent byte (MSG_OOB) cross, as a read through a buffer carries them: a splice stops at
// the urgent mark (EAGAIN on a nonblocking socket, 0 once the FIN is in), so a spliced direction that trusted
// it would carry "hello", then the FIN, and lose "world".
func TestCarryBytesAfterUrgentByte(t *testing.T) { forEachMode(t, testCarryBytesAfterUrgentByte) }

func testCarryBytesAfterUrgentByte(t *testing.T, splice bool) {
	ls := startLoops(t, Options{Loops: 1})
	r := carryAs(t, ls, splice, nil, nil, nil)
	sendAroundUrgentByte(t, r.peerA)
	time.Sleep(50 * time.Millisecond) // the loop has met the mark before the FIN comes
	if err := r.peerA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(r.peerB); err != nil || string(got) != "helloworld" {
		t.Errorf("side b's peer read %q, then %v; want \"helloworld\" (the urgent byte left out), then EOF", got, err)
	}
}

// Bytes queued behind an urgent mark before the loop reads at all: the read stops short at the mark, and a
// short read must not be taken for an empty socket there, or the bytes behind it wait for the peer's next
// segment (a request and response protocol would deadlock).
func TestCarryBytesQueuedBehindUrgentMark(t *testing.T) {
	forEachMode(t, testCarryBytesQueuedBehindUrgentMark)
}

func testCarryBytesQueuedBehindUrgentMark(t *testing.T, splice bool) {
	ls, l := manualLoop(t, Options{})
	events := make([]unix.EpollEvent, maxEvents)
	r := carryAs(t, ls, splice, nil, nil, nil)
	wake := func() { l.send(command{kind: cmdProgress, t: r.h.t, progress: make(chan uint64, 1)}) }
	for l.tunnels.Load() < 1 {
		wake()
		l.pass(events)
	}
	sendAroundUrgentByte(t, r.peerA)
	time.Sleep(50 * time.Millisecond) // all of it is queued at side a before the loop reads
	for range 5 {
		l.pass(events)
		wake() // a wakeup that is no socket's: the loop gets no new edge for side a
	}
	if aToB, _ := r.h.Bytes(); aToB != int64(len("helloworld")) {
		t.Fatalf("a→b carried %d bytes, want %d (the urgent byte left out)", aToB, len("helloworld"))
	}
}

// sendAroundUrgentByte sends "hello", the urgent byte "X" (MSG_OOB) and "world" on c, in that order.
func sendAroundUrgentByte(t *testing.T, c *net.TCPConn) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	var oobErr error
	if err := raw.Control(func(fd uintptr) { oobErr = unix.Sendto(int(fd), []byte("X"), unix.MSG_OOB, nil) }); err != nil {
		t.Fatal(err)
	}
	if oobErr != nil {
		t.Fatalf("send the urgent byte: %v", oobErr)
	}
	if _, err := c.Write([]byte("world")); err != nil {
		t.Fatal(err)
	}
}

// A Detach that cannot read a pipe's bytes back whole ends the tunnel with a reset: the bytes it read back
// before the failure are gone with the attempt, so carrying on (or handing over) would leave a hole in the
// stream that the peer would take for a whole one.
func TestSpliceDetachDrainFailureResets(t *testing.T) {
	t.Cleanup(func() { readPipe = unix.Read }) // after the loops have closed
	var reads atomic.Int32
	readPipe = func(fd int, b []byte) (int, error) {
		if reads.Add(1) > 1 {
			return 0, unix.EIO
		}
		return unix.Read(fd, b[:min(len(b), 100)])
	}
	ls := startLoops(t, Options{Loops: 1, PipeSize: 16 << 10})
	r := carryAs(t, ls, true, nil, nil, smallBuffers)
	fillUntilStalled(t, r, newStream(11))
	if r.h.Unsent() <= 100 {
		t.Fatalf("stalled tunnel holds %d bytes, want more than the 100 the first read takes back", r.h.Unsent())
	}
	_, err := r.h.Detach(func(afd, bfd int) error {
		unix.Close(afd)
		unix.Close(bfd)
		return errors.New("take was called")
	})
	if !errors.Is(err, ErrEnded) || !errors.Is(err, unix.EIO) {
		t.Fatalf("Detach with a pipe that cannot be read back: %v, want ErrEnded with the read's EIO", err)
	}
	select {
	case e := <-r.ends:
		if e.Reason != ReasonError {
			t.Errorf("end = %+v, want an error", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the tunnel did not end after its pipe could not be read back")
	}
	if err := readUntilError(r.peerB); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("side b's peer read ended with %v, want ECONNRESET", err)
	}
}
