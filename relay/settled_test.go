package relay

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// TestShutdownSettlesAfterHandshakes: Settled closes only once the handshakes in progress have
// opened their tunnels (a tcp listener's too, which no http.Server waits for) and every drain hold is
// released: an upgrade's old process, done handing tunnels over when it closes, then leaves none behind
// that could have moved.
func TestShutdownSettlesAfterHandshakes(t *testing.T) {
	addr, _ := rawEcho(t, false)
	pool := newPool(t, "db", []string{addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{listener: "tcp", prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	// A stand-in for the ClientHello read: the handshake stays in progress until released.
	entered, release := make(chan struct{}), make(chan struct{})
	held := func(net.Conn, time.Duration) (string, []byte, error) {
		close(entered)
		<-release
		return "", nil, nil
	}
	c, err := net.Dial("tcp", serveTCP(t, r, ListenerOptions{Name: "tcp"}, held))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the tcp listener did not start the handshake")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- r.Shutdown(ctx) }()
	notSettled(t, r, "with a tcp handshake in progress")
	close(release)
	select {
	case <-r.Settled():
	case <-time.After(5 * time.Second):
		t.Fatal("not settled 5s after the handshake was let go on")
	}
	if n := r.Tunnels().Len(); n != 1 {
		t.Errorf("settled with %d tunnels live, want the one the handshake opened", n)
	}
	c.Close()
	if err := <-done; err != nil {
		t.Errorf("Shutdown = %v, want nil: the tunnel ended within the drain time", err)
	}

	// A drain hold (a process still taking tunnels from its own predecessor) keeps it from settling too.
	r = startRelay(t, DatapathCopy, []string{addr})
	releaseHold := r.HoldDrain()
	go func() { done <- r.Shutdown(ctx) }()
	notSettled(t, r, "with a drain hold")
	releaseHold()
	select {
	case <-r.Settled():
	case <-time.After(5 * time.Second):
		t.Fatal("not settled 5s after the last hold was released")
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown = %v, want nil: no tunnel to drain", err)
	}
}

// notSettled fails the test if r settles within 200ms.
func notSettled(t *testing.T, r *testRelay, while string) {
	t.Helper()
	select {
	case <-r.Settled():
		t.Fatalf("settled %s (%d tunnels live)", while, r.Tunnels().Len())
	case <-time.After(200 * time.Millisecond):
	}
}
