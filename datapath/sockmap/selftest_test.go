package sockmap

import (
	"errors"
	"testing"
)

func TestSelfTestPasses(t *testing.T) {
	k, _ := newTestEngine(t)
	for range 5 {
		if err := k.selfTest(); err != nil {
			t.Fatal(err)
		}
	}
	assertMapsEmpty(t, k)
}

// TestSelfTestRejectsBrokenDatapath breaks the FIN drain on purpose (the naive relay of docs/datapath.md, which
// shuts the peer down as soon as EOF is seen) and checks that the self-test refuses it. What the relay does
// then (sockmap by name does not start; auto falls back to splice and says so) is relay's
// TestSelfTestFailureRefusesSockmap.
func TestSelfTestRejectsBrokenDatapath(t *testing.T) {
	k, _ := newTestEngine(t)
	k.breakFINDrain()
	if err := k.selfTest(); !errors.Is(err, ErrSelfTest) {
		t.Fatalf("self-test of a datapath that carries FIN early: %v, want ErrSelfTest", err)
	}
}
