package datapath

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Copier is the copy engine: a goroutine per direction reads into a userspace buffer and writes it on.
// It carries any pair, TLS included, and holds nothing between pairs.
type Copier struct{}

var _ Engine = Copier{}

func (Copier) Kind() Kind                 { return Copy }
func (Copier) Accepts(a, b Endpoint) bool { return true }
func (Copier) Close() error               { return nil }

// Carry starts p's two directions; p ends when both have carried their FIN or either has failed.
func (Copier) Carry(p *Pair) {
	u := newUserspace(p)
	if held, _ := p.Hold(Copy, u, nil); held {
		u.run(copyPump)
	}
}

// copyBufferSize is the read size of the copy datapath: 32 KiB, as io.Copy, moves a bulk stream in few
// system calls.
const copyBufferSize = 32 << 10

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, copyBufferSize); return &b }}

// copyPump moves bytes from d.src to d.dst through a userspace buffer until d.src's EOF.
//
// It reads through the raw connection rather than calling io.Copy for two reasons: between two TCP sockets
// io.Copy switches to splice(2), and this is the datapath that must work where splice does not; and a buffer
// is taken from the pool only once a read has bytes to return, so an idle tunnel holds none (a blocked
// net.Conn.Read would pin 32 KiB per direction for the tunnel's whole life).
func copyPump(d *Direction) error {
	if d.src.TLS != nil || d.dst.TLS != nil {
		return streamPump(d)
	}
	src, err := d.src.Conn.SyscallConn()
	if err != nil {
		return ReadErr(fmt.Errorf("raw source conn: %w", err))
	}
	for {
		var (
			bp   *[]byte
			n    int
			rerr error
		)
		err := src.Read(func(fd uintptr) bool {
			bp = copyBuffers.Get().(*[]byte)
			for {
				n, rerr = unix.Read(int(fd), *bp)
				if rerr != unix.EINTR {
					break
				}
			}
			if rerr == unix.EAGAIN {
				copyBuffers.Put(bp)
				return false // wait in Go's poller, holding no buffer
			}
			return true
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			return ReadErr(err)
		}
		if n == 0 {
			copyBuffers.Put(bp)
			return d.AtEOF() // the peer's FIN, or a reset a write to it took the error of
		}
		w, werr := d.dst.Conn.Write((*bp)[:n])
		if errors.Is(werr, os.ErrDeadlineExceeded) {
			d.holdBack((*bp)[w:n]) // stopped (Stop): these go first on whatever carries the pair next
		}
		copyBuffers.Put(bp)
		d.Count(w)
		if werr != nil {
			return WriteErr(werr)
		}
	}
}

// tlsBufferSize is the read size of a TLS direction: one TLS record's plaintext at most.
const tlsBufferSize = 16 << 10

// streamPump moves bytes from d's reader to its writer, for a direction with TLS on either side. A
// blocked TLS read cannot be made to wait without a buffer the way a raw read can, so such a direction
// holds 16 KiB for its life.
func streamPump(d *Direction) error {
	buf := make([]byte, tlsBufferSize)
	r, w := d.reader(), d.writer()
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			d.Count(m)
			if werr != nil {
				return WriteErr(werr)
			}
		}
		if rerr == io.EOF {
			return d.AtEOF()
		}
		if rerr != nil {
			return ReadErr(rerr)
		}
	}
}
