package eventloop

import (
	"testing"
	"unsafe"
)

// A loop keeps one tunnel record per tunnel for the tunnel's life, idle or not: it stays within the
// 176-byte allocation size class (it was 208, with two int indices a direction), so that holding many
// idle tunnels costs little.
func TestTunnelRecordSize(t *testing.T) {
	if got := unsafe.Sizeof(tunnel{}); got > 176 {
		t.Errorf("a tunnel record is %d bytes, want at most 176", got)
	}
}
