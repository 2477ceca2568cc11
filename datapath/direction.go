package datapath

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/internal/tcpstate"
)

// Direction is one way through a pair: bytes read from its source are written to its destination.
type Direction struct {
	// src and dst are the pair's own endpoints, read when used rather than copied: their peeked bytes are
	// written once, even when the pair moves to another engine, and a direction an engine keeps for the
	// pair's life (the kernel engine's) does not keep the conns alive once the pair has forgotten them
	// (Pair.Hold). An endpoint's TLS, when set, is what bytes are read from and written to instead of its
	// socket.
	src, dst *Endpoint
	counter  *atomic.Uint64
	// finished points at the pair's record that this direction has carried its FIN, so that an engine
	// the pair moves to does not carry it again.
	finished *atomic.Bool
	// srcShut is the other direction's finished: whether the source's own write side is shut (AtEOF).
	srcShut *atomic.Bool
	// fromClient is true for client → upstream; it decides which side an error is blamed on.
	fromClient bool
}

// Directions returns p's two directions: client → upstream, then upstream → client.
func (p *Pair) Directions() [2]*Direction {
	up, down := p.Direction(0), p.Direction(1)
	return [2]*Direction{&up, &down}
}

// Direction returns p's direction i (0: client → upstream, 1: upstream → client) as a value: an engine that
// carries a pair for its life makes it when it needs it rather than keeping one (48 bytes an idle pair).
func (p *Pair) Direction(i int) Direction {
	if i == 0 {
		return Direction{src: &p.client, dst: &p.upstream, counter: &p.toUpstream, finished: &p.finished[0], srcShut: &p.finished[1], fromClient: true}
	}
	return Direction{src: &p.upstream, dst: &p.client, counter: &p.toClient, finished: &p.finished[1], srcShut: &p.finished[0]}
}

// Src and Dst are the direction's source and destination sockets.
func (d *Direction) Src() *net.TCPConn { return d.src.Conn }
func (d *Direction) Dst() *net.TCPConn { return d.dst.Conn }

// FromClient reports whether the direction is client → upstream.
func (d *Direction) FromClient() bool { return d.fromClient }

// Count adds n bytes written to the destination to the pair's counter of this direction.
func (d *Direction) Count(n int) { d.counter.Add(uint64(n)) }

// ioError says which socket an operation of a direction failed on.
type ioError struct {
	onSrc bool // the failing socket is the direction's source (a read), not its destination (a write)
	err   error
}

func (e *ioError) Error() string { return e.err.Error() }
func (e *ioError) Unwrap() error { return e.err }

// ReadErr and WriteErr mark err as a failure on a direction's source (a read) or destination (a write),
// for Direction.Blame.
func ReadErr(err error) error  { return &ioError{onSrc: true, err: err} }
func WriteErr(err error) error { return &ioError{onSrc: false, err: err} }

// Blame names a direction's failure by the side whose socket failed: the source unless err is a WriteErr.
func (d *Direction) Blame(err error) string {
	var ioe *ioError
	client := d.fromClient // a failure on the source of client → upstream is the client's
	if errors.As(err, &ioe) && !ioe.onSrc {
		client = !client
	}
	return Blame(client, err)
}

// Blame names an error on one side of a pair: a reset or another error, the client's or the upstream's.
// Every engine names its failures with it.
func Blame(clientSide bool, err error) string {
	switch {
	case clientSide && IsReset(err):
		return ReasonClientReset
	case clientSide:
		return ReasonClientError
	case IsReset(err):
		return ReasonUpstreamReset
	default:
		return ReasonUpstreamError
	}
}

// IsReset reports whether err says the peer reset the connection. EPIPE is a reset too: a reset that
// arrives after the peer's FIN (CLOSE_WAIT) is reported by Linux as EPIPE, not ECONNRESET (tcp_reset), and
// that is how a browser tab that closes a WebSocket ends it: close frame, FIN, then a reset for the bytes
// that still come.
func IsReset(err error) bool {
	return errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE)
}

// reader is what the direction reads bytes from: the source socket, or its TLS connection.
func (d *Direction) reader() io.Reader {
	if d.src.TLS != nil {
		return d.src.TLS
	}
	return d.src.Conn
}

// writer is what the direction writes bytes to: the destination socket, or its TLS connection.
func (d *Direction) writer() io.Writer {
	if d.dst.TLS != nil {
		return d.dst.TLS
	}
	return d.dst.Conn
}

// WritePeeked sends the bytes the handshake read from the source, before any byte an engine moves; they
// are written once, whichever engine asks first.
func (d *Direction) WritePeeked() error {
	p := d.src.Peeked
	if len(p) == 0 {
		return nil
	}
	n, err := d.writer().Write(p)
	d.src.Peeked = p[n:] // what a stopped write left goes first again, on whatever carries the pair next
	if len(d.src.Peeked) == 0 {
		d.src.Peeked = nil
	}
	d.Count(n)
	if err != nil {
		return WriteErr(err)
	}
	return nil
}

// TakePeeked returns the source's peeked bytes and forgets them: the engine that takes them writes them
// itself (the kernel engine, adopting a pair whose relaying goroutine had read them: they go after bytes
// the verdict redirected before them).
func (d *Direction) TakePeeked() []byte {
	p := d.src.Peeked
	d.src.Peeked = nil
	return p
}

// HoldBackAgain puts bytes TakePeeked took back in front of the source's peeked bytes, for an engine that
// took them and then did not carry the pair.
func (d *Direction) HoldBackAgain(b []byte) {
	if len(b) > 0 {
		d.src.Peeked = append(b, d.src.Peeked...)
	}
}

// holdBack keeps bytes read from the source but not written, when a stop interrupted their write: they
// become the source's peeked bytes, which the next engine writes first.
func (d *Direction) holdBack(b []byte) {
	d.src.Peeked = append(d.src.Peeked, b...)
}

// Finished reports whether the direction has carried its FIN, whichever engine carried it.
func (d *Direction) Finished() bool { return d.finished.Load() }

// MarkFinished records that an engine carried the direction's FIN without Finish (the kernel engine
// shuts the destination down itself).
func (d *Direction) MarkFinished() { d.finished.Store(true) }

// Finish carries the source's FIN to the destination, after every byte before it has been written.
//
// The FIN is marked before the shutdown: the other direction, reading this destination's EOF, must not find
// the socket closed by this FIN and the peer's answer without the mark, and take it for a reset (AtEOF). A
// failed shutdown ends the pair, so the early mark is never relied on.
func (d *Direction) Finish() error {
	d.MarkFinished()
	if d.dst.TLS != nil {
		// close_notify first, so that the peer can tell the end from a truncation; then the FIN.
		if err := d.dst.TLS.CloseWrite(); err != nil {
			return WriteErr(fmt.Errorf("TLS close_notify: %w", err))
		}
	}
	if err := d.dst.Conn.CloseWrite(); err != nil {
		return WriteErr(fmt.Errorf("shutdown write: %w", err))
	}
	return nil
}

// AtEOF is what a pump returns when a read of the source returned 0: nil for the peer's FIN, or a ReadErr
// when the peer reset the socket (ResetAtEOF), so that the reset ends the pair as a reset rather than being
// carried on as a FIN.
func (d *Direction) AtEOF() error {
	raw, err := d.src.Conn.SyscallConn()
	if err != nil {
		return ReadErr(fmt.Errorf("raw source conn at EOF: %w", err))
	}
	var reset error
	if err := raw.Control(func(fd uintptr) { reset = tcpstate.ResetAtEOF(int(fd), d.srcShut.Load) }); err != nil {
		// The source is closed: the pair is ending, most often because the other direction's write to
		// this same peer failed (the reset this EOF stands for). No FIN is carried into that end.
		return ReadErr(fmt.Errorf("source at EOF: %w", err))
	}
	if reset != nil {
		return ReadErr(reset)
	}
	return nil
}

// ResetAtEOF tells a peer's reset from its FIN on TCP socket fd, whose read has just returned 0; writeShut
// says whether the socket's own write side was shut (its FIN sent), for a caller under whose lock that
// cannot change meanwhile. It returns nil for a FIN, else the socket's pending error, or ECONNRESET when a
// write took it (tcpstate.ResetAtEOF says how).
func ResetAtEOF(fd int, writeShut bool) error {
	return tcpstate.ResetAtEOF(fd, func() bool { return writeShut })
}
