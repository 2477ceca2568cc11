package eventloop

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// A splice tunnel (Spec.Splice) moves its bytes socket → pipe → socket with splice(2), so they never enter
// userspace. A direction borrows a pipe from its loop only while bytes sit in it, as a copy direction borrows
// a buffer: an idle splice tunnel holds its two sockets and nothing else. A pipe goes back to the loop's pool
// only once it is empty (bytes left in a pooled pipe would reach another tunnel), and a tunnel that ends with
// bytes in a pipe closes that pipe.

// pipe is a nonblocking pipe lent to one direction of a splice tunnel.
type pipe struct {
	r, w int32
	size int32 // its capacity: the most one splice from the source moves
	held int32 // bytes in it that the destination has not taken
}

// newPipe makes a nonblocking pipe and asks for size bytes of capacity. A refused size (the user's pipe
// allowance, fs/pipe-user-pages-soft, is spent) is not an error: the pipe keeps what the kernel gave it and
// splice moves less per call. Tests replace it to run out of descriptors.
var newPipe = func(size int) (r, w int, err error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return -1, -1, fmt.Errorf("pipe2: %w", err)
	}
	return fds[0], fds[1], nil
}

// defaultPipeSize is Options.PipeSize's default: 64 KiB moves a bulk stream in few system calls, and lets 512
// directions hold a pipe before a non-root user's allowance (fs/pipe-user-pages-soft, 64 MiB) is spent, after
// which the kernel hands out two-page pipes (Go's own io.Copy grows its pipes to 1 MiB: 32 at once).
const defaultPipeSize = 64 << 10

// CheckPipe makes a pipe as a loop makes one for a splice tunnel, and closes it: an error says splice cannot
// run in this process.
func CheckPipe() error {
	p, err := (&loop{pipeSize: defaultPipeSize}).makePipe()
	if err != nil {
		return err
	}
	p.close()
	return nil
}

// makePipe makes a pipe of about size bytes with l's pipe maker.
func (l *loop) makePipe() (*pipe, error) {
	mk := l.newPipe
	if mk == nil {
		mk = newPipe
	}
	r, w, err := mk(l.pipeSize)
	if err != nil {
		return nil, err
	}
	got, err := unix.FcntlInt(uintptr(w), unix.F_SETPIPE_SZ, l.pipeSize)
	if err != nil {
		got, err = unix.FcntlInt(uintptr(w), unix.F_GETPIPE_SZ, 0)
	}
	if err != nil {
		unix.Close(r)
		unix.Close(w)
		return nil, fmt.Errorf("pipe size: %w", err)
	}
	return &pipe{r: int32(r), w: int32(w), size: int32(got)}, nil
}

// takePipe lends a pipe to a direction about to read; nil when none can be made (EMFILE, ENFILE, the user's
// pipe allowance): the direction then reads into a buffer, as a copy tunnel does, and no peer is blamed.
func (l *loop) takePipe() *pipe {
	if n := len(l.pipes); n > 0 {
		p := l.pipes[n-1]
		l.pipes = l.pipes[:n-1]
		l.pipesFree.Add(-1)
		l.pipesInUse.Add(1)
		return p
	}
	p, err := l.makePipe()
	if err != nil {
		l.pipeFailures.Add(1)
		return nil
	}
	l.pipesInUse.Add(1)
	return p
}

// putPipe takes a pipe back from a direction. An empty pipe is kept for reuse, up to Options.KeepPipes; one
// still holding bytes (its tunnel ended before they were sent) is closed, and the bytes with it.
func (l *loop) putPipe(p *pipe) {
	l.pipesInUse.Add(-1)
	if p.held == 0 && len(l.pipes) < l.keepPipes {
		l.pipes = append(l.pipes, p)
		l.pipesFree.Add(1)
		return
	}
	p.close()
}

func (p *pipe) close() {
	unix.Close(int(p.r))
	unix.Close(int(p.w))
}

// drain reads the bytes the pipe holds back into memory, leaving it empty. A Detach calls it: bytes that
// spliced into the pipe must reach the next engine as bytes, not vanish with the pipe.
func (p *pipe) drain() ([]byte, error) {
	b := make([]byte, p.held)
	for off := 0; off < len(b); {
		m, err := readPipe(int(p.r), b[off:])
		if err == unix.EINTR {
			continue
		}
		if err == nil && m == 0 {
			err = errors.New("end of pipe")
		}
		if err != nil {
			return nil, fmt.Errorf("read back %d bytes from a pipe: %d read, then %w", len(b), off, err)
		}
		off += m
	}
	p.held = 0
	return b, nil
}

// readPipe reads a pipe back in drain; a test replaces it to make that read fail.
var readPipe = unix.Read

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// spliceIn moves what src has, up to the pipe's size, into the empty pipe p. It returns 0 at EOF.
func spliceIn(src int, p *pipe) (int, error) {
	for {
		n, err := unix.Splice(src, nil, int(p.w), nil, int(p.size), spliceFlags)
		if err != unix.EINTR {
			return int(n), err
		}
	}
}

// spliceOut moves what p holds, or as much of it as dst takes, to dst.
func spliceOut(p *pipe, dst int) (int, error) {
	for {
		n, err := unix.Splice(int(p.r), nil, dst, nil, int(p.held), spliceFlags)
		if err != unix.EINTR {
			return int(n), err
		}
	}
}
