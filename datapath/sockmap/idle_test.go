package sockmap

import (
	"io"
	"net"
	"runtime"
	"testing"
	"unsafe"
	"weak"

	"github.com/sockrelay/sockrelay/datapath"
)

// An idle pair in the kernel keeps no closed conn alive: the engine took the sockets' descriptors and
// closed the conns, and neither the pair nor the engine's tunnel (its sides, its directions) refers to them
// (a closed conn with its addresses is about 300 bytes, two a tunnel, for as long as the tunnel lives).
func TestKernelPairKeepsNoClosedConn(t *testing.T) {
	k, _ := newTestEngine(t)
	client, relayClient, relayUp, upstream := tunnelEnds(t) // the relay's ends: only the pair's
	conns := []weak.Pointer[net.TCPConn]{weak.Make(relayClient), weak.Make(relayUp)}
	p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	k.Carry(p)
	if p.Kind() != datapath.Sockmap || p.Ending() {
		t.Fatalf("the pair did not enter the kernel: it runs on %s, ended %q", p.Kind(), p.Reason())
	}
	echo := func() {
		for _, w := range []struct{ from, to *net.TCPConn }{{client, upstream}, {upstream, client}} {
			if _, err := w.from.Write([]byte{'x'}); err != nil {
				t.Fatalf("write: %v", err)
			}
			if _, err := io.ReadFull(w.to, make([]byte, 1)); err != nil {
				t.Fatalf("read: %v", err)
			}
		}
	}
	echo()
	runtime.GC()
	runtime.GC()
	for i, w := range conns {
		if w.Value() != nil {
			t.Errorf("conn %d (0: client's, 1: upstream's) is still reachable while the kernel carries the pair", i)
		}
	}
	echo()
}

// The engine keeps one kernelTunnel per tunnel for the tunnel's life, idle or not: what only a demoted
// direction needs is made on its first demotion, and what only a draining one needs at its FIN, so that
// the record fits the 448-byte allocation size class (it was 704, then 576).
func TestKernelTunnelRecordSize(t *testing.T) {
	if got := unsafe.Sizeof(kernelTunnel{}); got > 448 {
		t.Errorf("a kernel tunnel record is %d bytes, want at most 448", got)
	}
}
