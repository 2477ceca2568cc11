package datapath_test

import (
	"errors"
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
	peer, relay = dialLoopback(t)
	t.Cleanup(func() { peer.Close() })
	return peer, relay
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

// pairSink keeps the pairs TestPairDoneMadeOnDemand makes on the heap, as a relay's are.
var pairSink *datapath.Pair

// A pair makes its Done channel only when asked for it: most pairs are never waited on, and a channel
// would cost every idle pair 96 bytes. Done, Reason and Err read the same whether Done was asked for
// before the end or after it.
func TestPairDoneMadeOnDemand(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() {
		pairSink = datapath.NewPair(datapath.Copy, datapath.Endpoint{}, datapath.Endpoint{}, nil)
	}); n != 1 {
		t.Errorf("NewPair allocates %v objects, want 1 (the pair alone)", n)
	}
	failure := errors.New("test failure")
	for _, tc := range []struct {
		name        string
		doneAtStart bool
	}{{"Done asked for before the end", true}, {"Done asked for after the end only", false}} {
		t.Run(tc.name, func(t *testing.T) {
			_, relayClient := loopbackPair(t)
			relayUp, _ := loopbackPair(t)
			p := datapath.NewPair(datapath.Copy, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
			if tc.doneAtStart {
				select {
				case <-p.Done():
					t.Fatal("Done is closed before the pair ended")
				default:
				}
			}
			if r, err := p.Reason(), p.Err(); r != "" || err != nil {
				t.Errorf("before the end: Reason %q, Err %v; want none", r, err)
			}
			p.Fail(datapath.ReasonUpstreamError, failure, false)
			select {
			case <-p.Done():
			default:
				t.Fatal("Done is not closed after the pair ended")
			}
			if r, err := p.Reason(), p.Err(); r != datapath.ReasonUpstreamError || err != failure {
				t.Errorf("after the end: Reason %q, Err %v; want %q, %v", r, err, datapath.ReasonUpstreamError, failure)
			}
		})
	}
}
