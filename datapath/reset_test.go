package datapath_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/streamtest"
)

// resetRounds is how many tunnels TestResetWhileWrittenToIsAReset resets per case: the engine's two
// directions race for the reset socket, so one round proves little.
const resetRounds = 50

// TestResetWhileWrittenToIsAReset: a peer resets while the engine is writing to it (the other peer's stream
// fills its buffers). The failed write takes the socket's error, so a read of that socket then returns 0, as
// at a FIN; the other peer must still learn of the end as a reset, never as a clean EOF first, and the pair
// must be blamed on the peer that reset.
func TestResetWhileWrittenToIsAReset(t *testing.T) {
	loops := startEventLoop(t)
	engines := []datapath.Engine{datapath.Copier{}, loops.Splice(), loops}
	names := []string{"copy", "splice", "eventloop"}
	for i, e := range engines {
		for _, clientResets := range []bool{true, false} {
			name := names[i] + map[bool]string{true: "/client resets", false: "/upstream resets"}[clientResets]
			t.Run(name, func(t *testing.T) {
				want := datapath.ReasonUpstreamReset
				if clientResets {
					want = datapath.ReasonClientReset
				}
				eofs, wrongReason := 0, 0
				for range resetRounds {
					clean, reason := resetWhileWrittenTo(t, e, clientResets)
					if clean {
						eofs++
					}
					if reason != want {
						wrongReason++
						t.Logf("the pair ended with %q, want %q", reason, want)
					}
				}
				if eofs > 0 || wrongReason > 0 {
					t.Errorf("of %d resets, %d reached the other peer as a clean EOF and %d ended with another reason than %q",
						resetRounds, eofs, wrongReason, want)
				}
			})
		}
	}
}

// resetWhileWrittenTo carries a fresh pair on e, has one peer (the victim) send until the other, which does
// not read, leaves the engine's write to it blocked, then resets that other peer. It reports whether the
// victim read a clean EOF rather than a reset, and the pair's end reason.
func resetWhileWrittenTo(t *testing.T, e datapath.Engine, clientResets bool) (cleanEOF bool, reason string) {
	t.Helper()
	client, relayClient := loopbackPair(t)
	relayUp, upstream := loopbackPair(t)
	p := datapath.NewPair(e.Kind(), datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	t.Cleanup(func() { p.End("test_over", true) })
	resetter, victim := upstream, client
	if clientResets {
		resetter, victim = client, upstream
	}
	_ = resetter.SetReadBuffer(16 << 10)
	e.Carry(p)
	streamtest.FillUntilBlocked(t, victim)
	// The victim has stopped writing: a write of its own would take its socket's error, and its read would
	// then return 0 too.
	_ = resetter.SetLinger(0)
	_ = resetter.Close()
	_ = victim.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, victim)
	switch {
	case err == nil:
		cleanEOF = true
	case !datapath.IsReset(err):
		t.Fatalf("the victim's read ended with %v, want a reset", err)
	}
	return cleanEOF, awaitEnd(t, p)
}

// TestResetTakenBeforeCarryIsAReset: a pair reaches an engine after one peer's reset, whose error a write
// elsewhere already took (the kernel engine's worker writing to it during a give-back, or a parked tunnel's
// last write), so the engine's first read of that socket returns 0, as at a FIN. The other peer must learn of
// the end as a reset, not a clean EOF.
func TestResetTakenBeforeCarryIsAReset(t *testing.T) {
	loops := startEventLoop(t)
	for _, c := range []struct {
		name string
		e    datapath.Engine
	}{{"copy", datapath.Copier{}}, {"eventloop", loops}, {"splice", loops.Splice()}} {
		t.Run(c.name, func(t *testing.T) {
			client, relayClient := loopbackPair(t)
			relayUp, upstream := loopbackPair(t)
			_ = client.SetLinger(0)
			_ = client.Close()
			takeResetWithWrite(t, relayClient)
			p := datapath.NewPair(c.e.Kind(), datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
			t.Cleanup(func() { p.End("test_over", true) })
			c.e.Carry(p)
			_ = upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.Copy(io.Discard, upstream); !datapath.IsReset(err) {
				t.Errorf("the upstream's read ended with %v, want a reset", err)
			}
			if got := awaitEnd(t, p); got != datapath.ReasonClientReset {
				t.Errorf("the pair ended with %q, want %q", got, datapath.ReasonClientReset)
			}
		})
	}
}

// takeResetWithWrite writes to c until a write fails with the reset its peer sent, which takes the socket's
// pending error: a read of c then returns 0.
func takeResetWithWrite(t *testing.T, c *net.TCPConn) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if _, err := c.Write([]byte("x")); err != nil {
			if !datapath.IsReset(err) {
				t.Fatalf("write to the reset socket: %v, want a reset", err)
			}
			return
		}
	}
	t.Fatal("no write to the reset socket failed")
}
