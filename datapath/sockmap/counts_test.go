package sockmap

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// TestCounts: what auto's policy reads of a pair (Pair.Counts), on the kernel (the verdict's counters) and
// on the event loop after a move (its own), each from 0 on its engine: bytes, and one segment per message
// when messages do not overlap.
func TestCounts(t *testing.T) {
	requireSockmap(t)
	k, _ := newTestEngine(t)
	loops, err := datapath.StartEventLoop(eventloop.Options{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loops.Close() })
	client, up, p := carryPair(t, k)
	_ = kernelDirOf(t, k, true)
	exchange := func(from, to *net.TCPConn, size, times int) {
		t.Helper()
		msg, got := make([]byte, size), make([]byte, size)
		for range times {
			if _, err := from.Write(msg); err != nil {
				t.Fatal(err)
			}
			_ = to.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(to, got); err != nil {
				t.Fatal(err)
			}
		}
	}
	exchange(client, up, 100, 3)
	exchange(up, client, 40, 2)
	c, kernelCarrier, ok := p.Counts()
	if want := (datapath.Counts{Dirs: [2]datapath.DirCounts{{Bytes: 300, Segments: 3}, {Bytes: 80, Segments: 2}}}); !ok || c != want {
		t.Errorf("kernel counts %+v (ok %v), want %+v: 300 bytes in 3 segments up, 80 in 2 down", c, ok, want)
	}

	if err := datapath.Move(p, loops); err != nil {
		t.Fatal(err)
	}
	c, loopCarrier, ok := p.Counts()
	if !ok || c != (datapath.Counts{}) || loopCarrier == kernelCarrier {
		t.Errorf("counts just after the move %+v (ok %v, same carrier %v), want 0 from a new carrier", c, ok, loopCarrier == kernelCarrier)
	}
	exchange(up, client, 1000, 4)
	// The loop counts a write once sendmsg has returned, which can be after the reader has the bytes.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		c, _, _ = p.Counts()
		if c == (datapath.Counts{Dirs: [2]datapath.DirCounts{{}, {Bytes: 4000, Segments: 4}}}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("loop counts %+v, want 4000 bytes in 4 segments down, nothing up", c)
		}
	}
	p.End(datapath.ReasonShutdown, true)
	if _, _, ok := p.Counts(); ok {
		t.Error("an ended pair has counts")
	}
}

// TestReadCounts: once a sampler has read every socket's counters at once (ReadCounts), a pair's Counts
// are what that read saw, with no map lookup of their own: bytes sent after it show only after the next
// ReadCounts.
func TestReadCounts(t *testing.T) {
	requireSockmap(t)
	k, _ := newTestEngine(t)
	client, up, p := carryPair(t, k)
	_ = kernelDirOf(t, k, true)
	send := func(size int) {
		t.Helper()
		msg, got := make([]byte, size), make([]byte, size)
		if _, err := client.Write(msg); err != nil {
			t.Fatal(err)
		}
		_ = up.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(up, got); err != nil {
			t.Fatal(err)
		}
	}
	send(100)
	if err := k.ReadCounts(); err != nil {
		t.Fatal(err)
	}
	send(50)
	if c, _, ok := p.Counts(); !ok || c.Dirs[0] != (datapath.DirCounts{Bytes: 100, Segments: 1}) {
		t.Errorf("counts after ReadCounts and 50 more bytes %+v (ok %v), want the 100 bytes ReadCounts read", c, ok)
	}
	if err := k.ReadCounts(); err != nil {
		t.Fatal(err)
	}
	if c, _, ok := p.Counts(); !ok || c.Dirs[0] != (datapath.DirCounts{Bytes: 150, Segments: 2}) {
		t.Errorf("counts after the next ReadCounts %+v (ok %v), want 150 bytes in 2 segments", c, ok)
	}
}
