package tcpstate

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestResetAtEOF checks ResetAtEOF on a socket whose read has returned 0, for a FIN and for a reset. In
// "both FINs crossing the check" the socket's own FIN goes out, and the peer's answer closes the socket,
// just after writeShut is asked and said "not shut": as when the copy engine's other direction carries
// its FIN while this one checks its EOF (a goroutine preempted between the two). Asked before the state
// was read, writeShut's answer was out of date, and the two FINs read as a reset.
func TestResetAtEOF(t *testing.T) {
	for _, tc := range []struct {
		name string
		// writeShut is ResetAtEOF's writeShut for the socket s (the peer has sent its FIN, s read it),
		// after shutting s itself where the case says so.
		writeShut func(t *testing.T, s *net.TCPConn) func() bool
		reset     bool
	}{
		{"the peer's FIN", func(*testing.T, *net.TCPConn) func() bool {
			return func() bool { return false }
		}, false},
		{"both FINs before the check", func(t *testing.T, s *net.TCPConn) func() bool {
			shutAndWaitClosed(t, s)
			return func() bool { return true }
		}, false},
		{"both FINs crossing the check", func(t *testing.T, s *net.TCPConn) func() bool {
			shut := false
			return func() bool {
				was := shut
				if !shut {
					shut = true
					shutAndWaitClosed(t, s)
				}
				return was
			}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peer, s := loopbackPair(t)
			if err := peer.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			readEOF(t, s)
			writeShut := tc.writeShut(t, s)
			err := atEOF(t, s, writeShut)
			if got := err != nil; got != tc.reset {
				t.Errorf("ResetAtEOF returned %v, want a reset: %v", err, tc.reset)
			}
		})
	}
}

// TestResetAtEOFOfResetTakenByWrite: a peer's reset whose error a write took reads as 0, as a FIN: ResetAtEOF
// says it was a reset.
func TestResetAtEOFOfResetTakenByWrite(t *testing.T) {
	peer, s := loopbackPair(t)
	_ = peer.SetLinger(0)
	_ = peer.Close()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := s.Write([]byte("x")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no write to the reset socket failed")
		}
	}
	readEOF(t, s)
	if err := atEOF(t, s, func() bool { return false }); !errors.Is(err, unix.ECONNRESET) {
		t.Errorf("ResetAtEOF returned %v, want ECONNRESET", err)
	}
}

// loopbackPair returns the two ends of a fresh loopback TCP connection, closed when t ends.
func loopbackPair(t *testing.T) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dialed, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialed.Close() })
	accepted, err = ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { accepted.Close() })
	return dialed, accepted
}

// readEOF reads s until its read returns 0 (io.EOF).
func readEOF(t *testing.T, s *net.TCPConn) {
	t.Helper()
	_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, s); err != nil {
		t.Fatalf("read to EOF: %v", err)
	}
}

// shutAndWaitClosed sends s's FIN, after the peer's, and waits until the peer's answer has closed s (CLOSE).
func shutAndWaitClosed(t *testing.T, s *net.TCPConn) {
	t.Helper()
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		var state uint8
		withFD(t, s, func(fd int) {
			if ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				state = ti.State
			}
		})
		if state == tcpClose {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the socket is in TCP state %d 5s after both FINs, want CLOSE", state)
		}
	}
}

// atEOF is ResetAtEOF on s's descriptor.
func atEOF(t *testing.T, s *net.TCPConn, writeShut func() bool) (reset error) {
	t.Helper()
	withFD(t, s, func(fd int) { reset = ResetAtEOF(fd, writeShut) })
	return reset
}

// withFD runs f with s's descriptor.
func withFD(t *testing.T, s *net.TCPConn, f func(fd int)) {
	t.Helper()
	raw, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := raw.Control(func(fd uintptr) { f(int(fd)) }); err != nil {
		t.Fatal(err)
	}
}
