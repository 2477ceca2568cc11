// Package tcpstate reads a TCP socket's state where the datapath must tell a peer's reset from its FIN. It is
// shared by datapath and datapath/eventloop, which may not import datapath.
package tcpstate

import "golang.org/x/sys/unix"

// tcpClose is TCP_CLOSE (include/net/tcp_states.h).
const tcpClose = 7

// ResetAtEOF tells a peer's reset from its FIN on TCP socket fd, whose read has just returned 0; writeShut
// reports whether the socket's own write side was shut (its FIN sent).
//
// A reset's error is taken by the first system call on the socket that reports it: when a write to the
// resetting peer fails with it (ECONNRESET, or EPIPE), a read of the same socket then returns 0, as at a FIN.
// Carrying that "FIN" would let the other peer see a clean end before the reset (docs/datapath.md, "FIN, RST
// and the end of a tunnel"). The state tells them apart: a socket that received a FIN is CLOSE_WAIT (LAST_ACK,
// CLOSING or, once shut itself, TIME_WAIT, whose socket reads as CLOSE), while a reset one is CLOSE. It
// returns nil for a FIN, else the socket's pending error, or ECONNRESET when a write took it. A FIN followed
// by a reset before the read counts as the reset: the reset tears both sides down either way.
//
// writeShut is asked only after the state is read, because another goroutine may shut the socket meanwhile
// (the copy engine's other direction carrying its FIN, marked before its shutdown): asked first, it could
// say "not shut" while that FIN and the peer's answer closed the socket before the state was read, and
// the two FINs would read as a reset.
func ResetAtEOF(fd int, writeShut func() bool) error {
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil || ti.State != tcpClose {
		return nil
	}
	if writeShut() {
		return nil // a socket closed by both FINs reads as CLOSE too; a reset after them reads as an error
	}
	if soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err == nil && soErr != 0 {
		return unix.Errno(soErr)
	}
	return unix.ECONNRESET
}
