package eventloop

import (
	"io"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// manualLoop returns Loops of one loop that no goroutine runs: the test runs its passes itself (loop.pass),
// so what one pass does can be checked by counts, with no timing. Cleanup stops the loop.
func manualLoop(t *testing.T, opts Options) (*Loops, *loop) {
	t.Helper()
	opts.Loops = 1
	opts, err := opts.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	l, err := newLoop(0, opts)
	if err != nil {
		t.Fatalf("new loop: %v", err)
	}
	t.Cleanup(l.stop)
	return &Loops{loops: []*loop{l}, bufSize: opts.BufSize, pipeSize: opts.PipeSize}, l
}

// TestPassServesChattyBeforeBulk: a bulk tunnel whose source always holds more than a pass may take shares a
// loop with a chatty tunnel. The chatty message that arrives while the bulk tunnel waits for its next pass is
// carried first, before the bulk tunnel moves another byte, and the bulk direction then moves no more than
// its budget (passBytes, overshot by at most one read).
func TestPassServesChattyBeforeBulk(t *testing.T) { forEachMode(t, testPassServesChattyBeforeBulk) }

func testPassServesChattyBeforeBulk(t *testing.T, splice bool) {
	const readSize = 16 << 10 // a read takes at most this, so passBytes is several reads
	ls, l := manualLoop(t, Options{BufSize: readSize, PipeSize: readSize})
	events := make([]unix.EpollEvent, maxEvents)

	// The bulk tunnel: peerA writes without pause, peerB reads everything. Large receive buffers let the
	// relay's socket hold a backlog of several budgets.
	bulk := carryAs(t, ls, splice, nil, nil, func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20)
	})
	go func() {
		chunk := make([]byte, 64<<10)
		for {
			if _, err := bulk.peerA.Write(chunk); err != nil {
				return // the test's cleanup closed it
			}
		}
	}()
	go func() { _, _ = io.Copy(io.Discard, bulk.peerB) }()

	// The chatty tunnel notes how far the bulk one had got when its FIN, which follows its message, was carried.
	peerA, a := tcpPair(t, nil)
	b, peerB := tcpPair(t, nil)
	bulkAtFIN := int64(-1)
	chatty, err := ls.CarryWith(a, b, Spec{Splice: splice, OnFIN: func(dir int) {
		if dir == 0 {
			bulkAtFIN, _ = bulk.h.Bytes()
		}
	}})
	if err != nil {
		t.Fatalf("carry the chatty tunnel: %v", err)
	}

	// Passes until both are added and the bulk tunnel has stopped a pass with its budget spent.
	deadline := time.Now().Add(testTimeout)
	for l.tunnels.Load() < 2 || !bulk.h.t.queued {
		if time.Now().After(deadline) {
			t.Fatal("the bulk tunnel never spent a pass's budget")
		}
		l.pass(events)
	}
	// Its source holds more than a budget and a read: a pass without one would read it all.
	for backlog := 0; backlog < passBytes+2*readSize; {
		if time.Now().After(deadline) {
			t.Fatalf("the bulk source holds %d bytes, want %d", backlog, passBytes+2*readSize)
		}
		time.Sleep(time.Millisecond)
		backlog, _ = unix.IoctlGetInt(int(bulk.h.t.ends[0].fd), unix.SIOCINQ)
	}

	msg := []byte("ping")
	if _, err := peerA.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := peerA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	before, _ := bulk.h.Bytes()
	l.pass(events)
	after, _ := bulk.h.Bytes()

	if sent, _ := chatty.Bytes(); sent != int64(len(msg)) || bulkAtFIN < 0 {
		t.Fatalf("the pass carried %d of the chatty message's %d bytes (FIN carried: %v)", sent, len(msg),
			bulkAtFIN >= 0)
	}
	if bulkAtFIN != before {
		t.Errorf("the bulk tunnel moved %d bytes in the pass before the chatty message was carried, want 0",
			bulkAtFIN-before)
	}
	if moved := after - before; moved == 0 || moved >= passBytes+readSize {
		t.Errorf("the bulk tunnel moved %d bytes in one pass, want some and under %d (passBytes and one read)",
			moved, passBytes+readSize)
	}
	got := make([]byte, len(msg)+1)
	_ = peerB.SetReadDeadline(time.Now().Add(testTimeout))
	if n, err := io.ReadAtLeast(peerB, got, len(msg)); err != nil || string(got[:n]) != string(msg) {
		t.Fatalf("chatty peer got %q, %v; want %q", got[:n], err, msg)
	}
}
