package datapath

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// splicePipeSize is the pipe size the splice datapath asks for, per direction. Go's own io.Copy grows its
// pipes to 1 MiB, which exhausts a non-root user's pipe allowance (fs/pipe-user-pages-soft, 64 MiB) at about
// 32 tunnels, after which the kernel hands out two-page pipes; 64 KiB keeps a bulk stream moving in few
// system calls and lets 512 tunnels run before that limit.
const splicePipeSize = 64 << 10

// Splicer is the splice engine: a goroutine per direction moves bytes socket → pipe → socket with
// splice(2), so they never enter userspace. It cannot carry TLS.
type Splicer struct {
	// NewPipe, when set, stands in for NewPipe (tests run out of descriptors with it).
	NewPipe func(size int) (*Pipe, error)
}

var _ interface {
	Engine
	Reserver
} = (*Splicer)(nil)

func (*Splicer) Kind() Kind   { return Splice }
func (*Splicer) Close() error { return nil }

// Accepts refuses TLS endpoints: without kernel TLS the bytes must be decrypted in userspace.
func (*Splicer) Accepts(a, b Endpoint) bool { return a.TLS == nil && b.TLS == nil }

// Available checks that this process can make a pipe and size it as the engine does.
func (s *Splicer) Available() error {
	p, err := s.newPipe(splicePipeSize)
	if err != nil {
		return fmt.Errorf("%w: splice: %v", ErrUnavailable, err)
	}
	p.Close()
	return nil
}

func (s *Splicer) newPipe(size int) (*Pipe, error) {
	if s.NewPipe != nil {
		return s.NewPipe(size)
	}
	return NewPipe(size)
}

// Reserve makes p's two pipes before its client is told the tunnel is open: a tunnel that cannot have
// them (out of descriptors: splice needs 6 a tunnel, copy 2) can then run on copy instead, rather than be
// reset after its 101 and blamed on a peer. An ended pair needs none.
func (s *Splicer) Reserve(p *Pair) error {
	u := newUserspace(p, Splice)
	for i := range u.pipes {
		var err error
		if u.pipes[i], err = s.newPipe(splicePipeSize); err != nil {
			u.closePipes()
			return err
		}
	}
	if held, _ := p.Hold(Splice, u, nil); !held {
		u.closePipes()
	}
	return nil
}

// Carry starts p's two directions on the pipes Reserve made, or makes them now (a pair moved here
// live); a pair that cannot have them runs on copy.
func (s *Splicer) Carry(p *Pair) {
	p.mu.Lock()
	u, ok := p.carrier.(*userspace)
	p.mu.Unlock()
	if !ok || u.kind != Splice || u.pipesInUse {
		if err := s.Reserve(p); err != nil {
			Copier{}.Carry(p)
			return
		}
		p.mu.Lock()
		u, ok = p.carrier.(*userspace)
		p.mu.Unlock()
		if !ok {
			return // ended meanwhile
		}
	}
	if !u.usePipes() {
		return
	}
	u.run(func(d *Direction) error {
		if d.FromClient() {
			return splicePump(d, u.pipes[0])
		}
		return splicePump(d, u.pipes[1])
	})
}

// Pipe is a nonblocking pipe used as the splice buffer of one direction.
type Pipe struct {
	r, w int
	size int
}

// NewPipe makes a nonblocking pipe and asks for size bytes of capacity. A refused size (the user's pipe
// allowance is spent) is not an error: the pipe keeps the size the kernel gave it and splice moves less per call.
func NewPipe(size int) (*Pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("pipe2: %w", err)
	}
	p := &Pipe{r: fds[0], w: fds[1]}
	got, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, size)
	if err != nil {
		got, err = unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
	}
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("pipe size: %w", err)
	}
	p.size = got
	return p, nil
}

// Close closes both ends. Bytes still in the pipe are lost, so a direction closes its pipe only when empty or
// when the tunnel is aborted anyway.
func (p *Pipe) Close() {
	if p.r >= 0 {
		unix.Close(p.r)
		unix.Close(p.w)
		p.r, p.w = -1, -1
	}
}

// take reads n bytes out of the pipe, which holds at least that many.
func (p *Pipe) take(n int) ([]byte, error) {
	b := make([]byte, n)
	for off := 0; off < n; {
		m, err := unix.Read(p.r, b[off:])
		if err == unix.EINTR {
			continue
		}
		if err != nil || m == 0 {
			return nil, fmt.Errorf("read back %d bytes from a pipe: %d read, then %v", n, off, err)
		}
		off += m
	}
	return b, nil
}

// Closed reports whether Close has run.
func (p *Pipe) Closed() bool { return p.r < 0 }

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// splicePump moves bytes from d.src to d.dst with splice(2) through a pipe, until d.src's EOF. Both sockets
// stay in Go's poller: each splice that would block (EAGAIN) returns control to the poller through
// syscall.RawConn, which parks the goroutine until the socket is ready, as a net.Conn Read or Write would.
func splicePump(d *Direction, p *Pipe) error {
	src, err := d.src.Conn.SyscallConn()
	if err != nil {
		return ReadErr(fmt.Errorf("raw source conn: %w", err))
	}
	dst, err := d.dst.Conn.SyscallConn()
	if err != nil {
		return WriteErr(fmt.Errorf("raw destination conn: %w", err))
	}
	if p == nil {
		return ReadErr(errors.New("splice direction without a pipe"))
	}
	for {
		n, err := spliceIn(src, p)
		if err != nil {
			return ReadErr(err)
		}
		if n == 0 {
			return d.AtEOF() // EOF, and the pipe is empty
		}
		// Drain the pipe completely before reading again: the next read then always has the whole pipe,
		// and an EAGAIN from it can only mean the socket has nothing.
		for n > 0 {
			m, err := spliceOut(p, dst, n)
			d.Count(m)
			n -= m
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					// Stopped (Stop) with bytes in the pipe: they go first on whatever carries the
					// pair next.
					if kept, rerr := p.take(n); rerr == nil {
						d.holdBack(kept)
					} else {
						err = rerr
					}
				}
				return WriteErr(err)
			}
		}
	}
}

// spliceIn moves what the socket has, up to the pipe's size, into the empty pipe. It returns 0 at EOF.
func spliceIn(src syscall.RawConn, p *Pipe) (int, error) {
	var (
		n    int64
		serr error
	)
	err := src.Read(func(fd uintptr) bool {
		for {
			n, serr = unix.Splice(int(fd), nil, p.w, nil, p.size, spliceFlags)
			if serr != unix.EINTR {
				break
			}
		}
		return serr != unix.EAGAIN
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return 0, fmt.Errorf("splice from socket: %w", err)
	}
	return int(n), nil
}

// spliceOut moves up to n bytes from the pipe to the socket, waiting while the socket's send buffer is full.
func spliceOut(p *Pipe, dst syscall.RawConn, n int) (int, error) {
	var (
		m    int64
		serr error
	)
	err := dst.Write(func(fd uintptr) bool {
		for {
			m, serr = unix.Splice(p.r, nil, int(fd), nil, n, spliceFlags)
			if serr != unix.EINTR {
				break
			}
		}
		return serr != unix.EAGAIN
	})
	if err == nil {
		err = serr
	}
	m = max(m, 0) // -1 from a splice that would have blocked, before a deadline ended the wait
	if err == nil && m == 0 {
		err = errors.New("splice to socket moved nothing")
	}
	if err != nil {
		return int(m), fmt.Errorf("splice to socket: %w", err)
	}
	return int(m), nil
}
