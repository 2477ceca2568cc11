package main

import (
	"strings"
	"testing"
	"time"
)

// TestUpgradeNewProcessNeverAnswers: a new process that adopts a batch of tunnels and never answers
// (the test hook) leaves them with the old process: past the answer timeout (500ms here, 10s in a
// relay) the old one tells it to drop the batch and carries every tunnel on itself, without a byte lost,
// cut or reset; the new one drops them (closing its descriptors only) and carries none, and the old one
// exits once its tunnels end.
func TestUpgradeNewProcessNeverAnswers(t *testing.T) {
	const streams, pingers = 40, 10
	up := newCheckedUpstream(t)
	r := startUpgradableOn(t, "copy", up.addr, 20*time.Second, refuseTunnelsEnv+"=silent", adoptAnswerTimeoutEnv+"=500ms")
	tr := startTraffic(t, r.listen, up, streams, pingers, streamPace)
	oldIDs, _ := tunnelIDs(t, r.admin)
	time.Sleep(200 * time.Millisecond)

	tr.upgrading.Store(true)
	if code, out := r.upgrade(t); code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	// One line per batch: the tunnels' carried bytes may split them into more than one.
	if !pollFor(10*time.Second, func() bool { return keptBack(r.logs) >= len(oldIDs) }) {
		t.Fatalf("the old process did not take the batches back:\n%s", r.logs)
	}
	tr.upgrading.Store(false)
	if n := keptBack(r.logs); n != len(oldIDs) {
		t.Errorf("the old process took back %d tunnels, want all %d", n, len(oldIDs))
	}
	for _, kept := range r.logs.lines("upgrade: the new process did not take a batch of tunnels; they stay here") {
		if err, _ := kept["err"].(string); !strings.Contains(err, "timeout") {
			t.Errorf("the old process kept a batch of %v tunnels (%v), want for want of an answer in time", kept["tunnels"], kept["err"])
		}
	}
	// The new process drops the batch it was sent, the first kept back: the tunnels parked for the next
	// batches (when one message could not hold them all) are kept without being sent.
	sent := r.logs.lines("upgrade: the new process did not take a batch of tunnels; they stay here")[0]["tunnels"].(float64)
	waitFor(t, "the new process to drop the batch", func() bool { return len(closedAs(r.logs, "handed_back")) == int(sent) })
	if ids, _ := tunnelIDs(t, r.admin); len(ids) != 0 { // the admin is the new process's now
		t.Errorf("the new process carries tunnels %v, want none", ids)
	}
	time.Sleep(300 * time.Millisecond) // traffic on the old process
	select {
	case err := <-r.exited:
		t.Fatalf("the old process exited (%v) while it carried the tunnels it kept:\n%s", err, r.logs)
	default:
	}
	worst := tr.finish(t, r.logs)
	r.waitExit(t, 5*time.Second) // its tunnels ended
	if n := len(closedAs(r.logs, "closed")); n != len(oldIDs) {
		t.Errorf("%d tunnels closed cleanly (both FINs), want all %d, by the old process", n, len(oldIDs))
	}
	t.Logf("the longest ping-pong round trip: %s while the old process waited for the answer, %s outside it",
		worst.during.Round(time.Millisecond), worst.outside.Round(time.Millisecond))
}

// keptBack sums the tunnels of the batches the old process took back for want of the new one's answer.
func keptBack(logs *logFile) int {
	n := 0
	for _, l := range logs.lines("upgrade: the new process did not take a batch of tunnels; they stay here") {
		v, _ := l["tunnels"].(float64)
		n += int(v)
	}
	return n
}

// closedAs returns the "tunnel closed" log lines of reason.
func closedAs(logs *logFile, reason string) []map[string]any {
	var out []map[string]any
	for _, l := range logs.lines("tunnel closed") {
		if l["reason"] == reason {
			out = append(out, l)
		}
	}
	return out
}
