package relay

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
)

// benchPath opens one connection pair for a benchmark: through a relay on dp, or, for "direct", a plain
// loopback connection with no relay, as the baseline. Client, relay and upstream share this process, so
// the figures compare datapaths side by side on one machine; they are not what a relay in its own process
// costs (`make bench` measures that: docs/bench/RESULTS.md).
func benchPath(b *testing.B, dp string) (client, upstream net.Conn, clientR, upstreamR io.Reader) {
	b.Helper()
	up := startUpstream(b)
	if dp == "direct" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		u, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close(); u.Close() })
		return c, u, c, u
	}
	r := startRelay(b, Datapath(dp), []string{up.Addr})
	c, u := openTunnel(b, r.Addr, up, nil, nil)
	return c, u, c.R, u.R
}

// benchPaths are "direct" and every datapath this host runs (TestMain adds sockmap where it can).
func benchPaths() []string {
	out := []string{"direct"}
	for _, d := range testDatapaths {
		out = append(out, string(d))
	}
	return out
}

// BenchmarkThroughput streams 64 KiB writes one way; MB/s is the datapath's bulk rate.
func BenchmarkThroughput(b *testing.B) {
	for _, dp := range benchPaths() {
		b.Run(dp, func(b *testing.B) {
			c, _, _, ur := benchPath(b, dp)
			streamThrough(b, c.(halfCloser), ur)
		})
	}
}

// benchChunk is the write size of the throughput benchmarks.
const benchChunk = 64 << 10

// streamThrough writes b.N chunks of benchChunk bytes to c, each starting with its offset in the stream,
// then half-closes c, and fails b unless r yields exactly that stream: a byte lost, repeated or reordered
// shows as a chunk that does not start with its own offset.
func streamThrough(b *testing.B, c halfCloser, r io.Reader) {
	b.Helper()
	done := make(chan *streamChecker)
	go func() {
		ck := &streamChecker{badAt: -1}
		io.CopyBuffer(ck, struct{ io.Reader }{r}, make([]byte, 8192))
		done <- ck
	}()
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for i := range b.N {
		binary.LittleEndian.PutUint64(buf, uint64(i)*benchChunk)
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.CloseWrite()
	ck := <-done
	b.StopTimer()
	if want := uint64(b.N) * benchChunk; ck.off != want || ck.badAt >= 0 {
		b.Fatalf("received %d bytes, want %d; first chunk out of place at offset %d (-1: none)", ck.off, want, ck.badAt)
	}
}

// halfCloser is a connection that can send its FIN: *net.TCPConn, and clientConn through it.
type halfCloser interface {
	io.Writer
	CloseWrite() error
}

// streamChecker reads the stream streamThrough writes.
type streamChecker struct {
	off   uint64
	hdr   [8]byte
	badAt int64 // offset of the first chunk whose header is not its own offset; -1 while none
}

func (c *streamChecker) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		pos := c.off % benchChunk
		if pos >= 8 { // only each chunk's first 8 bytes are checked
			k := min(uint64(len(p)), benchChunk-pos)
			c.off, p = c.off+k, p[k:]
			continue
		}
		k := min(uint64(len(p)), 8-pos)
		copy(c.hdr[pos:], p[:k])
		c.off, p = c.off+k, p[k:]
		if pos+k == 8 && c.badAt < 0 && binary.LittleEndian.Uint64(c.hdr[:]) != c.off-8 {
			c.badAt = int64(c.off - 8)
		}
	}
	return n, nil
}

// BenchmarkRoundTrip is 32-byte ping-pong over one tunnel: ns/op is one round trip.
func BenchmarkRoundTrip(b *testing.B) {
	for _, dp := range benchPaths() {
		b.Run(dp, func(b *testing.B) {
			c, u, cr, ur := benchPath(b, dp)
			go func() {
				buf := make([]byte, 32)
				for {
					if _, err := io.ReadFull(ur, buf); err != nil {
						return
					}
					if _, err := u.Write(buf); err != nil {
						return
					}
				}
			}()
			msg := make([]byte, 32)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(cr, msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkThroughputKernelSendBuffer is BenchmarkThroughput on sockmap with the relay sockets' send buffer
// left to TCP's autotuning (tcp_wmem, 4 MiB at most here) or fixed larger, and with the default held limit
// or one too large to be reached (no demotion, so no userspace relay: the kernel path alone). The psock
// backlog that moves redirected bytes into the destination retries one jiffy later when the send buffer
// is full, so the buffer bounds what it moves per tick (docs/datapath.md, "Measured"). It reports how
// often the direction was demoted, and how many skbs repeating bytes the verdict cut (bpf/sockrelay.c).
func BenchmarkThroughputKernelSendBuffer(b *testing.B) {
	requireSockmap(b)
	for _, limit := range []int{DefaultKernelHeldLimit, 1 << 30} {
		for _, sndbuf := range []int{0, 4 << 20, 16 << 20, 32 << 20} {
			name := "sndbuf-autotuned"
			if sndbuf > 0 {
				name = fmt.Sprintf("sndbuf-%dMiB", sndbuf>>20)
			}
			name += fmt.Sprintf("/held-limit-%dMiB", limit>>20)
			b.Run(name, func(b *testing.B) {
				up := startUpstream(b)
				r := startRelay(b, DatapathSockmap, []string{up.Addr}, func(c *Config) {
					c.KernelHeldLimit = limit
					c.alterKernelPath = func(k *kernelPath) { k.sndbuf = sndbuf }
				})
				c, u := openTunnel(b, r.Addr, up, nil, nil)
				d := kernelDirOf(b, r, true)
				streamThrough(b, c.TCPConn, u.R)
				st, err := r.kernel.maps.Stats(d.src.cookie)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(st.Demotions), "demotions")
				b.ReportMetric(float64(st.Overlaps), "cut-skbs")
			})
		}
	}
}
