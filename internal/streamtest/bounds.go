package streamtest

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// TCPBufferMax is the largest size net.ipv4.<name> (tcp_rmem or tcp_wmem) lets a socket buffer grow to:
// its third field.
func TCPBufferMax(t testing.TB, name string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/net/ipv4/" + name)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		t.Fatalf("net.ipv4.%s is %q, want three sizes", name, b)
	}
	n, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		t.Fatalf("net.ipv4.%s: %v", name, err)
	}
	return n
}

// KernelOneWayBound is the most a kernel (sockmap) tunnel with held limit limit may hold in one direction:
// the two sockets' buffers on its path at the largest this machine lets them grow, the held limit, and the
// room the engine may add to the relay's socket ahead of passed bytes (twice the limit and a quarter, and
// four skbs of skb bytes; docs/datapath.md, "Backpressure").
func KernelOneWayBound(t testing.TB, limit, skb int64) int64 {
	t.Helper()
	return 2*(TCPBufferMax(t, "tcp_rmem")+TCPBufferMax(t, "tcp_wmem")) + limit + 2*(limit+limit/4+2*skb)
}

// KernelBothStoppedBound is the most a client may send into a kernel tunnel whose peers both stopped
// reading: both directions' KernelOneWayBound, and the passed bytes that may pile up uncharged before the
// overflow rule clamps the window (with the largest receive buffer).
func KernelBothStoppedBound(t testing.TB, limit, skb int64) int64 {
	t.Helper()
	return 2*KernelOneWayBound(t, limit, skb) + 4*limit + 2*TCPBufferMax(t, "tcp_rmem")
}
