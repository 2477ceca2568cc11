package sockmap

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
	"github.com/sockrelay/sockrelay/loader"
)

// openFDs counts the process's open descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// exchange sends send[from:to] from each end of a pair to the other at once and checks that each reads
// exchange sends send[from:to] from each end of a pair to the other at once and checks that each reads
// exactly what the other sent, the peeked first 100 bytes included when from is 100. move, when set, runs
// on a goroutine of its own once the client has read moveAt bytes of this exchange, while both ends go on
// sending and reading: a move made there happens with bytes in flight both ways (and with readers that
// read, which a kernel pair's passed bytes may wait for). exchange returns once move has.

func exchange(t *testing.T, client, up *net.TCPConn, toUp, toClient []byte, from, to int, moveAt int, move func()) {
	t.Helper()
	var wg sync.WaitGroup
	var once sync.Once
	during := func(read int) {
		if move != nil && read >= moveAt {
			once.Do(func() {
				wg.Add(1)
				go func() {
					defer wg.Done()
					move()
				}()
			})
		}
	}
	for _, s := range []struct {
		name      string
		conn      *net.TCPConn
		send, exp []byte
	}{{"client", client, toUp, toClient}, {"upstream", up, toClient, toUp}} {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_ = s.conn.SetWriteDeadline(time.Now().Add(60 * time.Second))
			if _, err := s.conn.Write(s.send[from:to]); err != nil {
				t.Errorf("%s write: %v", s.name, err)
			}
		}()
		go func() {
			defer wg.Done()
			start := from
			if start == 100 {
				start = 0 // the peeked bytes come first
			}
			want := s.exp[start:to]
			got := make([]byte, 0, len(want))
			buf := make([]byte, 64<<10)
			_ = s.conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			for len(got) < len(want) {
				n, err := s.conn.Read(buf[:min(len(buf), len(want)-len(got))])
				got = append(got, buf[:n]...)
				if s.name == "client" {
					during(len(got))
				}
				if err != nil {
					t.Errorf("%s read %d of %d bytes, then: %v", s.name, len(got), len(want), err)
					return
				}
			}
			if d := diffStreams(got, want); d != "" {
				t.Errorf("%s received a wrong stream: %s", s.name, d)
			}
		}()
	}
	wg.Wait()
}

// halfCloseBoth half-closes both ends of a pair and checks that each then reads EOF. The tests half-close
// only once the pair has moved: on sockmap both FINs could be carried, and the pair end, before the move.
func halfCloseBoth(t *testing.T, client, up *net.TCPConn) {
	t.Helper()
	for _, c := range []*net.TCPConn{client, up} {
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*net.TCPConn{client, up} {
		if got, err := readAllWithin(c, 10*time.Second); len(got) != 0 || err != nil {
			t.Errorf("after the last byte read %d bytes, %v; want EOF", len(got), err)
		}
	}
}

// kernelPairWithPeeked is carryPair with 100 peeked bytes each way, the first of each stream.
func kernelPairWithPeeked(t *testing.T, k *Engine, toUp, toClient []byte) (client, up *net.TCPConn, p *datapath.Pair) {
	t.Helper()
	return carryPairPeeked(t, k, toUp[:100], toClient[:100])
}

// assertEndedClean waits for p to end and checks that it ended closed, on want, having counted size bytes
// each way, that k's maps are empty, and that the descriptors open before the pair are all that is left
// once its ends are closed too.
func assertEndedClean(t *testing.T, k *Engine, p *datapath.Pair, want datapath.Kind, size int, client, up *net.TCPConn, fds int) {
	t.Helper()
	waitEnded(t, p)
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	if got := p.Kind(); got != want {
		t.Errorf("the pair ended on %s, want %s", got, want)
	}
	if u, d := p.Bytes(); u != uint64(size) || d != uint64(size) {
		t.Errorf("counted %d and %d bytes, want %d each", u, d, size)
	}
	assertMapsEmpty(t, k)
	client.Close()
	up.Close()
	// The event loop closes a stopped tunnel's descriptors on its own thread, just after the pair's end.
	for deadline := time.Now().Add(5 * time.Second); openFDs(t) != fds; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("%d descriptors open after the pair ended, %d before it", openFDs(t), fds)
			return
		}
	}
}

// A kernel pair moves to the copy engine (goroutines, or the event loop) in the middle of 8 MiB each way,
// with bytes in flight both ways, some of them redirected, some passed for a slow moment of the reader:
// every byte arrives once and in order, each FIN after the last byte, nothing is reset, the maps are left
// empty and no descriptor is left open.
func TestMoveSockmapToCopy(t *testing.T) {
	for _, tc := range []struct {
		name string
		to   func(t *testing.T) datapath.Engine
	}{
		{"goroutines", func(*testing.T) datapath.Engine { return datapath.Copier{} }},
		{"event loop", func(t *testing.T) datapath.Engine {
			e, err := datapath.StartEventLoop(eventloop.Options{Loops: 1})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { e.Close() })
			return e
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, _ := newTestEngine(t)
			to := tc.to(t)
			fds := openFDs(t)
			const size = 8 << 20
			toUp, toClient := stream(31, size), stream(32, size)
			client, up, p := kernelPairWithPeeked(t, k, toUp, toClient)
			exchange(t, client, up, toUp, toClient, 100, size, 2<<20, func() {
				if _, err := moveRetrying(p, to); err != nil {
					t.Errorf("move from sockmap to copy: %v", err)
				}
			})
			halfCloseBoth(t, client, up)
			assertEndedClean(t, k, p, datapath.Copy, size, client, up, fds)
		})
	}
}

// A pair moves from sockmap to copy with bytes in flight both ways, and back to sockmap between two
// exchanges: ten moves off sockmap and nine back on one pair, every byte arriving once, in order.
func TestMoveSockmapRoundTrips(t *testing.T) {
	k, _ := newTestEngine(t)
	fds := openFDs(t)
	const chunk, rounds = 1 << 20, 10
	size := chunk * rounds
	toUp, toClient := stream(41, size), stream(42, size)
	client, up, p := kernelPairWithPeeked(t, k, toUp, toClient)
	from := 100
	for r := range rounds {
		exchange(t, client, up, toUp, toClient, from, (r+1)*chunk, chunk/2, func() {
			if got := p.Kind(); got != datapath.Sockmap {
				t.Errorf("round %d: the pair runs on %s before the move to copy, want sockmap", r, got)
			}
			if _, err := moveRetrying(p, datapath.Copier{}); err != nil {
				t.Errorf("round %d: move from sockmap to copy: %v", r, err)
			}
		})
		if t.Failed() {
			return
		}
		from = (r + 1) * chunk
		if r == rounds-1 {
			break
		}
		if err := datapath.Move(p, k); err != nil {
			t.Fatalf("round %d: move from copy to sockmap: %v", r, err)
		}
		if got := p.Kind(); got != datapath.Sockmap {
			t.Fatalf("round %d: after the move the pair runs on %s, want sockmap", r, got)
		}
	}
	halfCloseBoth(t, client, up)
	assertEndedClean(t, k, p, datapath.Copy, size, client, up, fds)
}

// A kernel pair whose client has half-closed, the FIN carried by the kernel engine, moves to copy: the FIN
// is not carried again, the upstream's bytes still cross, and the pair ends closed.
func TestMoveSockmapHalfClosed(t *testing.T) {
	k, _ := newTestEngine(t)
	fds := openFDs(t)
	const size = 1 << 20
	toUp, toClient := stream(51, size), stream(52, size)
	client, up, p := kernelPairWithPeeked(t, k, toUp, toClient)
	if _, err := client.Write(toUp[100:]); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := readAllWithin(up, 10*time.Second)
	if err != nil || diffStreams(got, toUp) != "" {
		t.Fatalf("upstream read %d bytes, %v: %s", len(got), err, diffStreams(got, toUp))
	}
	if _, err := moveRetrying(p, datapath.Copier{}); err != nil {
		t.Fatalf("move the half-closed pair to copy: %v", err)
	}
	go func() {
		_, _ = up.Write(toClient[100:])
		_ = up.CloseWrite()
	}()
	got, err = readAllWithin(client, 10*time.Second)
	if err != nil || diffStreams(got, toClient) != "" {
		t.Fatalf("client read %d bytes, %v: %s", len(got), err, diffStreams(got, toClient))
	}
	assertEndedClean(t, k, p, datapath.Copy, size, client, up, fds)
}

// A kernel pair that ends while Stop waits for its bytes to reach a client that does not read makes the
// move fail with ErrPairEnded, leaving nothing in the maps.
func TestMoveSockmapPairEndsDuringStop(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 0 // never demoted: the kernel holds what the client does not read
	client, up, p := carryPair(t, k)
	go func() { _, _ = up.Write(stream(61, 32<<20)) }() // the client reads none of it
	// Wait until the kernel holds bytes it cannot hand on: the client's receive and send buffers full.
	d := kernelDirOf(t, k, false)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		k.mu.Lock()
		st, handed, err := k.dirProgress(d, d.dst.fd)
		k.mu.Unlock()
		if err == nil && st.Bytes > handed+4<<20 {
			break // far more than a send buffer that the client might still take
		}
		if time.Now().After(deadline) {
			t.Fatal("the kernel never held bytes for the client that does not read")
		}
	}
	moved := make(chan error, 1)
	go func() { _, err := moveRetrying(p, datapath.Copier{}); moved <- err }()
	select {
	case err := <-moved:
		t.Fatalf("the move returned %v with bytes still held for the client", err)
	case <-time.After(100 * time.Millisecond):
	}
	p.End(datapath.ReasonShutdown, true)
	select {
	case err := <-moved:
		if !errors.Is(err, datapath.ErrPairEnded) {
			t.Errorf("the move returned %v, want ErrPairEnded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the move did not return after the pair ended")
	}
	waitEnded(t, p)
	assertMapsEmpty(t, k)
	_ = client
}

// A kernel pair whose client stops reading while the upstream sends 32 MiB and half-closes moves to copy
// while the kernel holds bytes for the client and has passed others to userspace (the direction demoted
// for the slow reader, a goroutine relaying it): once the client reads again, it gets the whole stream
// once, in order, then EOF. While the client does not read, a give-back would read the upstream's bytes
// without end (each read opens its window): past giveBackHeldLimit the move is refused, the pair stays on
// sockmap with every byte, and the move is tried again as the client reads.
func TestMoveSockmapSlowReader(t *testing.T) {
	k, _ := newTestEngine(t)
	fds := openFDs(t)
	client, up, p := carryPair(t, k)
	data := stream(71, 32<<20)
	go func() {
		_, _ = up.Write(data)
		_ = up.CloseWrite()
	}()
	d := kernelDirOf(t, k, false)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		k.mu.Lock()
		st, err := k.maps.Stats(d.src.cookie)
		k.mu.Unlock()
		if err == nil && st.Passed > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the direction to the client that does not read was never demoted")
		}
	}
	moved := make(chan error, 1)
	go func() {
		n, err := moveRetrying(p, datapath.Copier{})
		t.Logf("the move was refused %d times", n)
		moved <- err
	}()
	time.Sleep(100 * time.Millisecond) // the first give-back while the client does not read
	got, err := readAllWithin(client, 20*time.Second)
	if err != nil || diffStreams(got, data) != "" {
		t.Fatalf("client read %d bytes, %v: %s", len(got), err, diffStreams(got, data))
	}
	if err := <-moved; err != nil {
		t.Fatalf("move from sockmap to copy: %v", err)
	}
	_ = client.CloseWrite()
	if _, err := readAllWithin(up, 10*time.Second); err != nil {
		t.Fatalf("upstream: %v", err)
	}
	waitEnded(t, p)
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	if _, down := p.Bytes(); down != uint64(len(data)) {
		t.Errorf("counted %d bytes to the client, want %d", down, len(data))
	}
	assertMapsEmpty(t, k)
	client.Close()
	up.Close()
	if n := openFDs(t); n != fds {
		t.Errorf("%d descriptors open after the pair ended, %d before it", n, fds)
	}
}

// A kernel pair whose directions are both demoted (a held limit of 16 KiB, so that the verdict passes
// bytes and goroutines relay them) moves to copy in the middle of 8 MiB each way: every byte arrives once
// and in order, each FIN after the last byte, and the maps are left empty.
func TestMoveSockmapDemoted(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 16 << 10
	fds := openFDs(t)
	const size = 8 << 20
	toUp, toClient := stream(81, size), stream(82, size)
	client, up, p := kernelPairWithPeeked(t, k, toUp, toClient)
	exchange(t, client, up, toUp, toClient, 100, size, 2<<20, func() {
		if k.Stats().Demotions == 0 {
			t.Error("no direction was demoted before the move")
		}
		if _, err := moveRetrying(p, datapath.Copier{}); err != nil {
			t.Errorf("move from sockmap to copy: %v", err)
		}
	})
	halfCloseBoth(t, client, up)
	assertEndedClean(t, k, p, datapath.Copy, size, client, up, fds)
}

// A kernel pair moves to copy while the engine drains a FIN: the client has sent 4 MiB and half-closed,
// and the upstream, which has not read yet (small socket buffers keep most of the bytes in the kernel),
// reads only once the move has begun. The upstream gets every
// byte, then EOF (the FIN carried once, by copy), and the other direction still works.
func TestMoveSockmapDuringFINDrain(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 0 // never demoted: the kernel holds what the upstream does not read
	k.setSendBuffer(64 << 10)
	fds := openFDs(t)
	const size = 4 << 20
	toUp, toClient := stream(91, size), stream(92, size)
	client, up, p := kernelPairWithPeeked(t, k, toUp, toClient)
	if err := up.SetReadBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = client.Write(toUp[100:])
		_ = client.CloseWrite()
	}()
	d := kernelDirOf(t, k, true)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		k.mu.Lock()
		draining := d.finSeen && !d.finDone
		k.mu.Unlock()
		if draining {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client's FIN never waited for its bytes to be handed on")
		}
	}
	moved := make(chan error, 1)
	go func() { _, err := moveRetrying(p, datapath.Copier{}); moved <- err }()
	got, err := readAllWithin(up, 20*time.Second)
	if err != nil || diffStreams(got, toUp) != "" {
		t.Fatalf("upstream read %d bytes, %v: %s", len(got), err, diffStreams(got, toUp))
	}
	if err := <-moved; err != nil {
		t.Fatalf("move from sockmap to copy during the FIN's drain: %v", err)
	}
	go func() {
		_, _ = up.Write(toClient[100:])
		_ = up.CloseWrite()
	}()
	got, err = readAllWithin(client, 20*time.Second)
	if err != nil || diffStreams(got, toClient) != "" {
		t.Fatalf("client read %d bytes, %v: %s", len(got), err, diffStreams(got, toClient))
	}
	assertEndedClean(t, k, p, datapath.Copy, size, client, up, fds)
}

// A kernel pair whose direction to the client is demoted, with passed bytes not read yet (the goroutine
// that relays them waits on a client that does not read), moves to copy after the upstream has stopped
// sending. The engine reads the passed bytes with new bytes waiting behind them in the receive queue, which
// a read refuses (EAGAIN) until the verdict has run over them: the move must not wait forever. Once the
// client reads, it gets the whole stream once, in order.
func TestMoveSockmapPassedBytesBehindHold(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 16 << 10
	k.setSendBuffer(64 << 10)
	client, up, p := carryPair(t, k)
	if err := client.SetReadBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	const size = 8 << 20
	data := stream(101, size)
	wrote := make(chan error, 1)
	go func() {
		_, err := up.Write(data)
		wrote <- err
	}()
	// Wait until the verdict has passed bytes that nobody reads and the upstream is held back by its
	// window: the passed count stays the same for a while with some of it unread.
	d := kernelDirOf(t, k, false)
	var last uint64
	for deadline, still := time.Now().Add(10*time.Second), 0; still < 10; time.Sleep(10 * time.Millisecond) {
		k.mu.Lock()
		st, err := k.maps.Stats(d.src.cookie)
		relaying := d.relaying
		k.mu.Unlock()
		if err == nil && relaying && st.Passed > 0 && st.Passed == last {
			still++
		} else {
			still = 0
		}
		last = st.Passed
		if time.Now().After(deadline) {
			t.Fatal("the direction to the client that does not read never stopped with passed bytes")
		}
	}
	moved := make(chan error, 1)
	go func() { _, err := moveRetrying(p, datapath.Copier{}); moved <- err }()
	got, err := readAllWithinLen(client, size, 20*time.Second)
	if err != nil || diffStreams(got, data) != "" {
		t.Fatalf("client read %d bytes, %v: %s", len(got), err, diffStreams(got, data))
	}
	select {
	case err := <-moved:
		if err != nil {
			t.Fatalf("move from sockmap to copy: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the move did not return")
	}
	if err := <-wrote; err != nil {
		t.Fatalf("upstream write: %v", err)
	}
	if got := p.Kind(); got != datapath.Copy {
		t.Errorf("after the move the pair runs on %s, want copy", got)
	}
}

// readAllWithinLen reads n bytes from c, or what came before an error or d passed.
func readAllWithinLen(c *net.TCPConn, n int, d time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, n)
	got, err := io.ReadFull(c, buf)
	return buf[:got], err
}

// TestRestartVerdictAfterRelease: a give-back that puts a source back into the verdict map does so only
// while its tunnel has not been released. Once the pair ended, its descriptor numbers may name other
// sockets (here another socket is put on the client's number), and putting one into the map under the
// tunnel's cookie would have the verdict run on it.
func TestRestartVerdictAfterRelease(t *testing.T) {
	k, _ := newTestEngine(t)
	_, _, p := carryPair(t, k)
	kt := p.Carrier().(*kernelTunnel)
	fd := kt.client.fd
	p.End(datapath.ReasonShutdown, true)
	waitEnded(t, p)
	other, _, _, otherEnd := tunnelEnds(t)
	defer other.Close()
	defer otherEnd.Close()
	if err := withFD(other, func(ofd int) { _ = unix.Dup3(ofd, fd, unix.O_CLOEXEC) }); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := k.restartVerdict(kt, []int{0}); !errors.Is(err, errTunnelEnded) {
		t.Errorf("restartVerdict on a released tunnel returned %v, want errTunnelEnded", err)
	}
	assertMapsEmpty(t, k)
}

// TestMoveSockmapHalfClosedDemoted: a kernel pair whose client has half-closed (the FIN carried by the
// kernel engine, so the upstream's socket, the source of the other direction, has sent its FIN and
// received none) and whose upstream → client direction is demoted for a client that does not read yet is
// not given back: bytes passed to that source once its verdict stopped could not be read in order (it
// cannot go back into the verdict map). The move is refused with ErrBusy, the pair stays in the kernel,
// and the client then gets every byte, in order, and EOF.
func TestMoveSockmapHalfClosedDemoted(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 16 << 10
	k.setSendBuffer(64 << 10)
	const size = 8 << 20
	toUp, toClient := stream(91, 64<<10), stream(92, size)
	client, up, p := carryPair(t, k)
	_ = client.SetReadBuffer(64 << 10)
	if _, err := client.Write(toUp); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got, err := readAllWithin(up, 10*time.Second); err != nil || diffStreams(got, toUp) != "" {
		t.Fatalf("upstream read %d bytes, %v: %s", len(got), err, diffStreams(got, toUp))
	}
	wrote := make(chan error, 1)
	go sendStream(up, toClient, wrote)
	d := kernelDirOf(t, k, false)
	waitDemoted(t, k, d)
	if err := datapath.Move(p, datapath.Copier{}); !errors.Is(err, ErrBusy) {
		t.Errorf("moving the half-closed pair with its other direction demoted returned %v, want ErrBusy", err)
	}
	if p.Kind() != datapath.Sockmap || p.Ending() {
		t.Fatalf("after the refused move the pair runs on %s, ending %v (%q); want it still in the kernel", p.Kind(), p.Ending(), p.Reason())
	}
	go func() {
		if werr := <-wrote; werr == nil {
			_ = up.CloseWrite()
		}
	}()
	if got, err := readAllWithin(client, 30*time.Second); err != nil || diffStreams(got, toClient) != "" {
		t.Fatalf("client read %d bytes, %v: %s", len(got), err, diffStreams(got, toClient))
	}
	waitEnded(t, p)
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	assertMapsEmpty(t, k)
}

// TestMoveSockmapLookupFailsWhileHeld: a give-back whose verdict lookups fail while the engine still holds
// the pair (its entries gone from the state map behind the engine's back, as a failed lookup looks) ends
// the pair with an error, rather than wait forever for an end that nothing else brings.
func TestMoveSockmapLookupFailsWhileHeld(t *testing.T) {
	k, _ := newTestEngine(t)
	_, _, p := carryPair(t, k)
	kt := p.Carrier().(*kernelTunnel)
	if err := k.maps.Remove(loader.Socket{Cookie: kt.client.cookie}, loader.Socket{Cookie: kt.up.cookie}); err != nil {
		t.Fatal(err)
	}
	moved := make(chan error, 1)
	go func() { _, err := moveRetrying(p, datapath.Copier{}); moved <- err }()
	select {
	case err := <-moved:
		if err == nil {
			t.Fatal("the move succeeded with the verdict's state gone")
		}
		t.Logf("the move returned: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatal("the move did not return within 15s: it waits for an end that nothing brings")
	}
	waitEnded(t, p)
	if p.Reason() != datapath.ReasonKernelError {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonKernelError)
	}
	assertMapsEmpty(t, k)
}

// countingByte is the byte at offset i of countingStream: each aligned 4 bytes hold their own offset
// (little-endian), so that a lost, repeated or reordered byte shows at once.
func countingByte(i int) byte { return byte((i &^ 3) >> (8 * (i & 3))) }

// fillCounting fills b with countingStream's bytes from offset off.
func fillCounting(b []byte, off int) {
	for j := range b {
		b[j] = countingByte(off + j)
	}
}

// A demoted bulk direction (a held limit of 16 KiB, a client that writes as fast as it can, an upstream
// that reads as fast as it can, TCP's buffers autotuned up to tcp_rmem[2]) is moved to copy, again while
// the move is refused (ErrBusy): no give-back, refused or not, holds more than giveBackHeldLimit bytes of
// a direction, the move is done in the end, and the stream arrives byte-exact, with bytes read by a
// refused give-back written by the kernel engine. Unbounded, a give-back held more (up to 81 MB) in about
// a third of the moves here, so the test moves several pairs one after the other (docs/datapath.md, "How
// a kernel pair is given back").
func TestMoveSockmapDemotedBulkHoldsLittle(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 16 << 10
	var heldMu sync.Mutex
	var heldAtMove [][2]int // per give-back and direction: bytes held
	k.afterSettle(func(held [2][]byte) {
		heldMu.Lock()
		defer heldMu.Unlock()
		heldAtMove = append(heldAtMove, [2]int{len(held[0]), len(held[1])})
	})
	for round := range 6 {
		t.Run(fmt.Sprintf("pair %d", round), func(t *testing.T) {
			heldMu.Lock()
			heldAtMove = nil
			heldMu.Unlock()
			moveDemotedBulk(t, k)
			heldMu.Lock()
			defer heldMu.Unlock()
			t.Logf("bytes held per direction at each give-back: %v", heldAtMove)
			if len(heldAtMove) == 0 {
				t.Fatal("no give-back ran")
			}
			for _, dirs := range heldAtMove {
				for _, n := range dirs {
					if n > giveBackHeldLimit {
						t.Errorf("a give-back held %d bytes of a direction, want at most %d", n, giveBackHeldLimit)
					}
				}
			}
		})
	}
}

// moveDemotedBulk is one pair of TestMoveSockmapDemotedBulkHoldsLittle on k: it checks the stream, that
// the pair ends closed on copy, and logs how often the move was refused.
func moveDemotedBulk(t *testing.T, k *Engine) {
	client, up, p := carryPair(t, k)
	var refused, sentAll, gotAll atomic.Int64
	const before, after = 48 << 20, 16 << 20 // bytes read by the upstream before the move, sent after it
	// fullSpeedTries is how often the move is tried with the client sending at full speed: a sender that
	// outruns the give-back may have it refused every time (under -race, most often). Then the client
	// pauses (paused) until the move is done, which a give-back must then finish.
	const fullSpeedTries = 20
	moved, paused := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 256<<10)
		_ = client.SetWriteDeadline(time.Now().Add(60 * time.Second))
		sent, afterFrom := 0, -1
		for ; afterFrom < 0 || sent < afterFrom+after; sent += len(buf) {
			if afterFrom < 0 {
				select {
				case <-moved:
					afterFrom = sent
				case <-paused:
					<-moved
					afterFrom = sent
				default:
				}
			}
			fillCounting(buf, sent)
			if _, err := client.Write(buf); err != nil {
				t.Errorf("client write at %d: %v", sent, err)
				return
			}
		}
		sentAll.Store(int64(sent))
		if err := client.CloseWrite(); err != nil {
			t.Errorf("client half-close: %v", err)
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 256<<10)
		_ = up.SetReadDeadline(time.Now().Add(60 * time.Second))
		var once sync.Once
		for got := 0; ; {
			n, err := up.Read(buf)
			for j := range buf[:n] {
				if buf[j] != countingByte(got+j) {
					t.Errorf("upstream byte %d is %#x, want %#x", got+j, buf[j], countingByte(got+j))
					return
				}
			}
			got += n
			if got >= before {
				once.Do(func() {
					wg.Add(1)
					go func() {
						defer wg.Done()
						defer close(moved)
						if k.Stats().Demotions == 0 {
							t.Error("no direction was demoted before the move")
						}
						var err error
						for range fullSpeedTries {
							if err = datapath.Move(p, datapath.Copier{}); !errors.Is(err, ErrBusy) {
								break
							}
							refused.Add(1)
							time.Sleep(10 * time.Millisecond)
						}
						if errors.Is(err, ErrBusy) {
							close(paused)
							var n int
							n, err = moveRetrying(p, datapath.Copier{})
							refused.Add(int64(n))
							t.Logf("refused %d times at full speed; the client paused", fullSpeedTries)
						}
						if err != nil {
							t.Errorf("move from sockmap to copy, refused %d times, then: %v", refused.Load(), err)
						}
					}()
				})
			}
			if err == io.EOF {
				gotAll.Store(int64(got))
				return
			}
			if err != nil {
				t.Errorf("upstream read %d bytes, then: %v", got, err)
				return
			}
		}
	}()
	wg.Wait()
	if gotAll.Load() != sentAll.Load() {
		t.Errorf("the upstream read %d bytes before EOF, the client sent %d", gotAll.Load(), sentAll.Load())
	}
	if err := up.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got, err := readAllWithin(client, 10*time.Second); len(got) != 0 || err != nil {
		t.Errorf("the client read %d bytes, %v; want EOF", len(got), err)
	}
	waitEnded(t, p)
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	t.Logf("the move was refused %d times", refused.Load())
	if got := p.Kind(); got != datapath.Copy {
		t.Errorf("the pair ended on %s, want copy", got)
	}
}
