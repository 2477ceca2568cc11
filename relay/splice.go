package relay

import (
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// splicePipeSize is the pipe size the splice datapath asks for, per direction. Go's own io.Copy grows its
// pipes to 1 MiB, which exhausts a non-root user's pipe allowance (fs/pipe-user-pages-soft, 64 MiB) at about
// 32 tunnels, after which the kernel hands out two-page pipes; 64 KiB keeps a bulk stream moving in few
// system calls and lets 512 tunnels run before that limit.
const splicePipeSize = 64 << 10

// pipe is a nonblocking pipe used as the splice buffer of one direction.
type pipe struct {
	r, w int
	size int
}

// newPipe makes a nonblocking pipe and asks for size bytes of capacity. A refused size (the user's pipe
// allowance is spent) is not an error: the pipe keeps the size the kernel gave it and splice moves less per call.
func newPipe(size int) (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("pipe2: %w", err)
	}
	p := &pipe{r: fds[0], w: fds[1]}
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
func (p *pipe) Close() {
	if p.r >= 0 {
		unix.Close(p.r)
		unix.Close(p.w)
		p.r, p.w = -1, -1
	}
}

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// splicePump moves bytes from d.src to d.dst with splice(2) through a pipe, until d.src's EOF. Both sockets
// stay in Go's poller: each splice that would block (EAGAIN) returns control to the poller through
// syscall.RawConn, which parks the goroutine until the socket is ready, as a net.Conn Read or Write would.
func splicePump(d *direction) error {
	src, err := d.src.SyscallConn()
	if err != nil {
		return readErr(fmt.Errorf("raw source conn: %w", err))
	}
	dst, err := d.dst.SyscallConn()
	if err != nil {
		return writeErr(fmt.Errorf("raw destination conn: %w", err))
	}
	p := d.pipe // made before the tunnel opened (reservePipes); closed by runDirections
	if p == nil {
		return readErr(errors.New("splice direction without a pipe"))
	}
	for {
		n, err := spliceIn(src, p)
		if err != nil {
			return readErr(err)
		}
		if n == 0 {
			return nil // EOF, and the pipe is empty
		}
		// Drain the pipe completely before reading again: the next read then always has the whole pipe,
		// and an EAGAIN from it can only mean the socket has nothing.
		for n > 0 {
			m, err := spliceOut(p, dst, n)
			d.counter.Add(uint64(m))
			if err != nil {
				return writeErr(err)
			}
			n -= m
		}
	}
}

// spliceIn moves what the socket has, up to the pipe's size, into the empty pipe. It returns 0 at EOF.
func spliceIn(src syscall.RawConn, p *pipe) (int, error) {
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
func spliceOut(p *pipe, dst syscall.RawConn, n int) (int, error) {
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
	if err == nil && m == 0 {
		err = errors.New("splice to socket moved nothing")
	}
	if err != nil {
		return int(m), fmt.Errorf("splice to socket: %w", err)
	}
	return int(m), nil
}

// reservePipes makes a splice tunnel's two pipes before its client is told the tunnel is open: a tunnel
// that cannot have them (out of descriptors: splice needs 6 a tunnel, copy 2) runs on copy instead, said
// in the log with the cause and counted as a fallback, rather than being reset after its 101 and blamed
// on a peer.
func (s *Server) reservePipes(t *Tunnel) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.datapath != DatapathSplice || t.ending {
		return
	}
	var err error
	for i := range t.pipes {
		if t.pipes[i], err = s.makePipe(splicePipeSize); err != nil {
			t.closePipes()
			t.pipes = [2]*pipe{}
			break
		}
	}
	if err == nil {
		return
	}
	t.datapath = DatapathCopy
	s.metrics.datapathFallbacks.WithLabelValues("pipe_unavailable").Inc()
	s.log.Warn("splice pipes unavailable, the tunnel runs on the copy datapath", "client", t.ClientAddr,
		"upstream", t.UpstreamAddr, "err", err)
}

// makePipe is newPipe, or the test's stand-in for it.
func (s *Server) makePipe(size int) (*pipe, error) {
	if s.cfg.newPipe != nil {
		return s.cfg.newPipe(size)
	}
	return newPipe(size)
}
