package relay

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sockrelay/sockrelay/datapath/auto"
)

// withAutoPolicy runs the relay's per-tunnel policy with p and, when set, decide.
func withAutoPolicy(p auto.Policy, decide func(auto.Policy, auto.Sample, auto.History) auto.Decision) func(*Config) {
	return func(c *Config) {
		c.autoPolicy = &p
		c.autoDecide = decide
	}
}

// moves is sockrelay_tunnel_moves_total for from, to (and reason, when not empty).
func (r *testRelay) moves(from, to Datapath, reason auto.Reason) float64 {
	want := map[string]string{"from": string(from), "to": string(to)}
	if reason != "" {
		want["reason"] = string(reason)
	}
	return metricSum(r.Reg, "sockrelay_tunnel_moves_total", want)
}

// onlyTunnel is r's one live tunnel.
func onlyTunnel(t testing.TB, r *testRelay) *Tunnel {
	t.Helper()
	ts := r.Tunnels().Tunnels()
	if len(ts) != 1 {
		t.Fatalf("%d live tunnels, want 1", len(ts))
	}
	return ts[0]
}

// waitFor polls cond every few ms until it holds, failing the test with what after d.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
	}
}

// phasedWriter writes the first n bytes of seed's stream to c: small writes (size bytes every gap) while
// chatty is set, nothing while it is not, and the rest at once, then its FIN, when finish is closed.
type phasedWriter struct {
	chatty atomic.Bool
	finish chan struct{}
}

func (w *phasedWriter) run(c *net.TCPConn, seed uint64, n int64, size int, gap time.Duration) error {
	src := streamReader(seed, n)
	buf := make([]byte, size)
	left := n
	for {
		select {
		case <-w.finish:
			if err := writeStream(c, src, nil); err != nil {
				return err
			}
			return c.CloseWrite()
		case <-time.After(gap):
		}
		if !w.chatty.Load() || left < int64(size) {
			continue
		}
		if _, err := io.ReadFull(src, buf); err != nil {
			return err
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
		left -= int64(size)
	}
}

// TestAutoMovesChattyTunnelAndBack: on auto, a tunnel starts on sockmap; once it carries many small
// messages a second it moves to the event loop, and once quiet it moves back, with a checksummed stream each
// way throughout that arrives whole, then EOF.
func TestAutoMovesChattyTunnelAndBack(t *testing.T) {
	requireSockmap(t)
	p := auto.Policy{Interval: 50 * time.Millisecond, LeaveDemotions: 1 << 20, ChattySegments: 200,
		ChattyBytesPerSegment: 4096, CalmSegments: 20, LargeBytesPerSegment: 1 << 30, QuietFor: 300 * time.Millisecond,
		MinDwell: 200 * time.Millisecond, MaxDwell: time.Second, MovesPerSecond: 100, MaxInFlight: 2}
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(p, nil))
	if r.Datapath() != DatapathSockmap || r.auto == nil {
		t.Fatalf("datapath %s, per-tunnel policy %v: want sockmap with the policy", r.Datapath(), r.auto != nil)
	}
	c, u := openTunnel(t, r.Addr, up, nil, nil)
	waitInKernel(t, r)
	tun := onlyTunnel(t, r)
	if moves, tracked := r.auto.movesOf(tun); !tracked || moves != 0 {
		t.Fatalf("tunnel tracked %v with %d moves, want tracked with 0", tracked, moves)
	}

	const n = 1 << 20
	ends := []struct {
		conn              *net.TCPConn
		rd                io.Reader
		sendSeed, expSeed uint64
	}{{c.TCPConn, c.R, 1, 2}, {u.TCPConn, u.R, 2, 1}}
	writers := []*phasedWriter{{finish: make(chan struct{})}, {finish: make(chan struct{})}}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i, e := range ends {
		writers[i].chatty.Store(true)
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := writers[i].run(e.conn, e.sendSeed, n, 64, time.Millisecond); err != nil {
				errs <- fmt.Errorf("end %d: write: %v", i, err)
			}
		}()
		go func() {
			defer wg.Done()
			got := newStreamCheck(e.expSeed, n)
			if _, err := copyWithin(e.conn, got, e.rd, 60*time.Second); err != nil {
				errs <- fmt.Errorf("end %d: read: %v", i, err)
			}
			if d := got.Diff(); d != "" {
				errs <- fmt.Errorf("end %d received a wrong stream: %s", i, d)
			}
		}()
	}

	waitFor(t, 10*time.Second, "chatty tunnel moved to the event loop", tun.pair.OnEventLoop)
	if got := r.moves(DatapathSockmap, DatapathCopy, auto.ReasonChatty); got != 1 {
		t.Errorf("moves sockmap→copy for chatty: %v, want 1", got)
	}
	if tun.Datapath() != DatapathCopy {
		t.Errorf("datapath on the loop: %s", tun.Datapath())
	}
	for _, w := range writers {
		w.chatty.Store(false)
	}
	waitFor(t, 10*time.Second, "quiet tunnel moved back to sockmap", func() bool { return tun.Datapath() == DatapathSockmap })
	if got := r.moves(DatapathCopy, DatapathSockmap, ""); got != 1 {
		t.Errorf("moves copy→sockmap: %v, want 1", got)
	}
	if moves, _ := r.auto.movesOf(tun); moves != 2 {
		t.Errorf("tunnel moves: %d, want 2", moves)
	}
	if got := testutil.ToFloat64(r.metrics.tunnelsActive.WithLabelValues(string(DatapathSockmap))); got != 1 {
		t.Errorf("sockrelay_tunnels_active{sockmap} = %v, want 1", got)
	}
	rec := httptest.NewRecorder()
	r.listTunnels(rec, httptest.NewRequest(http.MethodGet, "/debug/tunnels", nil))
	var infos []TunnelInfo
	if err := json.Unmarshal(rec.Body.Bytes(), &infos); err != nil || len(infos) != 1 {
		t.Fatalf("/debug/tunnels: %v: %s", err, rec.Body.String())
	}
	if info := infos[0]; info.Moves != 2 || !info.Auto || info.Datapath != DatapathSockmap {
		t.Errorf("/debug/tunnels entry: %+v", info)
	}
	for _, w := range writers {
		close(w.finish)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if !t.Failed() {
		waitTunnelsGone(t, r)
	}
	if got := metricSum(r.Reg, "sockrelay_tunnel_move_failures_total", nil); got != 0 {
		t.Errorf("move failures: %v", got)
	}
	if !t.Failed() && !containsAll(r.Log.String(), []string{"datapath policy: per tunnel", "to_loop_segments_per_s=200"}) {
		t.Errorf("the start log does not say the policy in force:\n%s", r.Log.String())
	}
}

// TestAutoPinnedWhenForced: with the datapath named, no tunnel is tracked and none moves.
func TestAutoPinnedWhenForced(t *testing.T) {
	requireSockmap(t)
	up := startUpstream(t)
	flip := auto.DefaultPolicy
	flip.Flip, flip.Interval, flip.MinDwell = true, 5*time.Millisecond, 0
	r := startRelay(t, DatapathSockmap, []string{up.Addr}, withAutoPolicy(flip, nil))
	if r.auto != nil {
		t.Fatal("--datapath sockmap runs the per-tunnel policy")
	}
	openTunnel(t, r.Addr, up, nil, nil)
	waitInKernel(t, r)
	time.Sleep(50 * time.Millisecond)
	if got := onlyTunnel(t, r).Datapath(); got != DatapathSockmap {
		t.Errorf("pinned tunnel on %s", got)
	}
}
