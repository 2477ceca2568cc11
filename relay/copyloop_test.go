package relay

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// TestCopyCarriesPlainTunnelsOnEventLoops: with --datapath copy or splice the loops run from the start, one per
// two CPUs, each with its series at 0; a plain tunnel is carried by a loop (sockrelay_eventloop_tunnels) as a
// tunnel of that datapath and holds no buffer and no pipe while idle, and no descriptor but its two sockets
// (splice on goroutines held a pipe per direction for the tunnel's life: 4 more); once it has ended the loops
// carry nothing.
func TestCopyCarriesPlainTunnelsOnEventLoops(t *testing.T) {
	for _, dp := range []Datapath{DatapathCopy, DatapathSplice} {
		t.Run(string(dp), func(t *testing.T) { testPlainTunnelsOnEventLoops(t, dp) })
	}
}

func testPlainTunnelsOnEventLoops(t *testing.T, dp Datapath) {
	up := startUpstream(t)
	r := startRelay(t, dp, []string{up.Addr})
	want := []string{fmt.Sprintf("sockrelay_eventloop_loops %d", copyLoops(0))}
	for i := range copyLoops(0) {
		want = append(want, fmt.Sprintf(`sockrelay_eventloop_tunnels{loop="%d"} 0`, i),
			fmt.Sprintf(`sockrelay_eventloop_buffer_bytes{loop="%d"} 0`, i),
			fmt.Sprintf(`sockrelay_eventloop_pipe_bytes{loop="%d"} 0`, i))
	}
	want = append(want, `sockrelay_datapath_fallbacks_total{reason="eventloop_start_failed"} 0`,
		`sockrelay_datapath_fallbacks_total{reason="eventloop_carry_failed"} 0`)
	waitScrapeHas(t, r, want...)

	before := fdTargets(t)
	c, u := openTunnel(t, r.Addr, up, []byte("ping"), []byte("pong"))
	waitMetric(t, r, "sockrelay_eventloop_tunnels", 1)
	if ts := r.Tunnels().Tunnels(); len(ts) != 1 || !ts[0].Info().EventLoop || ts[0].Datapath() != dp {
		t.Errorf("/debug/tunnels does not say the tunnel runs on an event loop as %s: %+v", dp, ts)
	}
	// The handshake's bytes have crossed: the idle tunnel holds no buffer and no pipe.
	got := make([]byte, 4)
	if _, err := u.Read(got); err != nil || string(got) != "ping" {
		t.Fatalf("upstream read %q, %v; want ping", got, err)
	}
	waitMetric(t, r, "sockrelay_eventloop_buffer_bytes", 0)
	waitMetric(t, r, "sockrelay_eventloop_pipe_bytes", 0)
	// The client's and the upstream's sockets are in this process too; the loop may keep empty pipes for reuse.
	if n, pooled := newFDs(t, before), pooledPipes(r); n != 4+2*pooled {
		t.Errorf("an idle %s tunnel holds %d descriptors in this process, want 4 (its 2 and its peers' 2) and "+
			"2 for each of the %d pipes the loops keep", dp, n, pooled)
	}
	_ = c.Close()
	_ = u.Close()
	waitTunnelsGone(t, r)
	waitMetric(t, r, "sockrelay_eventloop_tunnels", 0)
}

// TestCopyRunsConfiguredEventLoops: Config.EventLoops sets how many loops run, whatever the CPUs: each has its
// series, tunnels are spread over all of them, and the start log says how many run and why (and warns when
// they outnumber the CPUs).
func TestCopyRunsConfiguredEventLoops(t *testing.T) {
	const loops = 3
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(c *Config) { c.EventLoops = loops })
	waitScrapeHas(t, r, fmt.Sprintf("sockrelay_eventloop_loops %d", loops))
	for range loops {
		c, u := openTunnel(t, r.Addr, up, []byte("ping"), []byte("pong"))
		t.Cleanup(func() { _ = c.Close(); _ = u.Close() })
	}
	var want []string
	for i := range loops {
		want = append(want, fmt.Sprintf(`sockrelay_eventloop_tunnels{loop="%d"} 1`, i))
	}
	waitScrapeHas(t, r, want...)
	logs := r.Log.String()
	if !strings.Contains(logs, `msg="event loops started" loops=3`) || !strings.Contains(logs, "set by event_loops") {
		t.Errorf("the log does not say that 3 loops run as configured:\n%s", logs)
	}
	if warned := strings.Contains(logs, "more event loops than CPUs"); warned != (loops > runtime.NumCPU()) {
		t.Errorf("warned of more loops than CPUs: %v, with %d loops on %d CPUs", warned, loops, runtime.NumCPU())
	}
}

// TestEventLoopsOutOfRange: NewServer refuses a number of loops outside settings.EventLoops, naming the field,
// the value and what is accepted.
func TestEventLoopsOutOfRange(t *testing.T) {
	for _, n := range []int{-1, 1025} {
		_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathCopy, EventLoops: n})
		want := fmt.Sprintf("EventLoops: %d is out of range; accepted 0 (the default, one per two CPUs) or 1 to 1024", n)
		if err == nil || err.Error() != want {
			t.Errorf("NewServer with EventLoops %d: %v, want %s", n, err, want)
		}
	}
}

// pooledPipes is how many empty pipes the relay's loops keep for reuse.
// fdTargets is what each of the process's descriptors refers to (socket:[inode], pipe:[inode], ...).
func fdTargets(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]string, len(ents))
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			m[e.Name()] = target
		}
	}
	return m
}

// newFDs counts the descriptors opened since before was taken (a number that refers to something else
// now counts as new). Descriptors an earlier test closes meanwhile, on another goroutine (its relay's
// loops, its upstream's handlers), leave the count alone; a count of all descriptors went down by them.
func newFDs(t *testing.T, before map[string]string) int {
	t.Helper()
	n := 0
	for fd, target := range fdTargets(t) {
		if before[fd] != target {
			n++
		}
	}
	return n
}

func pooledPipes(r *testRelay) int {
	var n int64
	for _, l := range r.copier.Stats().Loops {
		n += l.PipesFree
	}
	return int(n)
}

// waitMetric waits until the series of name, summed, read want.
func waitMetric(t *testing.T, r *testRelay, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := metricSum(r.Reg, name, nil)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", name, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCopyLoopsUnavailable: when the event loops cannot start (out of descriptors for epoll_create), plain
// copy tunnels run on goroutines instead, byte-exact and ending cleanly, each counted as a fallback with the
// cause in the log; no tunnel is reset or blamed on a peer.
func TestCopyLoopsUnavailable(t *testing.T) {
	for _, dp := range []Datapath{DatapathCopy, DatapathSplice} {
		t.Run(string(dp), func(t *testing.T) { testLoopsUnavailable(t, dp) })
	}
}

// testLoopsUnavailable is TestCopyLoopsUnavailable on dp; a splice tunnel that runs on copy goroutines
// counts as a copy tunnel from then on (sockrelay_tunnels_active), so that its end is counted where it ran.
func testLoopsUnavailable(t *testing.T, dp Datapath) {
	up := startUpstream(t)
	fail := func(eventloop.Options) (*datapath.EventLoop, error) {
		return nil, fmt.Errorf("copy datapath: start event loop 0: epoll_create1: %w", unix.EMFILE)
	}
	r := startRelay(t, dp, []string{up.Addr}, func(c *Config) { c.startLoops = fail })
	for i := range 2 {
		runDuplex(t, r, up, duplexCase{toUpstream: 1 << 20, toClient: 1 << 20, pipelined: 100, with101: 100}, uint64(i))
	}
	waitTunnelsGone(t, r)
	if n := metricSum(r.Reg, "sockrelay_datapath_fallbacks_total", map[string]string{"reason": fallbackLoopStart}); n != 3 {
		t.Errorf("eventloop_start_failed fallbacks = %v, want 3 (at start, then one per tunnel)", n)
	}
	if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": ReasonClosed}); n != 2 {
		t.Errorf("sockrelay_tunnels_closed_total{reason=%q} = %v, want 2", ReasonClosed, n)
	}
	for _, d := range []Datapath{DatapathCopy, DatapathSplice} {
		if n := metricSum(r.Reg, "sockrelay_tunnels_active", map[string]string{"datapath": string(d)}); n != 0 {
			t.Errorf("sockrelay_tunnels_active{datapath=%q} = %v after every tunnel ended, want 0", d, n)
		}
	}
	if n := metricSum(r.Reg, "sockrelay_eventloop_loops", nil); n != 0 {
		t.Errorf("sockrelay_eventloop_loops = %v with loops that could not start", n)
	}
	if logs := r.Log.String(); !strings.Contains(logs, "event loops cannot start, the tunnel runs on goroutines") ||
		!strings.Contains(logs, "too many open files") {
		t.Errorf("log lacks the fallback and its cause:\n%s", logs)
	}
}
