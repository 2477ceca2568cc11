package eventloop

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// testTimeout bounds every blocking step of a test, so a stalled tunnel fails the test instead of hanging it.
const testTimeout = 30 * time.Second

// startLoops starts loops for one test and closes them when it ends.
func startLoops(t testing.TB, opts Options) *Loops {
	t.Helper()
	ls, err := Start(opts)
	if err != nil {
		t.Fatalf("start loops: %v", err)
	}
	t.Cleanup(ls.Close)
	return ls
}

// tcpPair returns the two ends of a loopback TCP connection. setup, if not nil, runs on each raw socket before
// it connects (dialer) or listens (listener), e.g. to size its buffers.
func tcpPair(t testing.TB, setup func(fd uintptr)) (dialed, accepted *net.TCPConn) {
	t.Helper()
	control := func(_, _ string, c syscall.RawConn) error {
		if setup != nil {
			return c.Control(setup)
		}
		return nil
	}
	lc := net.ListenConfig{Control: control}
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	d := net.Dialer{Control: control}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatalf("accept: %v", err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// rig is one carried tunnel with the test's peers on both sides: peerA talks to side a, peerB to side b.
type rig struct {
	peerA, peerB *net.TCPConn
	h            *Handle
	ends         chan End
}

// carry builds a rig on ls: a is the relay's end of a connection from peerA, b its end of one to peerB.
func carry(t testing.TB, ls *Loops, aPeeked, bPeeked []byte, setup func(fd uintptr)) *rig {
	t.Helper()
	return carryAs(t, ls, false, aPeeked, bPeeked, setup)
}

// carryAs is carry, the tunnel spliced (Spec.Splice) when splice is set.
func carryAs(t testing.TB, ls *Loops, splice bool, aPeeked, bPeeked []byte, setup func(fd uintptr)) *rig {
	t.Helper()
	peerA, a := tcpPair(t, setup)
	b, peerB := tcpPair(t, setup)
	r := &rig{peerA: peerA, peerB: peerB, ends: make(chan End, 1)}
	h, err := ls.CarryWith(a, b, Spec{APeeked: aPeeked, BPeeked: bPeeked, Splice: splice,
		OnEnd: func(e End) { r.ends <- e }})
	if err != nil {
		t.Fatalf("carry: %v", err)
	}
	r.h = h
	for _, c := range []*net.TCPConn{peerA, peerB} {
		_ = c.SetDeadline(time.Now().Add(testTimeout))
	}
	return r
}

// forEachMode runs test on both ways a loop moves bytes: through lent buffers (copy) and through lent pipes
// (splice): every invariant holds on both.
func forEachMode(t *testing.T, test func(t *testing.T, splice bool)) {
	for _, m := range []struct {
		name   string
		splice bool
	}{{"copy", false}, {"splice", true}} {
		t.Run(m.name, func(t *testing.T) { test(t, m.splice) })
	}
}

// end waits for the tunnel's End.
func (r *rig) end(t testing.TB) End {
	t.Helper()
	select {
	case e := <-r.ends:
		return e
	case <-time.After(testTimeout):
		t.Fatal("the tunnel did not end")
		return End{}
	}
}

// stream is the seeded pseudo-random byte stream of a test, generated as it is read, never held whole.
type stream struct{ src *rand.ChaCha8 }

func newStream(seed uint64) *stream {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	return &stream{src: rand.NewChaCha8(key)}
}

func (s *stream) next(n int) []byte {
	b := make([]byte, n)
	_, _ = s.src.Read(b)
	return b
}

// writeStream writes n bytes of s to w in chunks of random sizes (1 byte to 64 KiB) drawn from seed.
func writeStream(w io.Writer, s *stream, n int, seed uint64) error {
	sizes := rand.New(rand.NewPCG(seed, 1))
	buf := make([]byte, 64<<10)
	for n > 0 {
		chunk := buf[:min(n, 1+sizes.IntN(len(buf)))]
		_, _ = s.src.Read(chunk)
		if _, err := w.Write(chunk); err != nil {
			return fmt.Errorf("write stream, %d bytes left: %w", n, err)
		}
		n -= len(chunk)
	}
	return nil
}

// checkStream reads from r until EOF and checks that it got exactly n bytes of s, in order.
func checkStream(r io.Reader, s *stream, n int) error {
	buf := make([]byte, 64<<10)
	got := 0
	for {
		k, err := r.Read(buf)
		if k > 0 {
			if got+k > n {
				return fmt.Errorf("got more than the %d bytes sent", n)
			}
			if want := s.next(k); !bytes.Equal(buf[:k], want) {
				return fmt.Errorf("bytes %d..%d differ from what was sent", got, got+k)
			}
			got += k
		}
		if err == io.EOF {
			if got != n {
				return fmt.Errorf("EOF after %d of %d bytes", got, n)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("read stream after %d of %d bytes: %w", got, n, err)
		}
	}
}

// openFDs counts this process's open descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("list /proc/self/fd: %v", err)
	}
	return len(entries)
}
