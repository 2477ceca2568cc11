package loader

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// BenchmarkVerdict measures what the verdict program costs per run, from the kernel's own BPF statistics
// (kernel.bpf_stats_enabled: run_time_ns / run_cnt), on one tunnel of two loopback connections whose relay
// sockets are in the maps: 32-byte ping-pong (two runs per round trip) and a stream of 1 KiB writes (about
// one run per write). It reports verdict-ns/run and runs/op; ns/op is the whole round trip or write.
//
//	go test -run '^$' -bench Verdict -benchtime 20000x ./loader/
func BenchmarkVerdict(b *testing.B) {
	b.Run("pingpong32", func(b *testing.B) {
		tn := openTunnel(b, 4<<20)
		client, upstream := tn.client, tn.upstream
		msg, got := bytes.Repeat([]byte{'p'}, 32), make([]byte, 32)
		measureVerdict(b, tn.s, func() {
			for i := 0; i < b.N; i++ {
				mustWrite(b, client, msg)
				mustReadFull(b, upstream, got)
				mustWrite(b, upstream, got)
				mustReadFull(b, client, got)
			}
		})
	})
	b.Run("stream1k", func(b *testing.B) {
		tn := openTunnel(b, 4<<20)
		client, upstream := tn.client, tn.upstream
		const window = 256 // writes between reads: what the kernel holds stays far below the held limit
		chunk, sink := bytes.Repeat([]byte{'s'}, 1024), make([]byte, window*1024)
		measureVerdict(b, tn.s, func() {
			for i := 0; i < b.N; i += window {
				n := min(window, b.N-i)
				done := make(chan error, 1)
				go func() { _, err := io.ReadFull(upstream, sink[:n*1024]); done <- err }()
				for range n {
					mustWrite(b, client, chunk)
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

// measureVerdict runs work with BPF statistics on and reports the verdict's mean run time and runs per op.
func measureVerdict(b *testing.B, s *Sockmap, work func()) {
	b.Helper()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Skipf("BPF statistics unavailable: %v", err)
	}
	defer stats.Close()
	before, err := s.objs.SockrelayVerdict.Stats()
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	work()
	b.StopTimer()
	after, err := s.objs.SockrelayVerdict.Stats()
	if err != nil {
		b.Fatal(err)
	}
	runs := after.RunCount - before.RunCount
	if runs == 0 {
		b.Fatal("the verdict never ran")
	}
	b.ReportMetric(float64(after.Runtime-before.Runtime)/float64(runs), "verdict-ns/run")
	b.ReportMetric(float64(runs)/float64(b.N), "runs/op")
}

// testTunnel is a freshly opened datapath carrying one tunnel: client ↔ relay side a, relay side b ↔
// upstream, with a and b in the maps.
type testTunnel struct {
	s                *Sockmap
	client, upstream *net.TCPConn
	a, b             Socket
}

// openTunnel opens the datapath and one tunnel through it, both closed by cleanup. Reads and writes on the
// outer ends fail after a minute rather than hang.
func openTunnel(tb testing.TB, heldLimit uint64) testTunnel {
	tb.Helper()
	s, err := Open(Options{})
	if err != nil {
		requireBPF(tb, err)
	}
	tb.Cleanup(func() { s.Close() })
	client, a := loopbackPair(tb)
	upstream, b := loopbackPair(tb)
	tn := testTunnel{s: s, client: client, upstream: upstream,
		a: socketOf(tb, a, heldLimit), b: socketOf(tb, b, heldLimit)}
	if err := s.Insert(tn.a, tn.b); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Remove(tn.a, tn.b) })
	deadline := time.Now().Add(time.Minute)
	for _, c := range []*net.TCPConn{client, upstream} {
		if err := c.SetDeadline(deadline); err != nil {
			tb.Fatal(err)
		}
	}
	return tn
}

// loopbackPair returns the two ends of a new loopback TCP connection; both are closed by cleanup.
func loopbackPair(tb testing.TB) (dialed, accepted *net.TCPConn) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	d, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	a, err := ln.AcceptTCP()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { a.Close() })
	return d, a
}

// socketOf describes c as the datapath needs it.
func socketOf(tb testing.TB, c *net.TCPConn, heldLimit uint64) Socket {
	tb.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	sk := Socket{HeldLimit: heldLimit}
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		sk.FD = int(fd)
		sk.Cookie, cerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil {
		tb.Fatal(err)
	}
	if cerr != nil {
		tb.Fatalf("SO_COOKIE: %v", cerr)
	}
	return sk
}

func mustWrite(tb testing.TB, c *net.TCPConn, p []byte) {
	if _, err := c.Write(p); err != nil {
		tb.Fatal(err)
	}
}

func mustReadFull(tb testing.TB, c *net.TCPConn, p []byte) {
	if _, err := io.ReadFull(c, p); err != nil {
		tb.Fatal(err)
	}
}
