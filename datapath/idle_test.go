package datapath_test

import (
	"io"
	"net"
	"runtime"
	"testing"
	"weak"

	"github.com/sockrelay/sockrelay/datapath"
)

// peerAndRelayEnd connects over loopback and returns the peer's end, closed when t ends, and the relay's
// end, which nothing but the caller refers to (loopbackPair's cleanup would keep it alive).
func peerAndRelayEnd(t testing.TB) (peer, relay *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a, err := l.(*net.TCPListener).AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn), a
}

// collected reports whether the conns behind ws are gone after two collections (weak pointers read nil
// once their object has been reclaimed).
func collected(ws []weak.Pointer[net.TCPConn]) []bool {
	runtime.GC()
	runtime.GC()
	gone := make([]bool, len(ws))
	for i, w := range ws {
		gone[i] = w.Value() == nil
	}
	return gone
}

// echoOnce sends a byte each way through a carried pair, so that a pair that lost its sockets fails.
func echoOnce(t *testing.T, client, upstream *net.TCPConn) {
	t.Helper()
	for _, w := range []struct{ from, to *net.TCPConn }{{client, upstream}, {upstream, client}} {
		if _, err := w.from.Write([]byte{'x'}); err != nil {
			t.Fatalf("write: %v", err)
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(w.to, b); err != nil {
			t.Fatalf("read: %v", err)
		}
	}
}

// An idle pair on the event loop keeps no closed conn alive: the loop took the sockets' descriptors and
// closed the conns, and neither the pair nor anything the loop keeps for the pair refers to them (a closed
// conn with its addresses is about 300 bytes, two a tunnel, for as long as the tunnel lives).
func TestEventLoopPairKeepsNoClosedConn(t *testing.T) {
	e := startEventLoop(t)
	client, relayClient := peerAndRelayEnd(t)
	upstream, relayUp := peerAndRelayEnd(t)
	conns := []weak.Pointer[net.TCPConn]{weak.Make(relayClient), weak.Make(relayUp)}
	p := datapath.NewPair(datapath.Copy, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	e.Carry(p)
	if !p.OnEventLoop() {
		t.Fatal("the pair is not on the event loop")
	}
	echoOnce(t, client, upstream)
	for i, gone := range collected(conns) {
		if !gone {
			t.Errorf("conn %d (0: client's, 1: upstream's) is still reachable while the loop carries the pair", i)
		}
	}
	echoOnce(t, client, upstream)
}
