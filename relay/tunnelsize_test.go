package relay

import (
	"testing"
	"unsafe"
)

// Every idle tunnel keeps its Tunnel for its life: it stays within the 208-byte allocation size class
// (it was 232 bytes, in the 240 class, before what only an adopted tunnel needs went behind a pointer), so
// that a field added without care shows here rather than as RSS in make bench (docs/datapath.md, "Memory
// per idle tunnel").
func TestTunnelRecordSize(t *testing.T) {
	if got := unsafe.Sizeof(Tunnel{}); got > 208 {
		t.Errorf("a Tunnel is %d bytes, want at most 208", got)
	}
}

// TestAutoTrackSize: what auto's sampler keeps of a tunnel it can move fits the 144-byte size class (it
// was 152 bytes, in the 160 class, with lastAt a time.Time and the move count in it; History's QuietMost
// then took it from 128 to 136). Only a tunnel the policy in force can move has one: under LoopFirst, no
// tunnel on the loop.
func TestAutoTrackSize(t *testing.T) {
	if got := unsafe.Sizeof(autoTrack{}); got > 144 {
		t.Errorf("an autoTrack is %d bytes, want at most 144", got)
	}
}
