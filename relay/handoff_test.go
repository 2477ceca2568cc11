package relay

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/auto"
	"github.com/sockrelay/sockrelay/upstream"
)

// TestRegistryAdoptKeepsIDs: a process started by an upgrade numbers its own tunnels past the old
// process's, so that an adopted tunnel keeps its id; one whose id is taken, or lies in this process's own
// range, gets a new one. No two live tunnels share an id.
func TestRegistryAdoptKeepsIDs(t *testing.T) {
	r := NewRegistry()
	r.ContinueIDs(10)
	own := &Tunnel{}
	if err := r.add(own); err != nil {
		t.Fatal(err)
	}
	if own.ID != 10+adoptIDs+1 {
		t.Fatalf("this process's first tunnel got id %d, want %d", own.ID, 10+adoptIDs+1)
	}
	for _, tc := range []struct {
		name string
		id   uint64
		keep bool
	}{
		{"the old process's id", 7, true},
		{"an id the old process gave after its offer", 12, true},
		{"an id already adopted", 7, false},
		{"an id of this process's own range", own.ID, false},
		{"no id", 0, false},
	} {
		tn := &Tunnel{}
		if err := r.adopt(tn, tc.id); err != nil {
			t.Fatal(err)
		}
		if kept := tn.ID == tc.id; kept != tc.keep {
			t.Errorf("%s: adopting id %d gave id %d; kept %v, want %v", tc.name, tc.id, tn.ID, kept, tc.keep)
		}
	}
	if n := r.Len(); n != 6 {
		t.Errorf("%d tunnels registered, want 6 (each under an id of its own)", n)
	}
}

// holdEstablished makes each handshake of the test stop once establish has registered its tunnel, before
// an engine carries it (on the WebSocket front, before its 101 is written): the tunnel comes on held, and
// its handshake goes on once release is called (at the latest as the test ends).
func holdEstablished(t *testing.T) (held <-chan *Tunnel, release func()) {
	ch := make(chan *Tunnel, 16)
	gate := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	hook := func(tn *Tunnel) {
		ch <- tn
		<-gate
	}
	establishedHook.Store(&hook)
	t.Cleanup(func() {
		establishedHook.Store(nil)
		release()
	})
	return ch, release
}

// heldTunnel is the next tunnel holdEstablished held.
func heldTunnel(t *testing.T, held <-chan *Tunnel) *Tunnel {
	t.Helper()
	select {
	case tn := <-held:
		return tn
	case <-time.After(10 * time.Second):
		t.Fatal("no handshake registered its tunnel")
		return nil
	}
}

// startHandshake sends r a WebSocket handshake with pipelined bytes behind it, and has up answer it with
// a 101 and first bytes behind it; the client's read of the relay's answer is the caller's.
func startHandshake(t *testing.T, r *testRelay, up *fakeUpstream, pipelined, first string) (net.Conn, *upstreamConn) {
	t.Helper()
	conn, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write([]byte(upgradeRequest("/tunnel") + pipelined)); err != nil {
		t.Fatal(err)
	}
	var u *upstreamConn
	select {
	case u = <-up.Conns:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream got no request")
	}
	t.Cleanup(func() { u.Close() })
	if _, err := u.Write([]byte(switchResponse(u.Req) + first)); err != nil {
		t.Fatal(err)
	}
	return conn, u
}

// parkRefusedUncarried checks that Park refuses tn, which no engine carries yet, with
// datapath.ErrNotCarried, and leaves it unparked.
func parkRefusedUncarried(t *testing.T, r *testRelay, tn *Tunnel) {
	t.Helper()
	if _, err := r.Park(tn); !errors.Is(err, datapath.ErrNotCarried) {
		t.Fatalf("park of a tunnel its handshake has not handed to an engine yet: %v, want %v", err, datapath.ErrNotCarried)
	}
	if tn.Parked() {
		t.Fatal("a tunnel Park refused is marked parked")
	}
}

// TestParkWaitsForCarry: a tunnel whose handshake has registered it and not yet handed it to an engine
// (the WebSocket front writes the 101 in between) cannot be parked. Its handshake carries it a moment
// later: handed over then, two processes would relay its sockets, and the new one could send the
// upstream's bytes ahead of the 101. Park refuses it with datapath.ErrNotCarried, leaving it as it was;
// once carried it is handed over, and the client gets the 101 first, then every byte once, in order.
func TestParkWaitsForCarry(t *testing.T) {
	for _, dp := range userspaceDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			old := startRelay(t, dp, []string{up.Addr})
			next := startRelay(t, dp, []string{up.Addr})
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			edge, err := next.PrepareListener(ln, ListenerOptions{Name: "edge", Datapath: dp})
			if err != nil {
				t.Fatal(err)
			}
			go edge.Serve()
			held, release := holdEstablished(t)
			conn, u := startHandshake(t, old, up, "pipelined", "first")
			tn := heldTunnel(t, held)
			parkRefusedUncarried(t, old, tn)

			release()
			waitFor(t, 10*time.Second, "an engine carries the tunnel", func() bool { return tn.pair.Carrier() != nil })
			adopted := handOverTo(t, old, next, tn, "edge")
			waitTunnelsGone(t, old)

			c := &clientConn{TCPConn: conn.(*net.TCPConn), R: bufio.NewReader(conn)}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if c.Resp, err = http.ReadResponse(c.R, &http.Request{Method: http.MethodGet}); err != nil || c.Resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("client: the relay's answer: %v, %v; want the 101 first", c.Resp, err)
			}
			for _, e := range []struct {
				name string
				r    io.Reader
				set  func(time.Time) error
				want string
			}{{"client", c.R, c.SetReadDeadline, "first"}, {"upstream", u.R, u.SetReadDeadline, "pipelined"}} {
				got := make([]byte, len(e.want))
				_ = e.set(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(e.r, got); err != nil || string(got) != e.want {
					t.Fatalf("%s: read %q, %v; want %q", e.name, got, err, e.want)
				}
			}
			pingThrough(t, c, u)
			if got := next.Tunnels().Len(); got != 1 || adopted.pair.Ending() {
				t.Errorf("the new relay has %d tunnels (adopted one ending: %v), want the adopted one live", got, adopted.pair.Ending())
			}
		})
	}
}

// TestParkWaitsForCarryOnTCPListener: the same on a TCP listener, whose connection is carried at once
// after establish: Park refuses the tunnel until then, and parks it after (here it is carried on again).
func TestParkWaitsForCarryOnTCPListener(t *testing.T) {
	addr, _ := rawEcho(t, false)
	pool := newPool(t, "db", []string{addr}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{routes: []pathRoute{{listener: "tcp", prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
	})
	relayAddr := serveTCP(t, r, ListenerOptions{Name: "tcp"}, nil)
	held, release := holdEstablished(t)
	c, err := net.Dial("tcp", relayAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	tn := heldTunnel(t, held)
	parkRefusedUncarried(t, r, tn)

	release()
	waitFor(t, 10*time.Second, "an engine carries the tunnel", func() bool { return tn.pair.Carrier() != nil })
	pt, err := r.Park(tn)
	if err != nil {
		t.Fatalf("park the carried tunnel: %v", err)
	}
	r.Resume(pt)
	if _, err := c.Write([]byte("echo")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "echo" {
		t.Fatalf("echo through the resumed tunnel: %q, %v", got, err)
	}
}

// TestParkLeavesUncarriedTunnelUnderAuto: Park's refusal of a tunnel no engine carries yet leaves it
// under auto's policy (a park takes a tunnel out of it for good), so that it is moved as any other should
// the upgrade leave it here.
func TestParkLeavesUncarriedTunnelUnderAuto(t *testing.T) {
	requireSockmap(t)
	toOther := func(_ auto.Policy, s auto.Sample, _ auto.History) auto.Decision {
		return auto.Decision{Move: true, To: 1 - s.Engine, Reason: auto.ReasonForced}
	}
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(5*time.Millisecond, 2), toOther))
	r.HandKernelTunnels() // as once a new process adopted the BPF objects: kernel tunnels can move too
	held, release := holdEstablished(t)
	startHandshake(t, r, up, "", "")
	tn := heldTunnel(t, held)
	if _, tracked := r.auto.movesOf(tn); !tracked {
		t.Fatal("the opening tunnel is not under auto's policy")
	}
	_, err := r.Park(tn)
	if _, tracked := r.auto.movesOf(tn); !tracked {
		t.Error("the tunnel Park refused left auto's policy")
	}
	if !errors.Is(err, datapath.ErrNotCarried) {
		t.Errorf("park of a %s tunnel no engine carries yet: %v, want %v", tn.Datapath(), err, datapath.ErrNotCarried)
	}
	release()
	waitFor(t, 10*time.Second, "auto moved the tunnel", func() bool {
		moves, _ := r.auto.movesOf(tn)
		return moves >= 1
	})
}
