package datapath

import (
	"testing"
	"unsafe"
)

// Every idle tunnel keeps its Pair, and a pair on the event loop its loopCarrier, for the tunnel's life:
// each stays within its allocation size class (docs/datapath.md, "Memory per idle tunnel"), so that a
// field added without care shows here rather than as RSS in make bench. (They were 256 and 96 bytes.)
func TestIdleRecordSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, most uintptr
	}{
		{"Pair", unsafe.Sizeof(Pair{}), 208},
		{"loopCarrier", unsafe.Sizeof(loopCarrier{}), 48},
	} {
		if c.got > c.most {
			t.Errorf("a %s is %d bytes, want at most %d", c.name, c.got, c.most)
		}
	}
}
