package relay

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// Tests that move tens or hundreds of MiB generate what they send and check what they receive as it
// goes, rather than holding both streams whole: under -race every byte a test holds costs several more of
// shadow memory, and the backpressure tests alone took relay.test past 8 GB of RSS that way.

// keystream is the pseudo-random byte stream of seed: AES-CTR over zeros, keyed by the seed. Its
// assembly runs at gigabytes a second even under -race, where a generator written in Go (stream's
// ChaCha8) runs ten times slower.
func keystream(seed uint64) cipher.Stream {
	var key [16]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	block, err := aes.NewCipher(key[:])
	if err != nil {
		panic(err) // a 16-byte key is always valid
	}
	return cipher.NewCTR(block, make([]byte, aes.BlockSize))
}

// seededReader reads the keystream of a seed.
type seededReader struct{ ks cipher.Stream }

func (r seededReader) Read(p []byte) (int, error) {
	clear(p)
	r.ks.XORKeyStream(p, p)
	return len(p), nil
}

// streamReader returns a reader of the first n bytes of seed's stream, generated as they are read.
func streamReader(seed uint64, n int64) io.Reader {
	return io.LimitReader(seededReader{keystream(seed)}, n)
}

// streamPrefix returns the first n bytes of seed's stream, e.g. the bytes that ride with a handshake.
func streamPrefix(seed uint64, n int) []byte {
	b := make([]byte, n)
	_, _ = io.ReadFull(streamReader(seed, int64(n)), b)
	return b
}

// streamCheck is an io.Writer that compares what it is given with the first n bytes of seed's stream as it
// arrives, keeping only a count and where the first difference was. One goroutine writes to it; Len and
// Diff are read after, or by that same goroutine.
type streamCheck struct {
	want      io.Reader
	n         int64 // bytes expected
	got       int64 // bytes written so far
	firstDiff int64 // offset of the first byte that differs from the stream, -1 while none has
	buf       []byte
}

func newStreamCheck(seed uint64, n int64) *streamCheck {
	return &streamCheck{want: streamReader(seed, n), n: n, firstDiff: -1, buf: make([]byte, 64<<10)}
}

// Write compares p with the next len(p) bytes of the stream; bytes beyond its end count as received.
func (c *streamCheck) Write(p []byte) (int, error) {
	written := len(p)
	for len(p) > 0 && c.got < c.n {
		chunk := p[:min(len(p), len(c.buf), int(c.n-c.got))]
		want := c.buf[:len(chunk)]
		_, _ = io.ReadFull(c.want, want)
		if c.firstDiff < 0 && !bytes.Equal(chunk, want) {
			for i := range chunk {
				if chunk[i] != want[i] {
					c.firstDiff = c.got + int64(i)
					break
				}
			}
		}
		c.got += int64(len(chunk))
		p = p[len(chunk):]
	}
	c.got += int64(len(p))
	return written, nil
}

// Len returns how many bytes were written.
func (c *streamCheck) Len() int64 { return c.got }

// Diff says how what was written differs from the stream, in diffStreams' words, or "" when it is
// the whole stream, byte for byte.
func (c *streamCheck) Diff() string {
	switch {
	case c.firstDiff >= 0:
		return fmt.Sprintf("got %d bytes, want %d; first difference at byte %d", c.got, c.n, c.firstDiff)
	case c.got != c.n:
		return fmt.Sprintf("got %d bytes, want %d; equal over the first %d", c.got, c.n, min(c.got, c.n))
	}
	return ""
}

// writeStream writes what src reads to c in 64 KiB chunks until src ends or a write fails, counting
// what the kernel accepted in sent (when not nil).
func writeStream(c net.Conn, src io.Reader, sent *atomic.Int64) error {
	buf := make([]byte, 64<<10)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			m, err := c.Write(buf[:n])
			if sent != nil {
				sent.Add(int64(m))
			}
			if err != nil {
				return err
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// copyWithin copies what r (which reads conn) reads to w until EOF, giving up with a timeout error after
// d. It is readAllWithin without holding what was read.
func copyWithin(conn net.Conn, w io.Writer, r io.Reader, d time.Duration) (int64, error) {
	_ = conn.SetReadDeadline(time.Now().Add(d))
	defer conn.SetReadDeadline(time.Time{})
	return io.Copy(w, r)
}

// TestStreamCheck checks the checker the big-stream tests rely on: the stream, written in chunks of any
// size, passes; a changed byte, a missing byte and an extra byte each fail, naming where.
func TestStreamCheck(t *testing.T) {
	const n = 200_000
	whole := streamPrefix(3, n)
	if !bytes.Equal(whole[:1000], streamPrefix(3, 1000)) {
		t.Fatal("a prefix of the stream differs from the stream's start")
	}
	if bytes.Equal(whole[:1000], streamPrefix(4, 1000)) {
		t.Fatal("two seeds give the same stream")
	}
	changed := bytes.Clone(whole)
	changed[150_001] ^= 1
	cases := []struct {
		name string
		got  []byte
		want string
	}{
		{"exact", whole, ""},
		{"changed", changed, "got 200000 bytes, want 200000; first difference at byte 150001"},
		{"short", whole[:n-1], "got 199999 bytes, want 200000; equal over the first 199999"},
		{"long", append(bytes.Clone(whole), 0), "got 200001 bytes, want 200000; equal over the first 200000"},
		{"other seed", streamPrefix(4, n), "got 200000 bytes, want 200000; first difference at byte 0"},
	}
	for _, tc := range cases {
		for _, chunk := range []int{1, 7, 64 << 10, 100_000, n + 1} {
			t.Run(fmt.Sprintf("%s/%d", tc.name, chunk), func(t *testing.T) {
				c := newStreamCheck(3, n)
				for p := tc.got; len(p) > 0; p = p[min(chunk, len(p)):] {
					if k, err := c.Write(p[:min(chunk, len(p))]); err != nil || k != min(chunk, len(p)) {
						t.Fatalf("Write = %d, %v", k, err)
					}
				}
				if got := c.Diff(); got != tc.want {
					t.Errorf("Diff() = %q, want %q", got, tc.want)
				}
				if c.Len() != int64(len(tc.got)) {
					t.Errorf("Len() = %d, want %d", c.Len(), len(tc.got))
				}
			})
		}
	}
}
