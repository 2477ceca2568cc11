package handover

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is one end of a handover socket pair.
type Conn struct {
	c *net.UnixConn
}

// Pair returns a connected socket pair: this process's end, and the other end as a file for the new
// process (exec.Cmd.ExtraFiles), which the caller closes once the new process has started.
func Pair() (*Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("handover: socket pair: %w", err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "handover")
	c, err := FromFile(os.NewFile(uintptr(fds[0]), "handover"))
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return c, theirs, nil
}

// FromFile makes a Conn of f, an end of a handover socket pair (the new process's, inherited), and
// closes f: the Conn holds a descriptor of its own.
func FromFile(f *os.File) (*Conn, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("handover: socket %s: %w", f.Name(), err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok || uc.LocalAddr().Network() != "unixpacket" {
		c.Close()
		return nil, fmt.Errorf("handover: %s is not a Unix SOCK_SEQPACKET socket", f.Name())
	}
	return &Conn{c: uc}, nil
}

// Send sends m with files, whose descriptors it carries in the order m's descriptor indexes name them.
// The caller keeps its files: the new process gets descriptors of its own.
func (c *Conn) Send(m Message, files []*os.File) error {
	frame, err := Encode(m, len(files))
	if err != nil {
		return err
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			if fds[i], err = descriptor(f); err != nil {
				return fmt.Errorf("handover: send %s: %s: %w", m.Type, f.Name(), err)
			}
		}
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.c.WriteMsgUnix(frame, oob, nil); err != nil {
		return fmt.Errorf("handover: send %s: %w", m.Type, err)
	}
	return nil
}

// descriptor returns f's descriptor, valid while f is open. Not f.Fd(), which puts the descriptor in
// blocking mode: a mode of the open file, which the sender's own listener shares with this copy, and
// in which its Close would wait for an Accept that no longer wakes up.
func descriptor(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(d uintptr) { fd = int(d) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// Receive waits for the next message and returns it with the files of its descriptors, which the
// caller owns. It returns io.EOF when the peer has closed its end.
func (c *Conn) Receive() (Message, []*os.File, error) {
	buf := make([]byte, headerLen+MaxBody+1) // one byte more: a longer datagram comes back with MSG_TRUNC
	oob := make([]byte, unix.CmsgSpace(MaxFDs*4))
	n, oobn, flags, _, err := c.c.ReadMsgUnix(buf, oob) // Go sets MSG_CMSG_CLOEXEC on Linux
	if err != nil {
		return Message{}, nil, fmt.Errorf("handover: receive: %w", err)
	}
	files, ferr := filesOf(oob[:oobn])
	fail := func(err error) (Message, []*os.File, error) {
		closeFiles(files)
		return Message{}, nil, err
	}
	switch {
	case ferr != nil:
		return fail(ferr)
	case n == 0 && oobn == 0:
		return Message{}, nil, io.EOF
	case flags&unix.MSG_TRUNC != 0:
		return fail(fmt.Errorf("%w: more than %d bytes", ErrTruncated, headerLen+MaxBody))
	case flags&unix.MSG_CTRUNC != 0:
		return fail(fmt.Errorf("handover: descriptors cut off: more than %d arrived with one message", MaxFDs))
	}
	m, err := Decode(buf[:n], len(files))
	if err != nil {
		return fail(err)
	}
	return m, files, nil
}

// filesOf returns the descriptors of the SCM_RIGHTS control messages in oob, as files. The messages are
// parsed one at a time, so that one that cannot be (a malformed header) still leaves the descriptors of
// those before it to close: on any error, every descriptor that arrived is closed.
func filesOf(oob []byte) ([]*os.File, error) {
	var files []*os.File
	var errs []error
	for rest := oob; len(rest) >= unix.CmsgLen(0); {
		var m unix.SocketControlMessage
		var err error
		if m.Header, m.Data, rest, err = unix.ParseOneSocketControlMessage(rest); err != nil {
			errs = append(errs, fmt.Errorf("handover: control message: %w", err))
			break
		}
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			errs = append(errs, fmt.Errorf("handover: control message: %w", err))
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("handover-fd-%d", len(files))))
		}
	}
	if len(errs) > 0 {
		closeFiles(files)
		return nil, errors.Join(errs...)
	}
	return files, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// SetDeadline bounds Send and Receive.
func (c *Conn) SetDeadline(t time.Time) error { return c.c.SetDeadline(t) }

// Close closes this end; the peer's Receive returns io.EOF.
func (c *Conn) Close() error { return c.c.Close() }
