package relay

import (
	"context"
	"errors"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// TestServeListenerAfterShutdown: a listener served after Shutdown is closed at once.
func TestServeListenerAfterShutdown(t *testing.T) {
	r := startRelay(t, DatapathCopy, []string{"127.0.0.1:9"})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	r.Shutdown(ctx)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.ServeListener("late", ln, DatapathAuto); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("ServeListener after Shutdown: %v, want ErrServerClosed", err)
	}
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Error("the late listener still accepts connections")
	}
}

// TestLeaseReleasedOnEveryRefusal: a handshake that does not become a tunnel gives its server's
// slot back, whether the upstream refused it (its answer passed on) or the client left while the upstream
// thought; otherwise max_tunnels and least_tunnels would count phantom tunnels for ever.
func TestLeaseReleasedOnEveryRefusal(t *testing.T) {
	up := startUpstream(t)
	pool := newPool(t, "p", []string{up.Addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	live := func() int64 { return serverState(t, pool, up.Addr).LiveTunnels }
	waitLive0 := func(what string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); live() != 0; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the server still counts %d live tunnels", what, live())
			}
		}
	}

	// The upstream answers 403 with a body: passed on, then released.
	go func() {
		u := up.next(t)
		u.Write([]byte("HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"))
		u.Close()
	}()
	if c := dialRelay(t, r.Addr, upgradeRequest("/"), nil); c.Resp.StatusCode != http.StatusForbidden {
		t.Fatalf("status %d, want 403", c.Resp.StatusCode)
	}
	waitLive0("after a 403")

	// The client leaves while the upstream holds its answer.
	c, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte(upgradeRequest("/")))
	held := up.next(t)
	defer held.Close()
	if live() != 1 {
		t.Fatalf("live %d during the handshake, want 1", live())
	}
	c.Close()
	waitLive0("after the client left mid-handshake")

	// A plain request holds a slot while it runs, and gives it back.
	go func() {
		u := up.next(t)
		u.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"))
		u.Close()
	}()
	resp, err := http.Get("http://" + r.Addr + "/page")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	waitLive0("after a plain request")
}
