package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// TestMoveCopyToSockmap hands a live pair from the copy engine to the kernel engine in the middle of 8 MiB
// each way (bytes of the first MiB still in flight), then asks to move it back, which the kernel engine refuses (it cannot give a pair back
// without dropping what its psock queues hold), leaving the pair where it is. Every byte arrives once,
// in order, each FIN after the last byte before it; the pair ends as closed and the maps are left empty.
func TestMoveCopyToSockmap(t *testing.T) {
	requireSockmap(t)
	k, err := newKernelPath(slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
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
	const size = 8 << 20
	toUp, toClient := stream(11, size), stream(12, size)
	p := datapath.NewPair(datapath.Copy, datapath.Endpoint{Conn: relayClient, Peeked: toUp[:100]},
		datapath.Endpoint{Conn: relayUp, Peeked: toClient[:100]}, nil)
	t.Cleanup(func() { p.End(ReasonShutdown, true) })
	datapath.Copier{}.Carry(p)

	// Each side sends its first MiB, then waits for the move: a source that keeps its receive queue full
	// through the handoff would run on copy instead (busy_at_handoff), which is not what this tests.
	moved := make(chan struct{})
	var moveOnce, refuseOnce sync.Once
	onProgress := func(read int) {
		switch {
		case read >= 2<<20:
			refuseOnce.Do(func() {
				if err := datapath.Move(p, datapath.Copier{}); err == nil {
					t.Error("the kernel engine gave a live pair back; the test expects it cannot yet")
				}
			})
		case read >= 1<<20:
			moveOnce.Do(func() {
				if err := datapath.Move(p, k); err != nil {
					t.Errorf("move to sockmap: %v", err)
				}
				if p.Kind() != DatapathSockmap {
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
	case <-p.Done():
	case <-ctx.Done():
		t.Fatal("the pair did not end after both sides half-closed")
	}
	if p.Reason() != ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), ReasonClosed)
	}
	if got := p.Kind(); got != DatapathSockmap {
		t.Errorf("the pair ended on %s, want sockmap", got)
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("timed out")
	}
	assertMapsEmpty(t, k)
}
