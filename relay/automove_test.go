package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/auto"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"golang.org/x/sys/unix"
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

	// The move is counted once datapath.Move has returned, a moment after the loop carries the pair.
	waitFor(t, 10*time.Second, "chatty tunnel moved to the event loop", func() bool {
		return r.moves(DatapathSockmap, DatapathCopy, auto.ReasonChatty) == 1
	})
	if !tun.pair.OnEventLoop() {
		t.Error("moved, but not on the event loop")
	}
	if tun.Datapath() != DatapathCopy {
		t.Errorf("datapath on the loop: %s", tun.Datapath())
	}
	for _, w := range writers {
		w.chatty.Store(false)
	}
	waitFor(t, 10*time.Second, "quiet tunnel moved back to sockmap", func() bool {
		return r.moves(DatapathCopy, DatapathSockmap, "") == 1
	})
	if got := tun.Datapath(); got != DatapathSockmap {
		t.Errorf("moved back, but on %s", got)
	}
	if got := r.moves(DatapathSockmap, DatapathCopy, ""); got != 1 {
		t.Errorf("moves sockmap→copy: %v, want 1", got)
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
	endWorkers(t, r, &wg, errs)
	if got := metricSum(r.Reg, "sockrelay_tunnel_move_failures_total", nil); got != 0 {
		t.Errorf("move failures: %v", got)
	}
	if !t.Failed() && !containsAll(r.Log.String(), []string{"datapath policy: per tunnel", "to_loop_segments_per_s=200"}) {
		t.Errorf("the start log does not say the policy in force:\n%s", r.Log.String())
	}
}

// endWorkers waits for wg's goroutines, fails t with each error they sent on errs, then, unless t failed,
// waits until r holds no tunnel.
func endWorkers(t *testing.T, r *testRelay, wg *sync.WaitGroup, errs chan error) {
	t.Helper()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if !t.Failed() {
		waitTunnelsGone(t, r)
	}
}

// TestAutoWithoutKernelMovesNothing: where the kernel engine does not load (a 6.1 kernel refuses sockmap),
// auto runs a userspace datapath as before, with no sampler and nothing tracked.
func TestAutoWithoutKernelMovesNothing(t *testing.T) {
	refused := func(*slog.Logger, func(*datapath.Pair, string), uint64) (*sockmap.Engine, error) {
		return nil, fmt.Errorf("sockmap: %w: this kernel refuses it", ErrDatapathUnavailable)
	}
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, func(c *Config) { c.startKernel = refused })
	if r.auto != nil || r.Datapath() == DatapathSockmap {
		t.Fatalf("datapath %s, per-tunnel policy %v: want a userspace datapath and no policy", r.Datapath(), r.auto != nil)
	}
	openTunnel(t, r.Addr, up, nil, nil)
	if moves, tracked := r.auto.movesOf(onlyTunnel(t, r)); tracked || moves != 0 {
		t.Errorf("tunnel tracked %v with %d moves", tracked, moves)
	}
	if strings.Contains(r.Log.String(), "datapath policy: per tunnel") {
		t.Error("the log says a per-tunnel policy is in force")
	}
}

// TestAutoPinnedWhenForced: with the datapath named, for the relay or for a listener, no tunnel is tracked
// and none moves, even under a policy that moves every tracked tunnel every few ms.
func TestAutoPinnedWhenForced(t *testing.T) {
	requireSockmap(t)
	flip := flipPolicy(5*time.Millisecond, 4)
	for _, named := range []string{"relay", "listener"} {
		t.Run(named, func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, DatapathSockmap, []string{up.Addr}, withAutoPolicy(flip, nil))
			addr := r.Addr
			if named == "listener" {
				r = startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flip, nil))
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				go r.ServeListenerWith(ln, ListenerOptions{Name: "pinned", Datapath: DatapathSockmap})
				addr = ln.Addr().String()
			} else if r.auto != nil {
				t.Fatal("--datapath sockmap runs the per-tunnel policy")
			}
			openTunnel(t, addr, up, nil, nil)
			waitInKernel(t, r)
			time.Sleep(100 * time.Millisecond)
			tun := onlyTunnel(t, r)
			if got := tun.Datapath(); got != DatapathSockmap {
				t.Errorf("pinned tunnel on %s", got)
			}
			if _, tracked := r.auto.movesOf(tun); tracked {
				t.Error("pinned tunnel under the policy")
			}
		})
	}
}

// flipPolicy moves every tunnel to the other engine at every other sample (the first sample on an engine
// only takes its counts), every interval, with moves in flight capped at inFlight.
func flipPolicy(interval time.Duration, inFlight int) auto.Policy {
	p := auto.DefaultPolicy
	p.Flip, p.Interval, p.MinDwell, p.MaxDwell = true, interval, 0, 0
	p.MovesPerSecond, p.MaxInFlight = 1_000_000, inFlight
	return p
}

// pacedWrite writes the first n bytes of seed's stream to c in writes of 1 to 4 KiB a millisecond apart
// until pace passes, then the rest at once; it stops after stopAt bytes when stopAt < n.
func pacedWrite(c net.Conn, seed uint64, n, stopAt int64, pace time.Time) error {
	src := streamReader(seed, min(n, stopAt))
	buf := make([]byte, 4<<10)
	for i := 0; time.Now().Before(pace); i++ {
		k, err := io.ReadFull(src, buf[:1+(i*1543)%len(buf)])
		if k > 0 {
			if _, werr := c.Write(buf[:k]); werr != nil {
				return werr
			}
		}
		if err != nil {
			return nil // all of it written
		}
		time.Sleep(time.Millisecond)
	}
	return writeStream(c, src, nil)
}

// stressEnd is how one tunnel of TestAutoMoveStress ends.
type stressEnd int

const (
	finTogether stressEnd = iota
	finClientFirst
	finUpstreamFirst
	rstClient   // the client resets its connection halfway through its stream
	rstUpstream // the upstream does
)

// TestAutoMoveStress moves 50 tunnels between sockmap and the event loop every few milliseconds while each
// carries a checksummed stream each way: thousands of moves, and every stream must arrive whole and then
// EOF, or, where a side resets, arrive as an exact prefix and then the reset. The kernel's maps are empty
// at the end, no move failed, and each tunnel ended for the reason its peers gave (a FIN each way, or a
// reset). CI-sized: about 3 s, 2 MiB each way per tunnel, generated and checked as it goes.
func TestAutoMoveStress(t *testing.T) {
	requireSockmap(t)
	const (
		tunnels = 50
		n       = 2 << 20
	)
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(3*time.Millisecond, 16), nil))
	type tun struct {
		c   *clientConn
		u   *upstreamConn
		end stressEnd
	}
	ts := make([]tun, tunnels)
	for i := range ts {
		ts[i].c, ts[i].u = openTunnel(t, r.Addr, up, nil, nil)
		ts[i].end = stressEnd(i % 5)
	}
	pace := time.Now().Add(2500 * time.Millisecond)
	var wg sync.WaitGroup
	errs := make(chan error, 4*tunnels)
	for i, tn := range ts {
		seedUp, seedDown := uint64(2*i), uint64(2*i+1)
		type side struct {
			name              string
			conn              *net.TCPConn
			rd                io.Reader
			sendSeed, expSeed uint64
			resets, peerReset bool // this side resets; the other side does
			waitEOF           bool // it sends only once it has read the other's whole stream
		}
		sides := []side{
			{"client", tn.c.TCPConn, tn.c.R, seedUp, seedDown, tn.end == rstClient, tn.end == rstUpstream, tn.end == finUpstreamFirst},
			{"upstream", tn.u.TCPConn, tn.u.R, seedDown, seedUp, tn.end == rstUpstream, tn.end == rstClient, tn.end == finClientFirst},
		}
		for _, s := range sides {
			gotEOF := make(chan struct{})
			wg.Add(2)
			go func() { // reader
				defer wg.Done()
				defer close(gotEOF)
				got := newStreamCheck(s.expSeed, n)
				_, err := copyWithin(s.conn, got, s.rd, 60*time.Second)
				switch {
				case s.resets:
					return // its own close ends its reads
				case got.firstDiff >= 0:
					errs <- fmt.Errorf("tunnel %d: %s received a corrupted stream: %s", i, s.name, got.Diff())
				case s.peerReset && !isReset(err):
					errs <- fmt.Errorf("tunnel %d: %s: read after the peer's reset ended with %v after %d bytes, want a reset", i, s.name, err, got.Len())
				case s.peerReset:
				case err != nil:
					errs <- fmt.Errorf("tunnel %d: %s: read: %v after %d bytes", i, s.name, err, got.Len())
				case got.Diff() != "":
					errs <- fmt.Errorf("tunnel %d: %s received a wrong stream: %s", i, s.name, got.Diff())
				}
			}()
			go func() { // writer
				defer wg.Done()
				if s.waitEOF {
					<-gotEOF
				}
				stopAt := int64(n)
				switch {
				case s.resets:
					stopAt = n / 2
				case s.peerReset:
					// Silent, so that the reset reaches a relay that is only reading from the resetter: a
					// relay writing to it at that moment reads EOF, not the reset (TCP hands the error to
					// the failed write only), and may carry a FIN before the reset, on every engine
					// alike. That is a separate matter from moves.
					<-gotEOF
					return
				}
				err := pacedWrite(s.conn, s.sendSeed, n, stopAt, pace)
				switch {
				case s.resets:
					_ = s.conn.SetLinger(0)
					_ = s.conn.Close()
				case s.peerReset:
					// Writes after the peer's reset fail; that is the reset, not an error of the relay.
				case err != nil:
					errs <- fmt.Errorf("tunnel %d: %s: write: %v", i, s.name, err)
				default:
					if err := s.conn.CloseWrite(); err != nil {
						errs <- fmt.Errorf("tunnel %d: %s: shutdown write: %v", i, s.name, err)
					}
				}
			}()
		}
	}
	endWorkers(t, r, &wg, errs)
	toLoop, toKernel := r.moves(DatapathSockmap, DatapathCopy, ""), r.moves(DatapathCopy, DatapathSockmap, "")
	failed := metricSum(r.Reg, "sockrelay_tunnel_move_failures_total", nil)
	t.Logf("moves: %v sockmap→copy, %v copy→sockmap, %v failed", toLoop, toKernel, failed)
	if toLoop+toKernel < 1000 {
		t.Errorf("%v moves in all, want at least 1000: the test did not stress the moves", toLoop+toKernel)
	}
	if failed != 0 {
		t.Errorf("%v moves failed", failed)
	}
	for reason, want := range map[string]float64{ReasonClosed: 30, ReasonClientReset: 10, ReasonUpstreamReset: 10} {
		if got := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": reason}); got != want {
			t.Errorf("tunnels closed as %s: %v, want %v", reason, got, want)
		}
	}
	for _, dp := range []Datapath{DatapathSockmap, DatapathCopy} {
		if got := testutil.ToFloat64(r.metrics.tunnelsActive.WithLabelValues(string(dp))); got != 0 {
			t.Errorf("sockrelay_tunnels_active{%s} = %v after every tunnel ended, want 0", dp, got)
		}
	}
}

// trackOf returns whether a move of t runs now, and how many it made.
func (m *autoMover) trackOf(t *Tunnel) (moving bool, moves int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if tr := m.tracked[t]; tr != nil {
		moving = tr.moving
	}
	return moving, int(t.moves.Load())
}

// trackedCount is how many tunnels the sampler tracks.
func (m *autoMover) trackedCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.tracked)
}

// TestAutoMoveStuckHoldsOneSlot: a move off the kernel waits, with no time limit, while the reader has
// stopped and the kernel holds bytes for it. Such a move holds one of the policy's slots and nothing else:
// the sampler goes on, and another tunnel keeps moving meanwhile. Once the reader reads again the stuck move
// completes, and its stream arrives whole.
func TestAutoMoveStuckHoldsOneSlot(t *testing.T) {
	requireSockmap(t)
	// No more than a give-back may hold (8 MiB, docs/datapath.md, "How a kernel pair is given back"), some
	// of it in the client's buffers: a move that would hold more is refused, not stuck.
	const n = 8 << 20
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(10*time.Millisecond, 2), nil))
	stuckC, stuckU := openTunnel(t, r.Addr, up, nil, nil)
	waitInKernel(t, r)
	stuck := onlyTunnel(t, r)
	openTunnel(t, r.Addr, up, nil, nil) // idle, free to move
	var other *Tunnel
	for _, tn := range r.Tunnels().Tunnels() {
		if tn != stuck {
			other = tn
		}
	}
	// The client does not read: the upstream's bytes fill the client's buffers, then the kernel's.
	writeErr := make(chan error, 1)
	go func() {
		err := writeStream(stuckU, streamReader(9, n), nil)
		if err == nil {
			err = stuckU.CloseWrite()
		}
		writeErr <- err
	}()
	// Stuck: a move of it that runs while the other tunnel moves 3 times, counted with no time window
	// (a loaded machine slows the moves, not what they do). A move that had only been slow ends meanwhile
	// and the test looks again: one off the kernel is stuck for good while the client does not read. A
	// move that held the sampler would stop the other tunnel's moves, and the wait for them fails.
	for try := 1; ; try++ {
		var since time.Time
		waitFor(t, 20*time.Second, "a move of the tunnel whose reader stopped to wait", func() bool {
			moving, _ := r.auto.trackOf(stuck)
			switch {
			case !moving:
				since = time.Time{}
			case since.IsZero():
				since = time.Now()
			}
			return moving && time.Since(since) > 300*time.Millisecond
		})
		_, stuckMoves := r.auto.trackOf(stuck)
		_, before := r.auto.trackOf(other)
		waitFor(t, 20*time.Second, "the other tunnel to move 3 times while one move is stuck", func() bool {
			_, moves := r.auto.trackOf(other)
			return moves >= before+3
		})
		moving, moves := r.auto.trackOf(stuck)
		if moving && moves == stuckMoves {
			break
		}
		if try == 5 {
			t.Fatalf("the stuck move ended by itself 5 times (moving %v, moves %d → %d): the test did not hold one", moving, stuckMoves, moves)
		}
	}
	_, stuckMoves := r.auto.trackOf(stuck)
	// The reader reads again: the move completes, and every byte arrives once, in order.
	got := newStreamCheck(9, n)
	if _, err := copyWithin(stuckC, got, stuckC.R, 60*time.Second); err != nil {
		t.Fatalf("client read: %v after %d bytes", err, got.Len())
	}
	if d := got.Diff(); d != "" {
		t.Errorf("the client received a wrong stream: %s", d)
	}
	if err := <-writeErr; err != nil {
		t.Errorf("upstream write: %v", err)
	}
	waitFor(t, 10*time.Second, "the stuck move to complete", func() bool {
		moving, moves := r.auto.trackOf(stuck)
		return !moving && moves > stuckMoves
	})
	if got := metricSum(r.Reg, "sockrelay_tunnel_move_failures_total", nil); got != 0 {
		t.Errorf("move failures: %v", got)
	}
}

// TestAutoParkTakesTunnelOutOfThePolicy: an upgrade parks a tunnel only when no move of it runs, and the
// policy leaves a parked tunnel alone from then on; Resume carries it on where it was.
func TestAutoParkTakesTunnelOutOfThePolicy(t *testing.T) {
	requireSockmap(t)
	toLoopOnce := func(_ auto.Policy, s auto.Sample, _ auto.History) auto.Decision {
		if s.Engine == auto.Kernel {
			return auto.Decision{Move: true, To: auto.Loop, Reason: auto.ReasonChatty}
		}
		return auto.Decision{}
	}
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(5*time.Millisecond, 2), toLoopOnce))
	c, u := openTunnel(t, r.Addr, up, nil, nil)
	tun := onlyTunnel(t, r)
	waitFor(t, 10*time.Second, "the tunnel moved to the event loop", func() bool {
		moving, moves := r.auto.trackOf(tun)
		return !moving && moves == 1 && tun.pair.OnEventLoop()
	})

	// A move in flight: the tunnel cannot be parked now.
	r.auto.mu.Lock()
	r.auto.tracked[tun].moving = true
	r.auto.mu.Unlock()
	if _, err := r.Park(tun); !errors.Is(err, ErrNotMovable) {
		t.Fatalf("Park during a move: %v, want ErrNotMovable", err)
	}
	if _, tracked := r.auto.movesOf(tun); tracked {
		t.Error("a tunnel an upgrade tried to park is still under the policy")
	}
	r.auto.trackOpen() // as a policy put in force meanwhile does
	if _, tracked := r.auto.movesOf(tun); tracked {
		t.Error("a policy put in force tracked again a tunnel an upgrade took out of the policy")
	}

	// Tracked again with no move running: Park takes it out of the policy and parks it.
	r.auto.mu.Lock()
	r.auto.tracked[tun] = &autoTrack{}
	r.auto.mu.Unlock()
	pt, err := r.Park(tun)
	if err != nil {
		t.Fatalf("Park: %v", err)
	}
	if _, tracked := r.auto.movesOf(tun); tracked {
		t.Error("a parked tunnel is still under the policy")
	}
	r.Resume(pt)
	pingThrough(t, c, u)
	if tun.Datapath() != DatapathCopy {
		t.Errorf("resumed on %s, want copy, where it was parked", tun.Datapath())
	}
	// Resumed after the failed park, the tunnel is under the policy again, from a fresh history; its
	// moves are the tunnel's in this process, its one move to the loop.
	if moves, tracked := r.auto.movesOf(tun); !tracked || moves != 1 {
		t.Errorf("resumed tunnel tracked %v with %d moves, want tracked again with 1", tracked, moves)
	}
}

// TestAutoTracksAdoptedTunnels: a tunnel an upgrade hands over comes under the new process's policy when
// the listener it is adopted on is on auto there, and the policy moves it, a copy tunnel to the kernel and
// a kernel tunnel (the new process adopted the BPF objects) to the loop; adopted on a listener with a
// datapath of its own, it stays pinned.
func TestAutoTracksAdoptedTunnels(t *testing.T) {
	requireSockmap(t)
	toOther := func(_ auto.Policy, s auto.Sample, _ auto.History) auto.Decision {
		return auto.Decision{Move: true, To: 1 - s.Engine, Reason: auto.ReasonForced}
	}
	for _, tc := range []struct {
		name     string
		old      Datapath // the old process's, whose tunnel is handed over
		listener Datapath // the new process's listener's
		tracked  bool
		movedTo  Datapath
	}{
		{"copy tunnel on auto", DatapathCopy, DatapathAuto, true, DatapathSockmap},
		{"kernel tunnel on auto", DatapathSockmap, DatapathAuto, true, DatapathCopy},
		{"copy tunnel on copy", DatapathCopy, DatapathCopy, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t)
			old := startRelay(t, tc.old, []string{up.Addr})
			var files map[string]*os.File
			if tc.old == DatapathSockmap {
				var err error
				if files, err = old.ExportKernel(); err != nil {
					t.Fatal(err)
				}
			}
			next := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(5*time.Millisecond, 2), toOther),
				func(c *Config) { c.KernelObjects = files })
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			edge, err := next.PrepareListener(ln, ListenerOptions{Name: "edge", Datapath: tc.listener})
			if err != nil {
				t.Fatal(err)
			}
			go edge.Serve()
			c, u := openTunnel(t, old.Addr, up, nil, nil)
			if tc.old == DatapathSockmap {
				if !next.KernelAdopted() {
					t.Fatal("the new relay did not adopt the old one's BPF objects")
				}
				old.HandKernelTunnels() // the new process adopted the objects
				waitInKernel(t, old)
			}
			tun := handOverTo(t, old, next, onlyTunnel(t, old), "edge")
			if _, tracked := next.auto.movesOf(tun); tracked != tc.tracked {
				t.Fatalf("adopted tunnel under the policy: %v, want %v", tracked, tc.tracked)
			}
			if tc.tracked {
				waitFor(t, 10*time.Second, "the adopted tunnel moved to "+string(tc.movedTo), func() bool {
					moving, moves := next.auto.trackOf(tun)
					return !moving && moves >= 1 && tun.Datapath() == tc.movedTo
				})
			}
			pingThrough(t, c, u)
		})
	}
}

// TestSampleOf: a sample is the difference of two readings each direction apart, and the loop's segment
// counts, which wrap at 2³², give the reads between the readings across a wrap.
func TestSampleOf(t *testing.T) {
	dirs := func(up, down datapath.DirCounts) datapath.Counts {
		return datapath.Counts{Dirs: [2]datapath.DirCounts{up, down}}
	}
	for _, tc := range []struct {
		name      string
		last, now datapath.Counts
		want      [2]auto.Flow
	}{
		{"each direction apart",
			dirs(datapath.DirCounts{Bytes: 100, Segments: 1}, datapath.DirCounts{Bytes: 5, Segments: 5, Demotions: 1}),
			dirs(datapath.DirCounts{Bytes: 1100, Segments: 3}, datapath.DirCounts{Bytes: 5, Segments: 5, Demotions: 3}),
			[2]auto.Flow{{Bytes: 1000, Segments: 2}, {Demotions: 2}}},
		{"segments across the loop's wrap",
			dirs(datapath.DirCounts{Segments: 1<<32 - 10}, datapath.DirCounts{}),
			dirs(datapath.DirCounts{Segments: 5}, datapath.DirCounts{}),
			[2]auto.Flow{{Segments: 15}, {}}},
	} {
		s := sampleOf(auto.Loop, time.Second, tc.last, tc.now)
		if s.Dirs != tc.want || s.Engine != auto.Loop || s.Elapsed != time.Second {
			t.Errorf("%s: %+v, want %+v", tc.name, s.Dirs, tc.want)
		}
	}
}

// TestAutoTracksTunnelAdoptedBeforeItsListener: a tunnel handed over in an upgrade before the new process
// has prepared the listener it came in on comes under the policy once that listener is prepared on auto,
// and stays pinned when it is prepared with a datapath of its own.
func TestAutoTracksTunnelAdoptedBeforeItsListener(t *testing.T) {
	requireSockmap(t)
	toOther := func(_ auto.Policy, s auto.Sample, _ auto.History) auto.Decision {
		return auto.Decision{Move: true, To: 1 - s.Engine, Reason: auto.ReasonForced}
	}
	for _, tc := range []struct {
		listener Datapath // the new process's listener's, prepared after the adoption
		tracked  bool
	}{{DatapathAuto, true}, {DatapathCopy, false}} {
		t.Run(string(tc.listener), func(t *testing.T) {
			up := startUpstream(t)
			old := startRelay(t, DatapathCopy, []string{up.Addr})
			next := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(5*time.Millisecond, 2), toOther))
			c, u := openTunnel(t, old.Addr, up, nil, nil)
			tun := handOverTo(t, old, next, onlyTunnel(t, old), "late")
			if _, tracked := next.auto.movesOf(tun); tracked {
				t.Fatal("adopted tunnel under the policy before its listener was prepared")
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			late, err := next.PrepareListener(ln, ListenerOptions{Name: "late", Datapath: tc.listener})
			if err != nil {
				t.Fatal(err)
			}
			go late.Serve()
			if _, tracked := next.auto.movesOf(tun); tracked != tc.tracked {
				t.Fatalf("adopted tunnel under the policy once its listener is prepared on %s: %v, want %v",
					tc.listener, tracked, tc.tracked)
			}
			if tc.tracked {
				waitFor(t, 10*time.Second, "the adopted tunnel moved to sockmap", func() bool {
					moving, moves := next.auto.trackOf(tun)
					return !moving && moves >= 1 && tun.Datapath() == DatapathSockmap
				})
			}
			pingThrough(t, c, u)
		})
	}
}

// TestAutoForgetsEndedTunnelsWaitingForTheirListener: a tunnel adopted on a listener this process has not
// prepared (an upgrade whose new configuration dropped it) is let go of when it ends; it was kept, and the
// whole batch with it, for the process's life.
func TestAutoForgetsEndedTunnelsWaitingForTheirListener(t *testing.T) {
	requireSockmap(t)
	up := startUpstream(t)
	old := startRelay(t, DatapathCopy, []string{up.Addr})
	next := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(flipPolicy(5*time.Millisecond, 2), nil))
	c, u := openTunnel(t, old.Addr, up, nil, nil)
	tun := handOverTo(t, old, next, onlyTunnel(t, old), "gone")
	next.listenersMu.Lock()
	waiting := len(next.adoptedEarly["gone"])
	next.listenersMu.Unlock()
	if waiting != 1 {
		t.Fatalf("%d tunnel(s) wait for the listener, want the adopted one", waiting)
	}
	c.Close()
	u.Close()
	waitFor(t, 10*time.Second, "the adopted tunnel ended", func() bool { return tun.pair.Ending() && next.Tunnels().Len() == 0 })
	next.listenersMu.Lock()
	n, listed := len(next.adoptedEarly["gone"]), next.adoptedEarly["gone"] != nil
	next.listenersMu.Unlock()
	if n != 0 || listed {
		t.Errorf("%d ended tunnel(s) still wait for the listener (listed: %v)", n, listed)
	}
}

// TestAutoMeasuresAtStart: with no start engine configured, the relay measures what a message costs on each
// engine in the background, logs what it measured and the policy in force once, and tunnels start on the
// policy's engine (the loop, which every measured policy starts on).
func TestAutoMeasuresAtStart(t *testing.T) {
	requireSockmap(t)
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr})
	waitFor(t, 10*time.Second, "the policy measured at start in the log", func() bool {
		return strings.Contains(r.Log.String(), `msg="datapath policy: per tunnel" measured=`) &&
			!strings.Contains(r.Log.String(), "measured=no")
	})
	log := r.Log.String()
	if n := strings.Count(log, "datapath policy: per tunnel"); n != 1 {
		t.Errorf("the policy logged %d times, want once:\n%s", n, log)
	}
	if !containsAll(log, []string{"kernel_ctxsw_per_msg=", "loop_ctxsw_per_msg=", "start=copy", "rounds="}) {
		t.Errorf("the start log does not say what was measured and the policy:\n%s", log)
	}
	c, u := openTunnel(t, r.Addr, up, nil, nil)
	defer c.Close()
	defer u.Close()
	tun := onlyTunnel(t, r)
	if got := tun.Datapath(); got != DatapathCopy {
		t.Errorf("a new tunnel started on %s, want copy", got)
	}
	// Tracked only where the measured policy can move a loop tunnel (KernelForBusy), not under LoopFirst.
	if _, tracked := r.auto.movesOf(tun); tracked != r.auto.policy.Load().Moves(auto.Loop) {
		t.Errorf("a new tunnel on the loop tracked %v under %+v", tracked, *r.auto.policy.Load())
	}
}

// TestMeasureCosts: the start measurement completes its rounds on an idle relay, each a count per message
// on every path, and leaves nothing in the kernel's maps.
func TestMeasureCosts(t *testing.T) {
	requireSockmap(t)
	r := startRelay(t, DatapathAuto, []string{"127.0.0.1:9"}, withAutoPolicy(auto.LoopFirst, nil))
	c := r.measureCosts(context.Background(), r.auto)
	if c.Err != nil {
		t.Fatal(c.Err)
	}
	t.Logf("costs %+v, verdict %s", c, c.Verdict())
	for name, v := range map[string][]float64{"kernel": c.Kernel, "loop": c.Loop, "direct": c.Direct} {
		if len(v) != probeRounds {
			t.Errorf("%s: %d rounds, want %d", name, len(v), probeRounds)
		}
		// Net of the host's own switches, a round may count 0 where other processes switched as much
		// (then clamped), never less; an engine's rounds are not all 0.
		some := false
		for _, x := range v {
			if x < 0 {
				t.Errorf("%s: %v context switches per message", name, x)
			}
			some = some || x > 0
		}
		if !some && name != "direct" {
			t.Errorf("%s: no round counted a context switch: %v", name, v)
		}
	}
	if c.HostBusyAfter == 0 && c.HostBusy == 0 && c.Background == 0 {
		t.Errorf("the host was not watched: %+v", c)
	}
	assertMapsEmpty(t, r.kernel)
	if got := metricSum(r.Reg, "sockrelay_tunnels_total", nil); got != 0 {
		t.Errorf("the measurement counted %v tunnels", got)
	}
}

// refusingKernel stands in for the kernel engine refusing every pair, as sockmap.Engine does one it cannot
// insert (runInUserspace): the pair runs on the copy engine, then the kernel engine's onFallback is told.
type refusingKernel struct{ s *Server }

func (e refusingKernel) Kind() Datapath                      { return DatapathSockmap }
func (e refusingKernel) Accepts(_, _ datapath.Endpoint) bool { return true }
func (e refusingKernel) Close() error                        { return nil }
func (e refusingKernel) Carry(p *datapath.Pair) {
	e.s.copier.Carry(p)
	e.s.kernelFallback(p, "insert_failed")
}

// fallingBackLoop stands in for event loops that cannot take a pair, as datapath.EventLoop.Carry does one
// whose sockets it cannot duplicate: OnFallback (the copy engine's fellBack) is told, and the pair runs on
// goroutines, still of kind copy.
type fallingBackLoop struct{ c *copyEngine }

func (e fallingBackLoop) Kind() Datapath                      { return DatapathCopy }
func (e fallingBackLoop) Accepts(_, _ datapath.Endpoint) bool { return true }
func (e fallingBackLoop) Close() error                        { return nil }
func (e fallingBackLoop) Carry(p *datapath.Pair) {
	e.c.fellBack(p, unix.EMFILE)
	datapath.Copier{}.Carry(p)
}

// TestMeasureCostsStopsWhenAProbePairFallsBack: a probe pair its engine does not carry stops the start
// measurement (inconclusive, said once in the policy's log line), and no tunnel metric or fallback log line
// counts it. Before, the kernel's refusal was logged and counted as a tunnel's fallback, and the loop's went
// unnoticed: the "loop" figures were the goroutine copier's.
func TestMeasureCostsStopsWhenAProbePairFallsBack(t *testing.T) {
	requireSockmap(t)
	for _, tc := range []struct {
		name   string
		path   probePath
		engine func(*Server) datapath.Engine
		want   string
	}{
		{"kernel refuses", probeKernel, func(s *Server) datapath.Engine { return refusingKernel{s} }, "insert_failed"},
		{"loops cannot take it", probeLoop, func(s *Server) datapath.Engine { return fallingBackLoop{s.copier} }, "too many open files"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r *testRelay
			r = startRelay(t, DatapathAuto, []string{"127.0.0.1:9"}, withAutoPolicy(auto.LoopFirst, nil), func(c *Config) {
				c.probeEngine = func(path probePath) datapath.Engine {
					if path == tc.path {
						return tc.engine(r.Server)
					}
					return nil
				}
			})
			r.auto.moving.Add(1)
			r.auto.measureAndApply(context.Background())
			log := r.Log.String()
			if n := strings.Count(log, "measured=inconclusive"); n != 1 || !strings.Contains(log, tc.want) {
				t.Errorf("the log says %d time(s) that the measurement was inconclusive, want once, with %q:\n%s", n, tc.want, log)
			}
			for _, line := range []string{"falls back", "could not take the tunnel"} {
				if strings.Contains(log, line) {
					t.Errorf("a probe pair's fallback logged as a tunnel's (%q)", line)
				}
			}
			for _, m := range []string{"sockrelay_datapath_fallbacks_total", "sockrelay_tunnels_total", "sockrelay_tunnels_active"} {
				if got := metricSum(r.Reg, m, nil); got != 0 {
					t.Errorf("%s: %v", m, got)
				}
			}
			assertMapsEmpty(t, r.kernel)
		})
	}
}

// TestAutoOptions: the configured start engine and thresholds are the policy in force, and one out of
// range fails the start with an error that names it.
func TestAutoOptions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		o       AutoOptions
		want    func(auto.Policy) bool
		measure bool
		err     string
	}{
		{"default measures, loop first meanwhile", AutoOptions{}, func(p auto.Policy) bool { return p == auto.LoopFirst }, true, ""},
		{"copy", AutoOptions{Start: AutoStartCopy}, func(p auto.Policy) bool { return p == auto.LoopFirst }, false, ""},
		{"sockmap", AutoOptions{Start: AutoStartSockmap}, func(p auto.Policy) bool { return p == auto.KernelFirst }, false, ""},
		{"thresholds over sockmap", AutoOptions{Start: AutoStartSockmap, ChattySegments: 500, QuietFor: time.Minute, MinDwell: time.Second},
			func(p auto.Policy) bool {
				return p.ChattySegments == 500 && p.QuietFor == time.Minute && p.MinDwell == time.Second && p.Start == auto.Kernel
			}, false, ""},
		{"busy over measured", AutoOptions{BusySegments: 50}, func(p auto.Policy) bool { return p.BusySegments == 50 }, true, ""},
		{"unknown start", AutoOptions{Start: "kernel"}, nil, false, `auto.start "kernel"`},
		{"chatty below calm on sockmap", AutoOptions{Start: AutoStartSockmap, ChattySegments: 100}, nil, false,
			"auto.start sockmap: auto.chatty_segments: 100 is at or below the KernelFirst policy's calm threshold"},
		{"min dwell above the policy's max dwell", AutoOptions{MinDwell: time.Hour}, nil, false,
			"auto.start measured: auto.min_dwell: 1h is above the LoopFirst policy's max dwell, 5m"},
		{"max dwell below the policy's min dwell", AutoOptions{Start: AutoStartSockmap, MaxDwell: time.Second}, nil, false,
			"auto.start sockmap: auto.max_dwell: 1s is below the KernelFirst policy's min dwell, 5s"},
		{"max dwell below min dwell", AutoOptions{MinDwell: time.Minute, MaxDwell: time.Second}, nil, false,
			"auto.max_dwell: 1s is below auto.min_dwell, 1m"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, measure, err := tc.o.policy()
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one naming %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.want(p) || measure != tc.measure {
				t.Errorf("policy %+v, measure %v", p, measure)
			}
		})
	}
}

// loopFirstFast is auto.LoopFirst sampled every 20 ms, with a kernel tunnel quiet after 100 ms.
func loopFirstFast() auto.Policy {
	p := auto.LoopFirst
	p.Interval, p.QuietFor, p.MinDwell = 20*time.Millisecond, 100*time.Millisecond, 100*time.Millisecond
	return p
}

// pingThrough sends a few bytes each way through a tunnel and fails t unless they arrive.
func pingThrough(t *testing.T, c *clientConn, u *upstreamConn) {
	t.Helper()
	for _, e := range []struct {
		w   net.Conn
		r   io.Reader
		set func(time.Time) error
	}{{c.TCPConn, u.R, u.SetReadDeadline}, {u.TCPConn, c.R, c.SetReadDeadline}} {
		if _, err := e.w.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 4)
		_ = e.set(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(e.r, got); err != nil || string(got) != "ping" {
			t.Fatalf("read %q, %v through the tunnel", got, err)
		}
	}
}

// TestAutoLoopFirstTracksNoLoopTunnel: under LoopFirst no rule moves a tunnel off the loop, so the sampler
// keeps nothing of the tunnels that open on it (no track, no map entry, no reading a second), while the
// loop carries them; /debug/tunnels shows each on copy, not under the policy, with no move.
func TestAutoLoopFirstTracksNoLoopTunnel(t *testing.T) {
	requireSockmap(t)
	const n = 20
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(loopFirstFast(), nil))
	var c *clientConn
	var u *upstreamConn
	for range n {
		c, u = openTunnel(t, r.Addr, up, nil, nil)
	}
	time.Sleep(5 * loopFirstFast().Interval) // samples that could track or move one
	if got := r.auto.trackedCount(); got != 0 {
		t.Errorf("%d tunnels tracked under LoopFirst with %d open on the loop, want 0", got, n)
	}
	for _, tun := range r.Tunnels().Tunnels() {
		if !tun.pair.OnEventLoop() || tun.Datapath() != DatapathCopy {
			t.Errorf("tunnel %d on %s, event loop %v: want the loop", tun.ID, tun.Datapath(), tun.pair.OnEventLoop())
		}
	}
	pingThrough(t, c, u)
	rec := httptest.NewRecorder()
	r.listTunnels(rec, httptest.NewRequest(http.MethodGet, "/debug/tunnels", nil))
	var infos []TunnelInfo
	if err := json.Unmarshal(rec.Body.Bytes(), &infos); err != nil || len(infos) != n {
		t.Fatalf("/debug/tunnels: %v: %s", err, rec.Body.String())
	}
	for _, info := range infos {
		if info.Datapath != DatapathCopy || info.Auto || info.Moves != 0 {
			t.Errorf("/debug/tunnels entry: %+v, want copy, not under the policy, no move", info)
		}
	}
}

// TestAutoPolicyChangeTracksOpenTunnels: tunnels opened under LoopFirst are not tracked; once a policy that
// moves loop tunnels is put in force (as the start measurement does), every open one is, and a busy one
// moves to the kernel with its stream whole, while the idle ones stay on the loop.
func TestAutoPolicyChangeTracksOpenTunnels(t *testing.T) {
	requireSockmap(t)
	const tunnels, n = 3, 256 << 10
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(loopFirstFast(), nil))
	var cs []*clientConn
	var us []*upstreamConn
	for range tunnels {
		c, u := openTunnel(t, r.Addr, up, nil, nil)
		cs, us = append(cs, c), append(us, u)
	}
	if got := r.auto.trackedCount(); got != 0 {
		t.Fatalf("%d tunnels tracked under LoopFirst, want 0", got)
	}
	busy := auto.KernelForBusy
	busy.Interval, busy.BusySegments, busy.MinDwell = loopFirstFast().Interval, 50, 100*time.Millisecond
	r.auto.apply(busy)
	if got := r.auto.trackedCount(); got != tunnels {
		t.Fatalf("%d tunnels tracked once a policy that moves loop tunnels is in force, want %d", got, tunnels)
	}

	// The first tunnel's client writes 64 bytes a millisecond: about 1000 reads a second on the loop.
	w := &phasedWriter{finish: make(chan struct{})}
	w.chatty.Store(true)
	wrote, read := make(chan error, 1), make(chan error, 1)
	go func() { wrote <- w.run(cs[0].TCPConn, 5, n, 64, time.Millisecond) }()
	go func() {
		got := newStreamCheck(5, n)
		_, err := copyWithin(us[0].TCPConn, got, us[0].R, 60*time.Second)
		if d := got.Diff(); err == nil && d != "" {
			err = fmt.Errorf("wrong stream: %s", d)
		}
		read <- err
	}()
	waitFor(t, 10*time.Second, "the busy tunnel moved to the kernel", func() bool {
		return r.moves(DatapathCopy, DatapathSockmap, auto.ReasonBusy) == 1
	})
	close(w.finish)
	if err := <-wrote; err != nil {
		t.Errorf("client write: %v", err)
	}
	if err := <-read; err != nil {
		t.Errorf("upstream read: %v", err)
	}
	onLoop := 0
	for _, tun := range r.Tunnels().Tunnels() {
		if tun.pair.OnEventLoop() {
			onLoop++
		}
	}
	if onLoop != tunnels-1 {
		t.Errorf("%d tunnels on the loop, want the %d idle ones", onLoop, tunnels-1)
	}
	for i := 1; i < tunnels; i++ {
		pingThrough(t, cs[i], us[i])
	}
}

// TestAutoAdoptedKernelTunnelLeavesUnderLoopFirst: a kernel tunnel adopted in an upgrade is tracked under
// LoopFirst (a rule moves it off the kernel), leaves the kernel once quiet, and is then no longer tracked:
// on the loop no rule of LoopFirst moves it. Its move count stays in /debug/tunnels.
func TestAutoAdoptedKernelTunnelLeavesUnderLoopFirst(t *testing.T) {
	requireSockmap(t)
	up := startUpstream(t)
	old := startRelay(t, DatapathSockmap, []string{up.Addr})
	files, err := old.ExportKernel()
	if err != nil {
		t.Fatal(err)
	}
	next := startRelay(t, DatapathAuto, []string{up.Addr}, withAutoPolicy(loopFirstFast(), nil),
		func(c *Config) { c.KernelObjects = files })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	edge, err := next.PrepareListener(ln, ListenerOptions{Name: "edge", Datapath: DatapathAuto})
	if err != nil {
		t.Fatal(err)
	}
	go edge.Serve()
	c, u := openTunnel(t, old.Addr, up, nil, nil)
	if !next.KernelAdopted() {
		t.Fatal("the new relay did not adopt the old one's BPF objects")
	}
	old.HandKernelTunnels()
	waitInKernel(t, old)
	tun := handOverTo(t, old, next, onlyTunnel(t, old), "edge")
	if got := tun.Datapath(); got != DatapathSockmap {
		t.Fatalf("adopted on %s, want sockmap", got)
	}
	if _, tracked := next.auto.movesOf(tun); !tracked {
		t.Fatal("an adopted kernel tunnel is not tracked under LoopFirst")
	}
	// Counted once the move has returned, after its track was dropped.
	waitFor(t, 10*time.Second, "the adopted kernel tunnel moved to the loop once quiet", func() bool {
		return next.moves(DatapathSockmap, DatapathCopy, auto.ReasonQuiet) == 1
	})
	if moves, tracked := next.auto.movesOf(tun); tracked || moves != 1 {
		t.Errorf("on the loop: tracked %v with %d moves, want untracked with 1", tracked, moves)
	}
	if got := next.auto.trackedCount(); got != 0 {
		t.Errorf("%d tunnels tracked, want 0", got)
	}
	if !tun.pair.OnEventLoop() {
		t.Errorf("moved, but on %s", tun.Datapath())
	}
	pingThrough(t, c, u)
}
