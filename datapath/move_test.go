package datapath_test

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// loopbackPair returns both ends of a fresh TCP connection on 127.0.0.1, closed at the test's end.
func loopbackPair(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	c, a := dialLoopback(t)
	t.Cleanup(func() { c.Close(); a.Close() })
	return c, a
}

// dialLoopback returns both ends of a fresh TCP connection on 127.0.0.1; closing them is the caller's.
func dialLoopback(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a, err := l.(*net.TCPListener).AcceptTCP()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c.(*net.TCPConn), a
}

// stream returns n pseudo-random bytes, the same for the same seed.
func stream(seed uint64, n int) []byte {
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(key).Read(b)
	return b
}

// diffStreams says where got and want first differ.
func diffStreams(got, want []byte) string {
	if bytes.Equal(got, want) {
		return ""
	}
	n := min(len(got), len(want))
	for i := range n {
		if got[i] != want[i] {
			return fmt.Sprintf("got %d bytes, want %d; first difference at byte %d", len(got), len(want), i)
		}
	}
	return fmt.Sprintf("got %d bytes, want %d; equal over the first %d", len(got), len(want), n)
}

// tunnel is a pair between a client and an upstream on loopback, with what each side is to send.
type tunnel struct {
	client, upstream *net.TCPConn // the peers' ends
	pair             *datapath.Pair
	toUpstream       []byte // peeked bytes first, then what the client sends
	toClient         []byte
}

// newTunnel makes a pair whose endpoints already hold peeked bytes (the first 100 of each stream), as a
// handshake leaves them.
func newTunnel(t testing.TB, kind datapath.Kind, size int) *tunnel {
	client, relayClient := loopbackPair(t)
	relayUp, upstream := loopbackPair(t)
	tn := &tunnel{client: client, upstream: upstream, toUpstream: stream(1, size), toClient: stream(2, size)}
	tn.pair = datapath.NewPair(kind, datapath.Endpoint{Conn: relayClient, Peeked: tn.toUpstream[:100]},
		datapath.Endpoint{Conn: relayUp, Peeked: tn.toClient[:100]}, nil)
	t.Cleanup(func() { tn.pair.End("test_over", true) })
	return tn
}

// exchange sends both streams (the client's FIN first, the upstream's only once the client has read
// part of its stream, so that moves happen while one direction is half-closed) and checks that each side
// reads exactly the other's stream and then EOF. Each side calls move after every MiB it reads, with bytes
// in flight both ways. It returns once both sides have read everything.
func (tn *tunnel) exchange(t *testing.T, move func()) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	var moving sync.Mutex
	halfRead := make(chan struct{})
	send := func(c *net.TCPConn, data []byte, wait <-chan struct{}) {
		defer wg.Done()
		_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		for off := 100; off < len(data); off += 64 << 10 {
			if off >= len(data)/2 && wait != nil {
				select {
				case <-wait:
				case <-time.After(30 * time.Second):
					errs <- fmt.Errorf("the other side never read half its stream")
					return
				}
			}
			if _, err := c.Write(data[off:min(off+64<<10, len(data))]); err != nil {
				errs <- fmt.Errorf("write: %w", err)
				return
			}
		}
		if err := c.CloseWrite(); err != nil {
			errs <- fmt.Errorf("half-close: %w", err)
		}
	}
	recv := func(name string, c *net.TCPConn, want []byte, half chan struct{}) {
		defer wg.Done()
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		got := make([]byte, 0, len(want))
		buf := make([]byte, 32<<10)
		next := 1 << 20
		for {
			n, err := c.Read(buf)
			got = append(got, buf[:n]...)
			if len(got) >= next {
				next += 1 << 20
				moving.Lock()
				move()
				moving.Unlock()
			}
			if half != nil && len(got) >= len(want)/2 {
				close(half)
				half = nil
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				errs <- fmt.Errorf("%s read %d of %d bytes, then: %w", name, len(got), len(want), err)
				return
			}
		}
		if d := diffStreams(got, want); d != "" {
			errs <- fmt.Errorf("%s received a wrong stream: %s", name, d)
		}
	}
	wg.Add(4)
	go send(tn.client, tn.toUpstream, nil)
	go send(tn.upstream, tn.toClient, halfRead)
	go recv("upstream", tn.upstream, tn.toUpstream, nil)
	go recv("client", tn.client, tn.toClient, halfRead)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("the exchange did not finish (a move that never returned?)")
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestMove hands a live pair back and forth between two engines (the copy engine on goroutines, the event
// loop, splice on the event loop) while both directions carry 8 MiB (a move
// after each MiB either side reads), the client half-closing first: every byte arrives once, in order, each FIN after the last byte before it,
// and the pair ends as closed.
func TestMove(t *testing.T) {
	copier, loop := datapath.Copier{}, startEventLoop(t)
	splicer := loop.Splice()
	for _, tc := range []struct {
		name     string
		from, to datapath.Engine
	}{
		{"copy-splice", copier, splicer}, {"splice-copy", splicer, copier},
		{"eventloop-splice", loop, splicer}, {"splice-eventloop", splicer, loop},
		{"eventloop-copy", loop, copier}, {"copy-eventloop", copier, loop},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tn := newTunnel(t, tc.from.Kind(), 8<<20)
			fds, pooled := openFDs(t), loop.Stats().Loops[0].PipesFree
			tc.from.Carry(tn.pair)
			moves, engines := 0, []datapath.Engine{tc.to, tc.from}
			tn.exchange(t, func() {
				next := engines[moves%2]
				switch err := datapath.Move(tn.pair, next); {
				case err == nil:
					moves++
					if got := tn.pair.Kind(); got != next.Kind() {
						t.Errorf("after a move to %s the pair's kind is %s", next.Kind(), got)
					}
				case tn.pair.Ending():
				default:
					t.Errorf("move to %s: %v", next.Kind(), err)
				}
			})
			select {
			case <-tn.pair.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the pair did not end after both sides half-closed")
			}
			if tn.pair.Reason() != datapath.ReasonClosed {
				t.Errorf("the pair ended with %q (%v), want %q", tn.pair.Reason(), tn.pair.Err(), datapath.ReasonClosed)
			}
			up, down := tn.pair.Bytes()
			if up != uint64(len(tn.toUpstream)) || down != uint64(len(tn.toClient)) {
				t.Errorf("counted %d and %d bytes, want %d each", up, down, len(tn.toUpstream))
			}
			// The relay's two sockets are closed, and nothing a move made is left open but the empty pipes
			// the loop keeps for reuse.
			waitOpenFDs(t, fds-2+2*int(loop.Stats().Loops[0].PipesFree-pooled))
			// The client's moves at 1 to 4 MiB come before the upstream sends its second half, so the
			// pair is live for them whatever the timing; later ones may find it ended.
			if moves < 4 {
				t.Errorf("the pair moved %d times during the exchange, want at least 4", moves)
			}
		})
	}
}

// TestMoveRefused: a pair stays where it is when the engine it is to move to does not accept its
// endpoints (TLS on splice).
func TestMoveRefused(t *testing.T) {
	tn := newTunnel(t, datapath.Copy, 1<<10)
	client, up := tn.pair.Client(), tn.pair.Upstream()
	client.TLS = tls.Client(client.Conn, &tls.Config{})
	p := datapath.NewPair(datapath.Copy, client, up, nil)
	splicer := startEventLoop(t).Splice()
	if splicer.Accepts(client, up) {
		t.Fatal("splice accepts a TLS endpoint")
	}
	if err := datapath.Move(p, splicer); err == nil {
		t.Fatal("a TLS pair moved to splice")
	}
	if p.Kind() != datapath.Copy {
		t.Errorf("the refused pair's kind is %s, want copy", p.Kind())
	}
}

// A spliced pair on the event loop whose pipe holds bytes when it moves (its upstream stopped reading) hands
// those bytes to the next engine as peeked bytes, written before anything else the client sent: the upstream
// then reads the client's stream whole and in order, whichever engine carries the pair next.
func TestMoveSplicedWithBytesInPipe(t *testing.T) {
	loop := startEventLoop(t)
	for _, tc := range []struct {
		name string
		to   datapath.Engine
	}{{"copy", datapath.Copier{}}, {"eventloop", loop}, {"splice", loop.Splice()}} {
		t.Run(tc.name, func(t *testing.T) {
			tn := newTunnel(t, datapath.Splice, 32<<20) // more than the socket buffers on the way hold
			loop.Splice().Carry(tn.pair)
			// The upstream does not read: the client writes until the relay stops taking bytes.
			sent := 100
			for sent < len(tn.toUpstream) {
				_ = tn.client.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
				n, err := tn.client.Write(tn.toUpstream[sent:min(sent+16<<10, len(tn.toUpstream))])
				sent += n
				if isTimeout(err) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if sent == len(tn.toUpstream) {
				t.Fatal("the relay took the whole stream from a client whose upstream does not read")
			}
			if st := loop.Stats().Loops[0]; st.PipesInUse != 1 {
				t.Fatalf("the stalled pair's loop lends %d pipes, want 1 (holding bytes)", st.PipesInUse)
			}
			if err := datapath.Move(tn.pair, tc.to); err != nil {
				t.Fatalf("move to %s: %v", tc.name, err)
			}
			// Moved back onto splice, the pair may borrow a pipe again at once for what the client had
			// queued, which its stalled upstream leaves there: only one, never the old one as well.
			want := int64(0)
			if tc.name == "splice" {
				want = 1
			}
			if st := loop.Stats().Loops[0]; st.PipesInUse > want {
				t.Errorf("after the move the loop lends %d pipes, want at most %d", st.PipesInUse, want)
			}
			_ = tn.client.SetWriteDeadline(time.Now().Add(30 * time.Second))
			go func() {
				_, _ = tn.client.Write(tn.toUpstream[sent:])
				_ = tn.client.CloseWrite()
			}()
			got, err := readAllWithin(tn.upstream, 30*time.Second)
			if err != nil || diffStreams(got, tn.toUpstream) != "" {
				t.Fatalf("upstream read %d bytes, %v: %s", len(got), err, diffStreams(got, tn.toUpstream))
			}
		})
	}
}
