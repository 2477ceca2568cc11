package sockmap

import (
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSocketErrorAfterItWasTaken: the error an EPOLLERR reports is a reset whether this loop reads
// SO_ERROR first or another reader (the psock's worker) took it: a reset socket must not end its tunnel
// as "errno 0", blamed on the wrong cause.
func TestSocketErrorAfterItWasTaken(t *testing.T) {
	for _, taken := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		ln.Close()
		_ = s.(*net.TCPConn).SetLinger(0)
		s.Close() // a reset to c
		raw, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var got error
		deadline := time.Now().Add(5 * time.Second)
		_ = raw.Control(func(fd uintptr) {
			for time.Now().Before(deadline) {
				ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
				if err == nil && ti.State == tcpClose {
					break
				}
				time.Sleep(time.Millisecond)
			}
			if taken {
				_, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR) // another reader took it
			}
			got = socketError(int(fd))
		})
		c.Close()
		if !errors.Is(got, syscall.ECONNRESET) {
			t.Errorf("SO_ERROR taken before: %v: socketError = %v, want ECONNRESET", taken, got)
		}
	}
}
