package datapath_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// dupConn is a new connection of c's socket, as another process gets it over SCM_RIGHTS.
func dupConn(t *testing.T, c *net.TCPConn) *net.TCPConn {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nc, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return nc.(*net.TCPConn)
}

// TestParkAndRestore hands a live pair over as an upgrade does, again and again while both directions
// carry 8 MiB (the client half-closing first): the engine parks it, a new pair is made of duplicates of
// its sockets and its State, the old pair ends closing only its own descriptors, and another engine
// carries the new one. Every byte arrives once, in order, each FIN after the last byte before it, and the
// counters go on.
func TestParkAndRestore(t *testing.T) {
	copier, loop := datapath.Copier{}, startEventLoop(t)
	splicer := loop.Splice()
	for _, tc := range []struct {
		name     string
		from, to datapath.Engine
	}{
		{"eventloop-eventloop", loop, loop}, {"copy-eventloop", copier, loop}, {"splice-splice", splicer, splicer},
		{"eventloop-splice", loop, splicer},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tn := newTunnel(t, tc.from.Kind(), 8<<20)
			tc.from.Carry(tn.pair)
			cur, moves, engines := tn.pair, 0, []datapath.Engine{tc.to, tc.from}
			tn.exchange(t, func() {
				switch err := cur.Park(); {
				case errors.Is(err, datapath.ErrPairEnded):
					return
				case err != nil:
					t.Errorf("park: %v", err)
					return
				}
				st := cur.State()
				next := engines[moves%2]
				p := datapath.RestorePair(next.Kind(), datapath.Endpoint{Conn: dupConn(t, cur.Client().Conn)},
					datapath.Endpoint{Conn: dupConn(t, cur.Upstream().Conn)}, st, nil)
				cur.End("handed_over", false)
				next.Carry(p)
				cur = p
				moves++
			})
			t.Cleanup(func() { cur.End("test_over", true) })
			select {
			case <-cur.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the pair did not end after both sides half-closed")
			}
			if cur.Reason() != datapath.ReasonClosed {
				t.Errorf("the last pair ended with %q (%v), want %q", cur.Reason(), cur.Err(), datapath.ReasonClosed)
			}
			up, down := cur.Bytes()
			if up != uint64(len(tn.toUpstream)) || down != uint64(len(tn.toClient)) {
				t.Errorf("counted %d and %d bytes, want %d each", up, down, len(tn.toUpstream))
			}
			if moves < 4 {
				t.Errorf("the pair was handed over %d times during the exchange, want at least 4", moves)
			}
		})
	}
}
