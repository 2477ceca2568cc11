package relay

import (
	"bufio"
	"io"
	"sync"
)

// handshakeBufSize is the size of the buffers handshakes share: bufio's default, which net/http's are.
const handshakeBufSize = 4096

// handshakeReaders and handshakeWriters are the buffers a WebSocket handshake reads the upstream's answer
// through and writes the upstream's request and the client's 101 through. net/http hands every hijacked
// connection's reader and writer (4 KiB each) to the handler and never takes them back into its own pools:
// hijack puts them here, so that the next handshakes' buffers are those rather than new ones.
var (
	handshakeReaders sync.Pool // *bufio.Reader
	handshakeWriters sync.Pool // *bufio.Writer
)

// handshakeReader is a shared reader, reset to read r.
func handshakeReader(r io.Reader) *bufio.Reader {
	if br, ok := handshakeReaders.Get().(*bufio.Reader); ok {
		br.Reset(r)
		return br
	}
	return bufio.NewReaderSize(r, handshakeBufSize)
}

// releaseReader gives a reader back for other handshakes; nothing may read through it, or hold a slice of
// its buffer (a Peek), afterwards.
func releaseReader(br *bufio.Reader) {
	if br.Size() != handshakeBufSize {
		return
	}
	br.Reset(nil)
	handshakeReaders.Put(br)
}

// handshakeWriter is a shared writer, empty, reset to write to w.
func handshakeWriter(w io.Writer) *bufio.Writer {
	if bw, ok := handshakeWriters.Get().(*bufio.Writer); ok {
		bw.Reset(w)
		return bw
	}
	return bufio.NewWriterSize(w, handshakeBufSize)
}

// releaseWriter gives a writer back for other handshakes; what it still buffers is dropped.
func releaseWriter(bw *bufio.Writer) {
	if bw.Size() != handshakeBufSize {
		return
	}
	bw.Reset(nil)
	handshakeWriters.Put(bw)
}
