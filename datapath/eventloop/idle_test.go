package eventloop

import (
	"testing"
	"unsafe"
)

// A loop keeps one tunnel record per tunnel for the tunnel's life, idle or not: it stays within the
// 192-byte allocation size class (it was 208 with two int indices a direction; a splice direction's pipe
// and auto's read counter took back what int32 descriptors saved), so that holding many idle tunnels
// costs little.
func TestTunnelRecordSize(t *testing.T) {
	if got := unsafe.Sizeof(tunnel{}); got > 192 {
		t.Errorf("a tunnel record is %d bytes, want at most 192", got)
	}
}
