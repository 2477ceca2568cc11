// Package streamtest holds the stream the throughput benchmarks of relay and datapath/sockmap send through
// a tunnel, and its check, and other helpers the tests of relay and datapath share.
package streamtest

import (
	"encoding/binary"
	"io"
	"testing"
)

// Chunk is the write size of Through.
const Chunk = 64 << 10

// Through writes b.N chunks of Chunk bytes to c, each starting with its offset in the stream,
// then half-closes c, and fails b unless r yields exactly that stream: a byte lost, repeated or reordered
// shows as a chunk that does not start with its own offset.
func Through(b *testing.B, c HalfCloser, r io.Reader) {
	b.Helper()
	done := make(chan *checker)
	go func() {
		ck := &checker{badAt: -1}
		io.CopyBuffer(ck, struct{ io.Reader }{r}, make([]byte, 8192))
		done <- ck
	}()
	buf := make([]byte, Chunk)
	b.SetBytes(Chunk)
	b.ResetTimer()
	for i := range b.N {
		binary.LittleEndian.PutUint64(buf, uint64(i)*Chunk)
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.CloseWrite()
	ck := <-done
	b.StopTimer()
	if want := uint64(b.N) * Chunk; ck.off != want || ck.badAt >= 0 {
		b.Fatalf("received %d bytes, want %d; first chunk out of place at offset %d (-1: none)", ck.off, want, ck.badAt)
	}
}

// HalfCloser is a connection that can send its FIN: *net.TCPConn, and clientConn through it.
type HalfCloser interface {
	io.Writer
	CloseWrite() error
}

// checker reads the stream Through writes.
type checker struct {
	off   uint64
	hdr   [8]byte
	badAt int64 // offset of the first chunk whose header is not its own offset; -1 while none
}

func (c *checker) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		pos := c.off % Chunk
		if pos >= 8 { // only each chunk's first 8 bytes are checked
			k := min(uint64(len(p)), Chunk-pos)
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
