package relay

import (
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/auto"
)

// TestAutoSampleDropsNoTunnelThePolicyPutInForceMeanwhileMoves: a sample that began under LoopFirst, during
// which a policy that moves loop tunnels is put in force (apply), must not drop a loop tunnel it still
// tracks: apply's trackOpen skipped that tunnel as tracked, so a drop pins it on the loop for life. The
// decide hook swaps the policy while the sample runs, between two tunnels: the interleaving where apply's
// swap and trackOpen both ran between the sample's lock of the kernel tunnel and its lock of the loop one.
func TestAutoSampleDropsNoTunnelThePolicyPutInForceMeanwhileMoves(t *testing.T) {
	requireSockmap(t)
	old := auto.LoopFirst
	old.Start, old.Interval = auto.Kernel, time.Hour // the test samples; the sampler's ticker never fires
	busy := auto.KernelForBusy
	busy.Interval = time.Hour
	var r *testRelay
	swapped := false
	decide := func(_ auto.Policy, s auto.Sample, _ auto.History) auto.Decision {
		if s.Engine == auto.Kernel && !swapped {
			swapped = true
			r.auto.policy.Store(&busy) // apply's swap; its trackOpen finds every tunnel here tracked
		}
		return auto.Decision{}
	}
	up := startUpstream(t)
	r = startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(old, decide))
	c0, u0 := openTunnel(t, r.Addr, up, nil, nil)
	c, u := openTunnel(t, r.Addr, up, nil, nil)
	defer pingThrough(t, c0, u0) // both tunnels' ends stay referenced to the end of the test
	ts := r.Tunnels().Tunnels()
	a, b := ts[0], ts[1]
	// Carried by the kernel engine, not only named sockmap: a tunnel is named for its engine before the
	// engine has taken it, and a move started before then is no move of a kernel tunnel.
	waitFor(t, 10*time.Second, "both tunnels in the kernel", func() bool {
		return a.Datapath() == DatapathSockmap && b.Datapath() == DatapathSockmap && r.kernel.Tunnels() == 2
	})
	if err := datapath.Move(b.pair, r.auto.engineOf(auto.Loop)); err != nil {
		t.Fatal(err)
	}
	pingThrough(t, c, u)
	for try := 0; ; try++ {
		if try == 100 {
			t.Fatal("the sample never reached the kernel tunnel before the loop one")
		}
		r.auto.policy.Store(&old)
		swapped = false
		_, carrier, _ := a.pair.Counts()
		r.auto.mu.Lock()
		r.auto.tracked = map[*Tunnel]*autoTrack{a: {carrier: carrier}, b: {}}
		r.auto.mu.Unlock()
		bFirst := false
		r.auto.decide = func(p auto.Policy, s auto.Sample, h auto.History) auto.Decision {
			_, bFirst = r.auto.tracked[b] // m.mu held: b is still there unless the sample dropped it first
			bFirst = !bFirst
			return decide(p, s, h)
		}
		r.auto.sample(time.Now())
		if !swapped {
			t.Fatal("the sample did not decide on the kernel tunnel")
		}
		if bFirst {
			continue // b was dropped under LoopFirst, before the change: trackOpen would track it again
		}
		if _, tracked := r.auto.movesOf(b); !tracked {
			t.Fatalf("try %d: the loop tunnel is not tracked once KernelForBusy, which moves loop tunnels, is in force", try)
		}
		return
	}
}
