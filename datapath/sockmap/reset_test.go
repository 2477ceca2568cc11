package sockmap

import (
	"io"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
)

// TestResetWhoseErrorWasTakenIsAReset: a peer resets, and another reader of the relay's socket (the psock's
// worker, whose write to the peer fails) takes the socket's error before the loop polls it. The loop then
// sees EPOLLRDHUP and EPOLLHUP without EPOLLERR, as at a FIN; the other peer must still see a reset, never the
// FIN a drain would carry, and the tunnel must be blamed on the peer that reset. The test takes the error
// itself, through a duplicate of the relay's socket, right after the reset; the loop often polls the socket
// first, and that round then checks the EPOLLERR path, so each case resets many tunnels (before the fix,
// 35–49 of 100 reached the other peer as a FIN, and their tunnels then waited half-closed).
func TestResetWhoseErrorWasTakenIsAReset(t *testing.T) {
	const rounds = 100
	k, _ := newTestEngine(t)
	for _, clientResets := range []bool{true, false} {
		t.Run(map[bool]string{true: "client resets", false: "upstream resets"}[clientResets], func(t *testing.T) {
			want := datapath.ReasonUpstreamReset
			if clientResets {
				want = datapath.ReasonClientReset
			}
			eofs := 0
			for range rounds {
				if resetWithErrorTaken(t, k, clientResets, want) {
					eofs++
				}
			}
			if eofs > 0 {
				t.Fatalf("of %d resets, %d reached the other peer as a clean EOF", rounds, eofs)
			}
			assertMapsEmpty(t, k)
		})
	}
}

// resetWithErrorTaken carries a fresh pair on k, resets one peer and takes the relay's socket error facing
// it at once. It reports whether the other peer read a clean EOF rather than a reset, and fails the test on
// another error or, after a reset, another reason.
func resetWithErrorTaken(t *testing.T, k *Engine, clientResets bool, want string) (cleanEOF bool) {
	t.Helper()
	client, relayClient, relayUp, upstream := tunnelEnds(t)
	resetter, facing, victim := upstream, relayUp, client
	if clientResets {
		resetter, facing, victim = client, relayClient, upstream
	}
	dup, err := facing.File() // another reference to the relay's socket, for SO_ERROR
	if err != nil {
		t.Fatal(err)
	}
	p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	k.Carry(p)
	if p.Kind() != datapath.Sockmap || p.Ending() {
		dup.Close()
		t.Fatalf("the pair did not enter the kernel: it runs on %s, ended %q", p.Kind(), p.Reason())
	}
	_ = resetter.SetLinger(0)
	_ = resetter.Close()
	_, _ = unix.GetsockoptInt(int(dup.Fd()), unix.SOL_SOCKET, unix.SO_ERROR)
	dup.Close() // the engine's close must be the socket's last, or its reset waits for this one
	_ = victim.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.Copy(io.Discard, victim)
	if err != nil && !datapath.IsReset(err) {
		t.Fatalf("the other peer's read ended with %v, want a reset", err)
	}
	if err == nil {
		return true // a carried FIN: the tunnel waits half-closed for the other direction, which never ends
	}
	waitEnded(t, p)
	if p.Reason() != want {
		t.Errorf("the pair ended with %q (%v), want %q", p.Reason(), p.Err(), want)
	}
	return err == nil
}
