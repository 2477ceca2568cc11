package relay

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/fdlimit"
)

// handOverTo moves the live tunnel tun from the server from to the server to, on to's listener, as an
// upgrade does between two processes: parked here (once its handshake has handed it to an engine, as the
// upgrade waits), adopted there, let go of here, carried there.
func handOverTo(t *testing.T, from *testRelay, to *testRelay, tun *Tunnel, listener string) *Tunnel {
	t.Helper()
	var pt *ParkedTunnel
	var err error
	waitFor(t, 10*time.Second, "an engine carries the tunnel", func() bool {
		pt, err = from.Park(tun)
		return !errors.Is(err, datapath.ErrNotCarried)
	})
	if err != nil {
		t.Fatalf("park tunnel %d: %v", tun.ID, err)
	}
	client, upstream, err := pt.Files()
	if err != nil {
		t.Fatal(err)
	}
	adopted, err := to.Adopt(Adoption{ID: tun.ID, ClientAddr: tun.ClientAddr, UpstreamAddr: tun.UpstreamAddr,
		Pool: tun.Pool, Listener: listener, Datapath: pt.Datapath, Started: tun.Started, LastActive: pt.LastActive,
		ClientIP: pt.ClientIP, Kernel: pt.Kernel, State: pt.State, Client: client, Upstream: upstream})
	if err != nil {
		t.Fatalf("adopt tunnel %d: %v", tun.ID, err)
	}
	from.HandedOver(pt)
	to.CarryAdopted(adopted)
	return adopted
}

// TestAdoptTakesLimitSlots: tunnels an upgrade hands over count under the new process's limits, the
// relay's and their listener's: they are adopted even past a limit (a live tunnel is never reset for
// one) and carry their bytes, handshakes past the limit are refused while they live, and their slots are
// given back as they end.
func TestAdoptTakesLimitSlots(t *testing.T) {
	for _, tc := range []struct {
		name     string
		relay    Limits // the new process's Config.Limits
		listener Limits // its listener "edge"'s
		adopted  int    // tunnels handed over, all on "edge"
		reason   string // of the refusal of a handshake on "edge" from the adopted tunnels' address
	}{
		{"relay max_tunnels, adopted past it", Limits{MaxTunnels: 1}, Limits{}, 2, FailLimitTunnels},
		{"listener max_tunnels_per_ip", Limits{}, Limits{MaxTunnelsPerIP: 1}, 1, FailLimitTunnelsPerIP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t)
			old := startRelay(t, DatapathCopy, []string{up.Addr})
			next := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.Limits = tc.relay })
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			edge, err := next.PrepareListener(ln, ListenerOptions{Name: "edge", Limits: tc.listener})
			if err != nil {
				t.Fatal(err)
			}
			go edge.Serve()

			type ends struct {
				c *clientConn
				u *upstreamConn
			}
			var moved []ends
			for range tc.adopted {
				c, u := openTunnel(t, old.Addr, up, nil, nil)
				moved = append(moved, ends{c, u})
			}
			for _, tun := range old.Tunnels().Tunnels() {
				handOverTo(t, old, next, tun, "edge")
			}
			if n := next.Tunnels().Len(); n != tc.adopted {
				t.Fatalf("the new server carries %d tunnels, want all %d handed over, limits or not", n, tc.adopted)
			}
			for i, e := range moved {
				if _, err := e.c.Write([]byte("after")); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 5)
				_ = e.u.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(e.u.R, buf); err != nil || string(buf) != "after" {
					t.Errorf("adopted tunnel %d: the upstream read %q, %v; want the client's bytes", i, buf, err)
				}
			}

			if resp, _ := dialFrom(t, "127.0.0.1", ln.Addr().String()); resp.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("a handshake while the adopted tunnels hold the slots: %d, want 503", resp.StatusCode)
			}
			if n := next.failures(tc.reason); n != 1 {
				t.Errorf("%s refusals: %v, want 1", tc.reason, n)
			}

			for _, e := range moved {
				e.c.Close()
				e.u.Close()
			}
			waitTunnelsGone(t, next)
			c, u := openTunnel(t, ln.Addr().String(), up, nil, nil) // their slots are back
			c.Close()
			u.Close()
		})
	}
}

// TestHoldDrainWaitsForAdoptions: a server that holds its drain (as a process adopting an upgrade's
// tunnels does) and has no tunnel yet does not end its Shutdown: a tunnel handed over meanwhile is
// adopted and carried, and Shutdown returns once the hold is released and that tunnel has ended.
func TestHoldDrainWaitsForAdoptions(t *testing.T) {
	up := startUpstream(t)
	old := startRelay(t, DatapathCopy, []string{up.Addr})
	next := startRelay(t, DatapathCopy, []string{up.Addr})
	release := next.HoldDrain()
	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stopped <- next.Shutdown(ctx)
	}()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-stopped:
		t.Fatalf("Shutdown returned (%v) while its drain was held", err)
	default:
	}

	c, u := openTunnel(t, old.Addr, up, nil, nil)
	handOverTo(t, old, next, old.Tunnels().Tunnels()[0], DefaultListener)
	if _, err := c.Write([]byte("moved")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	_ = u.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(u.R, buf); err != nil || string(buf) != "moved" {
		t.Fatalf("the tunnel adopted during the held drain: the upstream read %q, %v", buf, err)
	}
	release()
	c.Close()
	u.Close()
	select {
	case err := <-stopped:
		if err != nil {
			t.Errorf("Shutdown: %v, want nil: the adopted tunnel ended within the drain", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown had not returned 10s after the hold was released and the tunnel ended")
	}
}

// TestHandOverKeepsClientIPBehindProxy: a tunnel opened through a trusted proxy, handed over on each
// engine that can move (copy, and sockmap with the BPF objects adopted), counts in the new process under
// the client's address the proxy named, not the proxy's: a handshake from that client past the
// listener's max_tunnels_per_ip is refused there.
func TestHandOverKeepsClientIPBehindProxy(t *testing.T) {
	const client = "198.51.100.7"
	trusted := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	request := "GET /tunnel HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"X-Forwarded-For: " + client + "\r\nSec-WebSocket-Key: " + testKey + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
	for _, dp := range []Datapath{DatapathCopy, DatapathSockmap} {
		t.Run(string(dp), func(t *testing.T) {
			if dp == DatapathSockmap {
				requireSockmap(t)
			}
			up := startUpstream(t)
			old := startRelay(t, dp, []string{up.Addr})
			oldEdge := serveEdge(t, old, ListenerOptions{Name: "edge", TrustedProxies: trusted})
			var objs func(*Config)
			if dp == DatapathSockmap {
				files, err := old.ExportKernel()
				if err != nil {
					t.Fatal(err)
				}
				objs = func(c *Config) { c.KernelObjects = files }
				old.HandKernelTunnels()
			}
			next := startRelay(t, dp, []string{up.Addr}, func(c *Config) {
				if objs != nil {
					objs(c)
				}
			})
			edge := serveEdge(t, next, ListenerOptions{Name: "edge", TrustedProxies: trusted, Limits: Limits{MaxTunnelsPerIP: 1}})

			c, u := openTunnelWith(t, oldEdge, up, request, nil, nil)
			defer c.Close()
			defer u.Close()
			tun := onlyTunnel(t, old)
			waitKind(t, tun, dp)
			moved := handOverTo(t, old, next, tun, "edge")
			if moved.pair.Kind() != dp {
				t.Fatalf("the adopted tunnel runs on %s, want %s", moved.pair.Kind(), dp)
			}
			if moved.clientIP != client {
				t.Errorf("the adopted tunnel counts under %q, want the client's address %q", moved.clientIP, client)
			}
			if code := handshakeStatus(t, edge, request); code != http.StatusServiceUnavailable {
				t.Errorf("a second handshake from %s while its adopted tunnel holds the one slot: %d, want 503", client, code)
			}
		})
	}
}

// serveEdge serves a listener of r with opts on a loopback port, and returns its address.
func serveEdge(t *testing.T, r *testRelay, opts ListenerOptions) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	edge, err := r.PrepareListener(ln, opts)
	if err != nil {
		t.Fatal(err)
	}
	go edge.Serve()
	return ln.Addr().String()
}

// waitKind waits until an engine of dp carries tun: a tunnel enters the kernel once its handshake is done
// (its pair is of that kind from the start, with no carrier until then).
func waitKind(t *testing.T, tun *Tunnel, dp Datapath) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); tun.pair.Kind() != dp || tun.pair.Carrier() == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the tunnel runs on %s after 5s, want %s", tun.pair.Kind(), dp)
		}
	}
}

// handshakeStatus sends request to the relay at addr and returns the response's status.
func handshakeStatus(t *testing.T, addr, request string) int {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte(request))
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	return resp.StatusCode
}

// TestAdoptedKernelTunnelFailureLeavesNoEntries: a kernel tunnel that no engine can carry on once its
// engine has let go of it (here: no descriptor left for the engine's duplicates), whether the new process
// adopting it or the old one resuming it after a refusal, is reset, and its sockets leave every BPF map;
// closing them would leave their entries in the state map for good.
func TestAdoptedKernelTunnelFailureLeavesNoEntries(t *testing.T) {
	requireSockmap(t)
	for _, resume := range []bool{false, true} {
		name := map[bool]string{false: "adopted by the new process", true: "resumed by the old process"}[resume]
		t.Run(name, func(t *testing.T) {
			up := startUpstream(t)
			old := startRelay(t, DatapathSockmap, []string{up.Addr})
			files, err := old.ExportKernel()
			if err != nil {
				t.Fatal(err)
			}
			old.HandKernelTunnels()
			next := startRelay(t, DatapathSockmap, []string{up.Addr}, func(c *Config) { c.KernelObjects = files })
			c, u := openTunnel(t, old.Addr, up, nil, nil)
			defer c.Close()
			defer u.Close()
			tun := onlyTunnel(t, old)
			waitKind(t, tun, DatapathSockmap)
			pt, err := old.Park(tun)
			if err != nil {
				t.Fatal(err)
			}
			failed := pt.T.pair
			if resume {
				fdlimit.WithDescriptorsLeft(t, 0, func() { old.Resume(pt) })
			} else {
				client, upstream, err := pt.Files()
				if err != nil {
					t.Fatal(err)
				}
				adopted, err := next.Adopt(Adoption{ID: pt.T.ID, ClientAddr: pt.T.ClientAddr, UpstreamAddr: pt.T.UpstreamAddr,
					Pool: pt.T.Pool, Datapath: pt.Datapath, Started: pt.T.Started, ClientIP: pt.ClientIP, Kernel: pt.Kernel,
					State: pt.State, Client: client, Upstream: upstream})
				if err != nil {
					t.Fatal(err)
				}
				old.HandedOver(pt)
				failed = adopted.pair
				fdlimit.WithDescriptorsLeft(t, 0, func() { next.CarryAdopted(adopted) })
			}
			select {
			case <-failed.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the tunnel no engine could carry did not end")
			}
			n, err := next.kernel.Entries()
			if err != nil {
				t.Fatal(err)
			}
			for name, entries := range n {
				if entries != 0 {
					t.Errorf("BPF map %s holds %d entries after the tunnel no engine could carry ended", name, entries)
				}
			}
		})
	}
}
