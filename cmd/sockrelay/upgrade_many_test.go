package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/loader"
	"github.com/sockrelay/sockrelay/upstream"
)

// streamEnd is the client end of a tunnel with checked streams both ways.
type streamEnd struct {
	c    *net.TCPConn
	br   *bufio.Reader
	seed uint64
	res  [2]streamResult // [0] our stream as sent, [1] the upstream's as received
}

// upgradeTraffic is what flows through a relay while it is upgraded: tunnels with checked streams both
// ways, and ping-pong tunnels that time their round trips.
type upgradeTraffic struct {
	up        *checkedUpstream
	streams   []*streamEnd
	longest   []roundTrips
	pingErrs  []error
	upgrading atomic.Bool // set by the test while an upgrade runs: the round trips are counted apart
	stop      chan struct{}
	stopPings chan struct{}
	wg        sync.WaitGroup
}

// startTraffic opens streams checked tunnels, their chunks pace apart, and pingers ping-pong tunnels
// through the relay at addr to up.
func startTraffic(t *testing.T, addr string, up *checkedUpstream, streams, pingers int, pace time.Duration) *upgradeTraffic {
	t.Helper()
	tr := &upgradeTraffic{up: up, longest: make([]roundTrips, pingers), pingErrs: make([]error, pingers),
		stop: make(chan struct{}), stopPings: make(chan struct{})}
	for i := range streams {
		c, br := openRaw(t, addr, "stream", uint64(i))
		e := &streamEnd{c: c, br: br, seed: uint64(i)}
		tr.streams = append(tr.streams, e)
		tr.wg.Go(func() { e.res[0].sent, e.res[0].err = checkedSender(e.c, e.seed*2, 0, pace, tr.stop) })
		tr.wg.Go(func() { e.res[1].received, e.res[1].err = checkedReceiver(e.br, e.seed*2+1) })
	}
	for i := range pingers {
		c, br := openRaw(t, addr, "echo", 0)
		tr.wg.Go(func() { tr.longest[i], tr.pingErrs[i] = pingPong(c, br, tr.stopPings, &tr.upgrading) })
	}
	return tr
}

// finish ends every stream with its FINs, waits for both ends, and fails t for each stream corrupted,
// cut short or reset and each ping-pong tunnel that failed; it returns the longest round trips seen.
func (tr *upgradeTraffic) finish(t *testing.T, logs fmt.Stringer) roundTrips {
	t.Helper()
	close(tr.stop)
	close(tr.up.stop)
	close(tr.stopPings)
	tr.wg.Wait()
	tr.up.wg.Wait()
	checkStreams(t, tr.streams, tr.up, logs)
	var worst roundTrips
	for i, err := range tr.pingErrs {
		if err != nil {
			t.Errorf("ping-pong tunnel %d: %v", i, err)
		}
		worst = roundTrips{max(worst.during, tr.longest[i].during), max(worst.outside, tr.longest[i].outside)}
	}
	return worst
}

// checkStreams fails t for each of ends whose stream either way failed or did not arrive whole at the
// other end; after five such tunnels it stops t, with logs.
func checkStreams(t *testing.T, ends []*streamEnd, up *checkedUpstream, logs fmt.Stringer) {
	t.Helper()
	bad := 0
	for _, e := range ends {
		at := up.result(e.seed)
		switch {
		case e.res[0].err != nil || e.res[1].err != nil || at[0].err != nil || at[1].err != nil:
			t.Errorf("tunnel %d: client sent %v, received %v; upstream received %v, sent %v", e.seed,
				e.res[0].err, e.res[1].err, at[0].err, at[1].err)
		case at[0].received != e.res[0].sent || e.res[1].received != at[1].sent:
			t.Errorf("tunnel %d: client → upstream %d of %d bytes, upstream → client %d of %d", e.seed,
				at[0].received, e.res[0].sent, e.res[1].received, at[1].sent)
		default:
			continue
		}
		if bad++; bad > 5 {
			t.Fatalf("more tunnels failed\n%s", logs)
		}
	}
}

// rawEcho opens a tunnel through the relay at addr to the checked upstream's echo, sends a few bytes
// and reads them back, then ends it with both FINs.
func rawEcho(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Mode: echo\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fmt.Errorf("handshake: %s", resp.Status)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping" {
		return fmt.Errorf("echo: %q, %v", got, err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	if n, err := io.Copy(io.Discard, br); n != 0 || err != nil {
		return fmt.Errorf("after our FIN: %d bytes, %v; want the upstream's FIN", n, err)
	}
	return nil
}

// rawHandshakes opens and ends tunnels through addr back to back, from two goroutines, until stop is
// called; stop returns how many were tried and the errors.
func rawHandshakes(addr string) (stop func() (int, []error)) {
	return tryLoop(func() error { return rawEcho(addr) })
}

// upgradeUnderTraffic is one run of TestUpgradeManyTunnels.
type upgradeUnderTraffic struct {
	name     string
	datapath string // of the relay's configuration
	streams  int    // tunnels with checked streams both ways
	pingers  int    // ping-pong tunnels
	upgrades int    // back to back, each asked for as soon as the one before answered
	reload   bool   // a configuration reload asked for (SIGHUP) just before the first upgrade
}

// manyPace is how far apart a stream's 2 KiB chunks go in TestUpgradeManyTunnels: 10 KB/s a direction,
// 20 MB/s through the relay with 1000 tunnels, which two shared cores carry besides the checks.
const manyPace = 10 * streamPace

// TestUpgradeManyTunnels: upgrades during traffic, on each userspace engine: tunnels with checked
// streams both ways and ping-pong tunnels are all handed to the new process (every one listed there
// under its id, none kept by the old one, which is gone), no stream is corrupted, cut or reset, and
// handshakes started throughout (two clients back to back) all succeed. Also two upgrades back to back
// (the second asked of the new process while it may still be adopting the first's tunnels) and an
// upgrade asked for during a configuration reload. It logs the handover time and the longest ping-pong
// round trip during the upgrade and outside it. The 1000-tunnel rows run with 100 under -short and the
// race detector (the relay processes have 30 s).
func TestUpgradeManyTunnels(t *testing.T) {
	for _, tc := range []upgradeUnderTraffic{
		{name: "copy", datapath: "copy", streams: 1000, pingers: 100, upgrades: 1},
		{name: "splice", datapath: "splice", streams: 1000, pingers: 100, upgrades: 1},
		{name: "copy twice", datapath: "copy", streams: 200, pingers: 20, upgrades: 2},
		{name: "splice twice", datapath: "splice", streams: 200, pingers: 20, upgrades: 2},
		{name: "copy during reload", datapath: "copy", streams: 200, pingers: 20, upgrades: 1, reload: true},
		// Kernel tunnels move with the BPF objects the new process adopts, their sockets left in the maps.
		{name: "sockmap", datapath: "sockmap", streams: 1000, pingers: 100, upgrades: 1},
		{name: "sockmap twice", datapath: "sockmap", streams: 200, pingers: 20, upgrades: 2},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			if err := loader.Probe().Err(); tc.datapath == "sockmap" && err != nil {
				t.Skipf("this host cannot run sockmap: %v", err) // CI's TestMain fails such a host first
			}
			if (testing.Short() || raceEnabled) && tc.streams > 200 {
				tc.streams, tc.pingers = tc.streams/10, tc.pingers/10
				t.Logf("-short or -race: %d streams and %d ping-pong tunnels", tc.streams, tc.pingers)
			}
			upgradeManyTunnels(t, tc)
		})
	}
}

// manyConfig is the configuration of TestUpgradeManyTunnels's relay: one listener, one pool of up of
// weight, tunnels on datapath.
func manyConfig(t *testing.T, path, admin, listen, datapath, up string, weight int) {
	t.Helper()
	writeFile(t, path, fmt.Sprintf(`datapath: %s
admin: %q
listeners:
  - {name: web, address: %q, routes: [{pool: checked}]}
pools:
  checked: {servers: [{address: %q, weight: %d}]}
`, datapath, admin, listen, up, weight))
}

func upgradeManyTunnels(t *testing.T, tc upgradeUnderTraffic) {
	up := newCheckedUpstream(t)
	up.pace = manyPace
	dir := t.TempDir()
	path, admin := filepath.Join(dir, "sockrelay.yaml"), "unix:"+filepath.Join(dir, "admin.sock")
	manyConfig(t, path, admin, freeAddr(t), tc.datapath, up.addr, 1)
	r := startUpgradableWith(t, admin, nil, "--config", path, "--log-format", "json", "--drain-timeout", "20s")
	opening := time.Now()
	tr := startTraffic(t, r.listen, up, tc.streams, tc.pingers, manyPace)
	opened := time.Since(opening)
	oldIDs, _ := tunnelIDs(t, r.admin)
	if len(oldIDs) != tc.streams+tc.pingers {
		t.Fatalf("the old process lists %d tunnels, want %d", len(oldIDs), tc.streams+tc.pingers)
	}
	time.Sleep(300 * time.Millisecond)

	handshakes := rawHandshakes(r.listen)
	time.Sleep(100 * time.Millisecond) // handshakes before, during and after
	tr.upgrading.Store(true)
	if tc.reload {
		manyConfig(t, path, admin, r.listen, tc.datapath, up.addr, 2)
		if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	var pids []int
	var answers []string
	for i := range tc.upgrades {
		code, out := r.upgrade(t)
		if code != 0 {
			t.Fatalf("upgrade %d: exit %d: %s\n%s", i+1, code, out, r.logs)
		}
		pids, answers = append(pids, newPID(t, out)), append(answers, strings.TrimSpace(out))
	}
	r.waitExit(t, 10*time.Second) // with every tunnel live and 20s of drain: it held none
	for _, pid := range pids[:len(pids)-1] {
		if !pollFor(10*time.Second, func() bool { return processGone(pid) }) {
			t.Fatalf("the intermediate process %d had not exited 10s after the upgrades:\n%s", pid, r.logs)
		}
	}
	tr.upgrading.Store(false)

	// Besides the old process's tunnels, under their ids, it lists those of the handshakes going on.
	newIDs, infos := tunnelIDs(t, r.admin)
	if missing := slices.DeleteFunc(slices.Clone(oldIDs), func(id uint64) bool {
		_, found := slices.BinarySearch(newIDs, id)
		return found
	}); len(missing) > 0 {
		t.Errorf("the last new process lacks %d of the old one's %d tunnels, e.g. %d", len(missing), len(oldIDs), missing[0])
	}
	for _, info := range infos {
		// The handed-over tunnels only: a handshake worker's tunnel that its client closes at once may
		// fall back to copy at its kernel entry (its FIN is in: socket_closing), which is not the move's.
		if _, handed := slices.BinarySearch(oldIDs, info.ID); !handed {
			continue
		}
		if string(info.Datapath) != tc.datapath {
			t.Errorf("tunnel %d runs on %s in the new process, want %s", info.ID, info.Datapath, tc.datapath)
			break
		}
	}
	handedOver := append(r.logs.lines("upgrade: tunnels handed over"), r.logs.lines("upgrade: more tunnels handed over")...)
	moved := map[float64]float64{} // by the pid handed to
	for _, l := range handedOver {
		if l["kept"] != float64(0) {
			t.Errorf("an old process kept tunnels: %v", l)
		}
		moved[l["pid"].(float64)] += l["handed_over"].(float64)
	}
	if got := moved[float64(pids[0])]; got < float64(len(oldIDs)) {
		t.Errorf("%v tunnels handed to the first new process, want the old one's %d (and those of the handshakes then):\n%v",
			got, len(oldIDs), handedOver)
	}
	if tc.reload {
		var pools []upstream.Snapshot
		body := adminGet(t, r.admin, "/admin/pools")
		if json.Unmarshal([]byte(body), &pools) != nil || len(pools) != 1 || len(pools[0].Servers) != 1 || pools[0].Servers[0].Weight != 2 {
			t.Errorf("the new process's pools: %s; want the reloaded configuration's server of weight 2", body)
		}
		if n := len(r.logs.lines("configuration reloaded")); n != 1 {
			t.Errorf("%d reloads logged, want the old process's 1:\n%s", n, r.logs)
		}
	}
	time.Sleep(300 * time.Millisecond) // traffic on the new process
	tried, errs := handshakes()
	if len(errs) > 0 {
		t.Errorf("%d of %d handshakes during the upgrade failed, want 0: %v", len(errs), tried, errs[:min(len(errs), 5)])
	}
	worst := tr.finish(t, r.logs)

	var took []string
	for _, l := range handedOver {
		took = append(took, fmt.Sprintf("%v to pid %v in %vms", l["handed_over"], l["pid"], l["took_ms"]))
	}
	t.Logf("%d tunnels (%d checked streams, %d ping-pong) opened in %s; %s; handed over: %s; %d handshakes during the upgrade, %d failed; "+
		"the longest ping-pong round trip: %s during the upgrade, %s outside it; the last new process's peak resident memory: %s",
		len(oldIDs), tc.streams, tc.pingers, opened.Round(time.Millisecond), strings.Join(answers, "; "), strings.Join(took, ", "),
		tried, len(errs), worst.during.Round(time.Millisecond), worst.outside.Round(time.Millisecond), peakMemory(pids[len(pids)-1]))
}

// peakMemory is pid's peak resident set size as /proc says it (VmHWM), for the log.
func peakMemory(pid int) string {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return err.Error()
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	return "unknown"
}

// pollFor polls cond every 10ms until it holds or d has passed; it says whether it held.
func pollFor(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// TestUpgradeFailureKeepsTunnels: while checked streams and ping-pong tunnels flow, a new binary that
// exits at once and one whose datapath probe fails (its --datapath sockmap, without the capabilities the
// kernel datapath needs) fail their upgrades: the old process keeps every tunnel, hands none over, and
// no byte is lost, cut or reset. An upgrade after them hands every tunnel over. On copy and on splice.
func TestUpgradeFailureKeepsTunnels(t *testing.T) {
	const streams, pingers = 100, 10
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, datapath := range []string{"copy", "splice"} {
		t.Run(datapath, func(t *testing.T) {
			dir := t.TempDir()
			binary := filepath.Join(dir, "sockrelay")
			install := func(body string) {
				tmp := filepath.Join(dir, "next")
				writeFile(t, tmp, "#!/bin/sh\n"+body+"\n")
				if err := os.Chmod(tmp, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Rename(tmp, binary); err != nil {
					t.Fatal(err)
				}
			}
			up := newCheckedUpstream(t)
			admin := "unix:" + filepath.Join(dir, "admin.sock")
			r := startUpgradableWith(t, admin, nil, "--listen", "127.0.0.1:0", "--admin", admin, "--upstream", up.addr,
				"--datapath", datapath, "--drain-timeout", "20s", "--log-format", "json", "--upgrade-binary", binary)
			tr := startTraffic(t, r.listen, up, streams, pingers, streamPace)
			oldIDs, _ := tunnelIDs(t, r.admin)

			for _, f := range []struct {
				name, body string
				args       []string
				want       string
			}{
				{"exits at once", "exit 3", nil, "(exit status 3)"},
				{"fails its datapath probe", "exec setpriv --bounding-set=-all " + self + ` "$@"`,
					[]string{"--", "--listen", r.listen, "--upstream", up.addr, "--admin", admin, "--datapath", "sockmap", "--log-format", "json"},
					"could not start: --datapath sockmap: datapath unavailable"},
			} {
				t.Run(strings.ReplaceAll(f.name, " ", "_"), func(t *testing.T) {
					if _, err := exec.LookPath("setpriv"); strings.HasPrefix(f.body, "exec setpriv") && err != nil {
						t.Skipf("no setpriv to start the new binary without capabilities: %v", err)
					}
					install(f.body)
					code, out := r.upgrade(t, f.args...)
					if code != 1 || !strings.Contains(out, "upgrade failed, this relay keeps serving") || !strings.Contains(out, f.want) {
						t.Errorf("upgrade: exit %d, %q; want 1 and %q", code, out, f.want)
					}
					if ids, _ := tunnelIDs(t, r.admin); !slices.Equal(ids, oldIDs) {
						t.Errorf("after the failed upgrade the relay lists %d tunnels, want its %d", len(ids), len(oldIDs))
					}
					time.Sleep(200 * time.Millisecond) // traffic on the old process
				})
			}
			if n := len(r.logs.lines("upgrade: tunnels handed over")); n != 0 {
				t.Errorf("tunnels handed over %d times by failed upgrades:\n%s", n, r.logs)
			}

			install("exec " + self + ` "$@"`)
			if code, out := r.upgrade(t); code != 0 {
				t.Fatalf("upgrade after the failures: exit %d: %s\n%s", code, out, r.logs)
			}
			r.waitExit(t, 10*time.Second)
			if ids, _ := tunnelIDs(t, r.admin); !slices.Equal(ids, oldIDs) {
				t.Errorf("the new process lists %d tunnels, want the old one's %d", len(ids), len(oldIDs))
			}
			tr.finish(t, r.logs)
		})
	}
}
