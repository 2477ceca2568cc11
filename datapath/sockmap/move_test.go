package sockmap

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// TestMoveCopyToSockmap hands a live pair from the copy engine to the kernel engine in the middle of 8 MiB
// each way (bytes of the first MiB still in flight), then back to copy at 2 MiB, with bytes in flight both
// ways. Every byte arrives once, in order, each FIN after the last byte before it; the pair ends as closed,
// on copy, and the maps are left empty.
func TestMoveCopyToSockmap(t *testing.T) {
	requireSockmap(t)
	k, _ := newTestEngine(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client, relayClient, relayUp, up := tunnelEnds(t)
	const size = 8 << 20
	toUp, toClient := stream(11, size), stream(12, size)
	p := datapath.NewPair(datapath.Copy, datapath.Endpoint{Conn: relayClient, Peeked: toUp[:100]},
		datapath.Endpoint{Conn: relayUp, Peeked: toClient[:100]}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	datapath.Copier{}.Carry(p)

	// Each side sends its first MiB, then waits for the move: a source that keeps its receive queue full
	// through the handoff would run on copy instead (busy_at_handoff), which is not what this tests.
	moved, movedBack := make(chan struct{}), make(chan struct{})
	var moveOnce, backOnce sync.Once
	onProgress := func(read int) {
		switch {
		case read >= 2<<20:
			// On a goroutine of its own: the kernel engine gives the pair back once the bytes it
			// redirected are in the client's socket, which may wait for this reader to read.
			backOnce.Do(func() {
				go func() {
					defer close(movedBack)
					if _, err := moveRetrying(p, datapath.Copier{}); err != nil {
						t.Errorf("move back to copy: %v", err)
					}
					if p.Kind() != datapath.Copy {
						t.Errorf("after the move back the pair runs on %s", p.Kind())
					}
				}()
			})
		case read >= 1<<20:
			moveOnce.Do(func() {
				if err := datapath.Move(p, k); err != nil {
					t.Errorf("move to sockmap: %v", err)
				}
				if p.Kind() != datapath.Sockmap {
					t.Errorf("after the move the pair runs on %s", p.Kind())
				}
				close(moved)
			})
		}
	}
	errs := make(chan error, 4)
	var wg sync.WaitGroup
	for _, e := range []struct {
		name      string
		conn      *net.TCPConn
		send, exp []byte
	}{{"client", client, toUp, toClient}, {"upstream", up, toClient, toUp}} {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_ = e.conn.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err := e.conn.Write(e.send[100 : 1<<20]); err != nil {
				errs <- fmt.Errorf("%s write: %w", e.name, err)
				return
			}
			select {
			case <-moved:
			case <-ctx.Done():
				return
			}
			if _, err := e.conn.Write(e.send[1<<20:]); err != nil {
				errs <- fmt.Errorf("%s write: %w", e.name, err)
				return
			}
			// Half-closed only once back on copy: on sockmap both FINs could be carried, and the pair
			// end, before the move back.
			select {
			case <-movedBack:
			case <-ctx.Done():
				return
			}
			if err := e.conn.CloseWrite(); err != nil {
				errs <- fmt.Errorf("%s half-close: %w", e.name, err)
			}
		}()
		go func() {
			defer wg.Done()
			got := make([]byte, 0, len(e.exp))
			buf := make([]byte, 64<<10)
			for {
				n, err := e.conn.Read(buf)
				got = append(got, buf[:n]...)
				if e.name == "client" {
					onProgress(len(got))
				}
				if err == io.EOF {
					break
				}
				if err != nil {
					errs <- fmt.Errorf("%s read %d of %d bytes, then: %w", e.name, len(got), len(e.exp), err)
					return
				}
			}
			if d := diffStreams(got, e.exp); d != "" {
				errs <- fmt.Errorf("%s received a wrong stream: %s", e.name, d)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	select {
	case <-movedBack:
	case <-ctx.Done():
		t.Fatal("the move back to copy did not return")
	}
	select {
	case <-p.Done():
	case <-ctx.Done():
		t.Fatal("the pair did not end after both sides half-closed")
	}
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	if got := p.Kind(); got != datapath.Copy {
		t.Errorf("the pair ended on %s, want copy", got)
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("timed out")
	}
	assertMapsEmpty(t, k)
}

// TestMoveEventLoopToSockmap hands a live pair from the copy datapath's event loop to the kernel engine
// between two MiB of each stream: every byte arrives once and in order, each FIN after the last byte, and the
// pair ends closed on sockmap with the maps left empty.
func TestMoveEventLoopToSockmap(t *testing.T) {
	requireSockmap(t)
	for _, splice := range []bool{false, true} {
		t.Run(map[bool]string{false: "copy", true: "splice"}[splice], func(t *testing.T) {
			testMoveEventLoopToSockmap(t, splice)
		})
	}
}

// testMoveEventLoopToSockmap is TestMoveEventLoopToSockmap from the event loop's copy engine, or from its
// splice engine (EventLoop.Splice).
func testMoveEventLoopToSockmap(t *testing.T, splice bool) {
	k, _ := newTestEngine(t)
	loops, err := datapath.StartEventLoop(eventloop.Options{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loops.Close() })
	from := loops
	if splice {
		from = loops.Splice()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, relayClient, relayUp, up := tunnelEnds(t)
	const half = 1 << 20
	toUp, toClient := stream(21, 2*half), stream(22, 2*half)
	p := datapath.NewPair(from.Kind(), datapath.Endpoint{Conn: relayClient, Peeked: toUp[:100]},
		datapath.Endpoint{Conn: relayUp, Peeked: toClient[:100]}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	from.Carry(p)

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
	if got := p.Kind(); got != datapath.Sockmap {
		t.Fatalf("after the move the pair runs on %s", got)
	}
	phase(half, 2*half, true)
	select {
	case <-p.Done():
	case <-ctx.Done():
		t.Fatal("the pair did not end after both sides half-closed")
	}
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	if up, down := p.Bytes(); up != 2*half || down != 2*half {
		t.Errorf("counted %d and %d bytes, want %d each", up, down, 2*half)
	}
	assertMapsEmpty(t, k)
}
