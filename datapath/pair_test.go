package datapath_test

import (
	"net"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// countingCarrier is a Carrier that counts its releases.
type countingCarrier struct{ released int }

func (c *countingCarrier) Pending() (uint64, uint64) { return 0, 0 }
func (c *countingCarrier) LastActive() time.Time     { return time.Time{} }
func (c *countingCarrier) Release()                  { c.released++ }

// TestEndIfHeld: an engine that decided to end a pair ends it only while it still carries it. Once it
// let go (the pair given back alive) and another engine holds the pair, its late end does nothing; the
// engine that holds it can end it.
func TestEndIfHeld(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func() *net.TCPConn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.TCPConn)
	}
	p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: dial()}, datapath.Endpoint{Conn: dial()}, nil)
	first, next := &countingCarrier{}, &countingCarrier{}
	if held, err := p.Hold(datapath.Sockmap, first, nil); !held || err != nil {
		t.Fatalf("hold: %v %v", held, err)
	}
	if !p.Let(first) {
		t.Fatal("the first carrier could not let go")
	}
	if held, err := p.Hold(datapath.Copy, next, nil); !held || err != nil {
		t.Fatalf("hold by the next carrier: %v %v", held, err)
	}
	if p.EndIfHeld(first, datapath.ReasonStalled, true) {
		t.Error("EndIfHeld by the carrier that let go ended the pair")
	}
	if p.Ending() || first.released+next.released != 0 {
		t.Fatalf("after the late end the pair is ending %v (%q); releases %d and %d, want none", p.Ending(), p.Reason(),
			first.released, next.released)
	}
	if !p.EndIfHeld(next, datapath.ReasonClosed, false) {
		t.Error("EndIfHeld by the carrier that holds the pair did not end it")
	}
	<-p.Done()
	if p.Reason() != datapath.ReasonClosed || next.released != 1 {
		t.Errorf("the pair ended %q, the carrier released %d times; want %q, once", p.Reason(), next.released, datapath.ReasonClosed)
	}
}
