package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/handover"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"github.com/sockrelay/sockrelay/loader"
	"github.com/sockrelay/sockrelay/relay"
	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// logFile is a relay's stderr as a file, not a pipe: the process an upgrade starts inherits it and writes
// on after the old one has exited (a pipe would keep the test's Wait of the old one waiting for the new).
type logFile struct{ path string }

func newLogFile(t *testing.T) (*os.File, *logFile) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "relay.log")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, &logFile{path: path}
}

func (l *logFile) String() string {
	b, _ := os.ReadFile(l.path)
	return string(b)
}

// lines returns the JSON log lines whose msg is msg.
func (l *logFile) lines(msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(l.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// upgradable is a relay process started from the test binary, which an upgrade can restart from itself.
type upgradable struct {
	cmd    *exec.Cmd
	exited chan error
	logs   *logFile
	listen string // where clients connect
	admin  string // unix:/PATH
}

// startUpgradable runs `sockrelay run` with a Unix-socket admin (changes need no token there) and waits
// until it serves. Extra environment (e.g. NOTIFY_SOCKET) is env.
func startUpgradable(t *testing.T, upstream string, drain time.Duration, env ...string) *upgradable {
	t.Helper()
	return startUpgradableOn(t, "copy", upstream, drain, env...)
}

// startUpgradableOn is startUpgradable with the tunnels on datapath.
func startUpgradableOn(t *testing.T, datapath, upstream string, drain time.Duration, env ...string) *upgradable {
	t.Helper()
	admin := "unix:" + filepath.Join(t.TempDir(), "admin.sock")
	return startUpgradableWith(t, admin, env, "--listen", "127.0.0.1:0", "--admin", admin, "--upstream", upstream,
		"--datapath", datapath, "--drain-timeout", drain.String(), "--log-format", "json")
}

// startUpgradableWith is startUpgradable with the run flags given (JSON logs among them) and the admin
// address they name.
func startUpgradableWith(t *testing.T, admin string, env []string, args ...string) *upgradable {
	t.Helper()
	f, logs := newLogFile(t)
	cmd := mainCommand(t, append([]string{"run"}, args...)...)
	cmd.Stderr = f
	cmd.Env = append(cmd.Env, env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := &upgradable{cmd: cmd, exited: make(chan error, 1), logs: logs, admin: admin}
	t.Cleanup(func() {
		// Every process an upgrade started, whatever the test saw of it (an answer lost on the way).
		for _, l := range logs.lines("upgrade: the new process serves; this one stops accepting and drains its tunnels") {
			if pid, ok := l["pid"].(float64); ok {
				_ = syscall.Kill(int(pid), syscall.SIGKILL)
			}
		}
	})
	go func() { r.exited <- cmd.Wait() }()
	waitFor(t, "the relay to serve", func() bool { return len(logs.lines("sockrelay listening")) > 0 })
	r.listen = logs.lines("sockrelay listening")[0]["listen"].(string)
	return r
}

// upgrade runs `sockrelay upgrade` against the relay and returns its exit code and output. A process it
// started is killed when the test ends.
func (r *upgradable) upgrade(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := dispatch(context.Background(), append([]string{"upgrade", "--admin", r.admin}, args...), &stdout, &stderr)
	out := stdout.String() + stderr.String()
	if code == 0 {
		pid := newPID(t, out)
		t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	}
	return code, out
}

// logsBuffer is the logs so far, for helpers that print a *syncbuf.Buffer.
func (r *upgradable) logsBuffer() *syncbuf.Buffer {
	b := &syncbuf.Buffer{}
	b.Write([]byte(r.logs.String()))
	return b
}

// newPID is the pid a successful upgrade's output names.
func newPID(t *testing.T, out string) int {
	t.Helper()
	var pid int
	if _, err := fmt.Sscanf(out, "sockrelay upgrade: pid %d serves now", &pid); err != nil {
		t.Fatalf("upgrade said %q: no pid: %v", out, err)
	}
	return pid
}

// waitExit waits for the old process to exit and checks it exited 0.
func (r *upgradable) waitExit(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case err := <-r.exited:
		if err != nil {
			t.Errorf("the old process ended with %v, want exit status 0:\n%s", err, r.logs)
		}
	case <-time.After(within):
		t.Fatalf("the old process had not exited %s after the upgrade:\n%s", within, r.logs)
	}
}

// processGone says whether pid has exited: no such process, or a zombie its new parent (the process an
// orphan is given to, which need not reap it soon) has not reaped.
func processGone(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return true
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	_, after, _ := strings.Cut(string(stat), ") ") // the name, in parentheses, may hold spaces
	return strings.HasPrefix(after, "Z")
}

// handshakeLoop opens and closes WebSockets through addr back to back, from two goroutines, until stop
// is called; stop returns how many were tried and the errors.
func handshakeLoop(addr string) (stop func() (int, []error)) {
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second} // safe for concurrent Dials
	return tryLoop(func() error {
		ws, _, err := d.Dial("ws://"+addr+"/", nil)
		if err != nil {
			return err
		}
		defer ws.Close()
		_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		if err := ws.WriteMessage(websocket.TextMessage, []byte("x")); err != nil {
			return err
		}
		_, _, err = ws.ReadMessage()
		return err
	})
}

// tryLoop calls try back to back from two goroutines until stop is called; stop returns how many calls
// were made and their errors.
func tryLoop(try func() error) (stop func() (int, []error)) {
	var n atomic.Int64
	var mu sync.Mutex
	var errs []error
	done, wg := make(chan struct{}), sync.WaitGroup{}
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				n.Add(1)
				if err := try(); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	return func() (int, []error) {
		close(done)
		wg.Wait()
		return int(n.Load()), errs
	}
}

// TestUpgradeKeepsServing: `sockrelay upgrade` hands the listeners to a new process while clients open
// WebSockets back to back: none is refused or fails. A tunnel open before the upgrade keeps flowing: the
// new process carries it on and the old one exits 0 at once (on sockmap the new process adopts the old
// one's BPF objects, and the tunnel moves with its sockets left in the maps). The new process serves on.
// On copy, and on sockmap where the host runs it (the new one's self-test, over the adopted objects,
// included in the handover time).
func TestUpgradeKeepsServing(t *testing.T) {
	for _, dp := range []string{"copy", "sockmap"} {
		t.Run(dp, func(t *testing.T) {
			if err := loader.Probe().Err(); dp == "sockmap" && err != nil {
				t.Skipf("this host cannot run sockmap: %v", err)
			}
			upgradeKeepsServing(t, dp)
		})
	}
}

func upgradeKeepsServing(t *testing.T, datapath string) {
	r := startUpgradableOn(t, datapath, newEchoUpstream(t), 20*time.Second)
	if got := r.logs.lines("sockrelay listening")[0]["datapath"]; got != datapath {
		t.Fatalf("the relay's tunnels run on %v, want %s", got, datapath)
	}
	before := dialWS(t, r.listen)
	echoThrough(t, before, "before the upgrade")

	stop := handshakeLoop(r.listen)
	time.Sleep(100 * time.Millisecond) // handshakes before, during and after
	code, out := r.upgrade(t)
	time.Sleep(200 * time.Millisecond)
	tried, errs := stop()
	if code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	if len(errs) > 0 {
		t.Errorf("%d of %d handshakes during the upgrade failed, want 0: %v\n%s", len(errs), tried, errs, r.logs)
	}
	t.Logf("%s; %d handshakes during it, %d failed", strings.TrimSpace(out), tried, len(errs))
	pid := newPID(t, out)
	if n := len(r.logs.lines("listener adopted from the running relay")); n != 2 {
		t.Errorf("%d listeners adopted, want 2 (the client one and the admin):\n%s", n, r.logs)
	}

	// The tunnel from before moves to the new process, and the old one exits at once.
	for i := range 3 {
		echoThrough(t, before, fmt.Sprintf("after the upgrade %d", i))
		time.Sleep(50 * time.Millisecond)
	}
	r.waitExit(t, 5*time.Second)
	closeWS(t, before)
	if len(r.logs.lines("handed over to the new process: no new clients here; draining tunnels")) != 1 ||
		len(r.logs.lines("sockrelay stopped: the new process serves")) != 1 {
		t.Errorf("the old process did not log its drain and stop:\n%s", r.logs)
	}

	// The new process serves clients and the admin listener, which is its own now.
	echoThrough(t, dialWS(t, r.listen), "to the new process")
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("the new process %d: %v", pid, err)
	}
	if _, err := os.Stat(strings.TrimPrefix(r.admin, "unix:")); err != nil {
		t.Errorf("the admin socket file went with the old process: %v", err)
	}
}

// TestUpgradeFailureKeepsServing: a new binary that exits at once, one that cannot start (its listener's
// address is taken) and one that never confirms leave the running relay with everything; upgrade exits 1
// with the reason. An upgrade asked for while one is in progress is refused. After all that, an upgrade
// goes through. Each binary is installed at the path the relay was started with (--upgrade-binary), as a
// package upgrade installs a new one.
func TestUpgradeFailureKeepsServing(t *testing.T) {
	dir := t.TempDir()
	binary := filepath.Join(dir, "sockrelay")
	admin := "unix:" + filepath.Join(dir, "admin.sock")
	r := startUpgradableWith(t, admin, nil, "--listen", "127.0.0.1:0", "--admin", admin, "--upstream", newEchoUpstream(t),
		"--datapath", "copy", "--drain-timeout", "5s", "--log-format", "json", "--upgrade-binary", binary)
	script := func(name, body string) string { // installs body at binary; name is for the reader
		tmp := filepath.Join(dir, name)
		writeFile(t, tmp, "#!/bin/sh\n"+body+"\n")
		if err := os.Chmod(tmp, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, binary); err != nil {
			t.Fatal(err)
		}
		return binary
	}
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { taken.Close() })
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	type failure struct {
		name string
		body string // the script installed at binary
		args []string
		want string
	}
	var kernel []failure
	if _, err := exec.LookPath("setpriv"); err == nil && loader.Probe().Err() == nil {
		// The kernel datapath's probe, run without the capabilities it needs (as an unprivileged user would):
		// the new process's start fails as a failed self-test makes it fail.
		kernel = append(kernel, failure{"fails its datapath probe", "exec setpriv --bounding-set=-all " + self + ` "$@"`,
			[]string{"--", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--admin", r.admin, "--datapath", "sockmap", "--log-format", "json"},
			"could not start: --datapath sockmap: datapath unavailable: sockmap: kernel "})
	}
	for _, tc := range append([]failure{
		{"exits at once", "exit 3", nil,
			"ended before it"}, // took the listeners, or served: whichever it was at when the old process noticed
		{"cannot start", "exec " + self + ` "$@"`, []string{"--binary", binary, "--", "--listen", taken.Addr().String(), "--upstream", "127.0.0.1:9",
			"--admin", r.admin, "--datapath", "copy", "--log-format", "json"},
			"could not start: --listen: listen tcp " + taken.Addr().String() + ": bind: address already in use (exit status 1)"},
		{"never confirms", "exec sleep 30", []string{"--timeout", "500ms"},
			"did not confirm that it serves within 500ms; killed it"},
	}, kernel...) {
		t.Run(tc.name, func(t *testing.T) {
			script(strings.ReplaceAll(tc.name, " ", "-"), tc.body)
			code, out := r.upgrade(t, tc.args...)
			if code != 1 || !strings.Contains(out, "upgrade failed, this relay keeps serving") || !strings.Contains(out, tc.want) ||
				(tc.name == "exits at once" && !strings.Contains(out, "(exit status 3)")) {
				t.Errorf("upgrade: exit %d, %q; want 1 and %q", code, out, tc.want)
			}
			echoThrough(t, dialWS(t, r.listen), "still served by the old process")
		})
	}
	if n := len(r.logs.lines("upgrade failed: this process keeps serving")); n != 3+len(kernel) {
		t.Errorf("%d upgrade failures logged, want %d:\n%s", n, 3+len(kernel), r.logs)
	}

	t.Run("in progress", func(t *testing.T) {
		first := make(chan int, 1)
		go func() {
			code, _ := r.upgrade(t, "--binary", script("slow", "exec sleep 30"), "--timeout", "1s")
			first <- code
		}()
		waitFor(t, "the first upgrade to start", func() bool { return len(r.logs.lines("upgrade: starting the new process")) == 4+len(kernel) })
		code, out := r.upgrade(t)
		if code != 1 || !strings.Contains(out, "409 Conflict: upgrade refused: an upgrade is in progress") {
			t.Errorf("upgrade during another: exit %d, %q; want 1 and the refusal", code, out)
		}
		if code := <-first; code != 1 {
			t.Errorf("the slow upgrade: exit %d, want 1", code)
		}
	})

	t.Run("another binary", func(t *testing.T) {
		code, out := r.upgrade(t, "--binary", self)
		if want := "400 Bad Request: upgrade request refused: binary " + self + ": accepted only " + binary; code != 1 || !strings.Contains(out, want) {
			t.Errorf("upgrade --binary %s: exit %d, %q; want 1 and %q", self, code, out, want)
		}
	})

	script("self", "exec "+self+` "$@"`)
	code, out := r.upgrade(t)
	if code != 0 {
		t.Fatalf("upgrade after the failures: exit %d: %s\n%s", code, out, r.logs)
	}
	r.waitExit(t, 5*time.Second)
	echoThrough(t, dialWS(t, r.listen), "to the new process")
}

// TestUpgradeTwice: an upgrade right after another goes to the process the first one started (through
// the admin socket it took over, then by SIGUSR2). Under systemd (NOTIFY_SOCKET) each new process says
// READY=1 and its parent then names it MAINPID, before it exits; an old process stopped while it drains
// does not say STOPPING=1, which would stop the unit.
func TestUpgradeTwice(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: socket, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { notify.Close() })
	// The new processes refuse tunnels of odd ids: ws stays with the first process, which drains it.
	r := startUpgradable(t, newEchoUpstream(t), 5*time.Second, "NOTIFY_SOCKET="+socket, refuseTunnelsEnv+"=odd")
	ws := dialWS(t, r.listen) // keeps the first process draining

	code, out := r.upgrade(t)
	if code != 0 {
		t.Fatalf("first upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	first := newPID(t, out)
	code, out = r.upgrade(t) // the same admin address: the new process answers now
	if code != 0 {
		t.Fatalf("second upgrade, right after the first: exit %d: %s\n%s", code, out, r.logs)
	}
	second := newPID(t, out)
	if second == first || !strings.Contains(out, fmt.Sprintf("pid %d hands it", first)) {
		t.Fatalf("second upgrade %q: want it done by pid %d, starting another", out, first)
	}
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	echoThrough(t, ws, "drained by the first process")
	closeWS(t, ws)
	r.waitExit(t, 5*time.Second)
	waitFor(t, "the first new process to exit", func() bool { return processGone(first) })

	// SIGUSR2 to the process that serves now: the same upgrade, logged.
	if err := syscall.Kill(second, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the upgrade SIGUSR2 asked for", func() bool {
		return len(r.logs.lines("upgrade: the new process serves; this one stops accepting and drains its tunnels")) == 3
	})
	third := int(r.logs.lines("upgrade: the new process serves; this one stops accepting and drains its tunnels")[2]["pid"].(float64))
	t.Cleanup(func() { _ = syscall.Kill(third, syscall.SIGKILL) })
	waitFor(t, "the second new process to exit", func() bool { return processGone(second) })
	echoThrough(t, dialWS(t, r.listen), "to the third process")

	var got []string
	for range 7 {
		got = append(got, readNotifyWithin(t, notify, r.logsBuffer(), 5*time.Second))
	}
	want := []string{"READY=1", "READY=1", "MAINPID=" + strconv.Itoa(first), "READY=1", "MAINPID=" + strconv.Itoa(second),
		"READY=1", "MAINPID=" + strconv.Itoa(third)}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("notifications %q, want %q", got, want)
	}
}

// TestUpgradeNewConfiguration: the new process runs the configuration it is given. A listener in both
// (by address) is adopted, a TLS one too (the new process terminates TLS with the certificates it loads);
// one only in the new configuration is bound; one only in the old (here a tcp listener with the PROXY
// protocol) is closed once the old process has let go of it. A TLS tunnel open before stays with the
// old process until it ends.
func TestUpgradeNewConfiguration(t *testing.T) {
	echo, kept, gone, added, secure := newEchoUpstream(t), freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "upgrade CA")
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, dir, "relay")
	tlsListener := fmt.Sprintf("  - {name: secure, address: %q, tls: {certificates: [{cert: %q, key: %q}]}, routes: [{pool: echo}]}\n",
		secure, cert, key)
	wss := websocket.Dialer{TLSClientConfig: &tls.Config{ServerName: "relay.test", RootCAs: ca.Pool()}, HandshakeTimeout: 5 * time.Second}
	admin := "unix:" + filepath.Join(dir, "admin.sock")
	config := func(name, listeners string) string {
		path := filepath.Join(dir, name)
		writeFile(t, path, fmt.Sprintf("admin: %q\nlisteners:\n%spools:\n  echo: {servers: [%q]}\n", admin, listeners, echo))
		return path
	}
	before := config("before.yaml", fmt.Sprintf(`  - {name: web, address: %q, routes: [{pool: echo}]}
  - {name: raw, address: %q, type: tcp, proxy_protocol: true, routes: [{pool: echo}]}
`, kept, gone)+tlsListener)
	after := config("after.yaml", fmt.Sprintf(`  - {name: web, address: %q, routes: [{pool: echo}]}
  - {name: added, address: %q, routes: [{pool: echo}]}
`, kept, added)+tlsListener)
	r := startUpgradableWith(t, admin, nil, "--config", before, "--datapath", "copy", "--log-format", "json", "--drain-timeout", "5s")
	old, _, err := wss.Dial("wss://"+secure+"/", nil)
	if err != nil {
		t.Fatalf("wss before the upgrade: %v", err)
	}
	t.Cleanup(func() { old.Close() })

	code, out := r.upgrade(t, "--", "--config", after, "--datapath", "copy", "--log-format", "json", "--drain-timeout", "5s")
	if code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	echoThrough(t, old, "TLS, through the old process")
	closeWS(t, old)
	r.waitExit(t, 5*time.Second)

	adopted := map[string]string{}
	for _, l := range r.logs.lines("listener adopted from the running relay") {
		adopted[l["listener"].(string)] = l["address"].(string)
	}
	if len(adopted) != 3 || adopted["web"] != kept || adopted["secure"] != secure || adopted["admin"] != admin {
		t.Errorf("adopted %v, want web at %s, secure at %s and the admin", adopted, kept, secure)
	}
	if closed := r.logs.lines("listener not in the configuration: closed here; the old process closes its own"); len(closed) != 1 || closed[0]["listener"] != "raw" {
		t.Errorf("closed %v, want the raw listener", closed)
	}
	echoThrough(t, dialWS(t, kept), "through the adopted listener")
	echoThrough(t, dialWS(t, added), "through the new one")
	ws, _, err := wss.Dial("wss://"+secure+"/", nil)
	if err != nil {
		t.Fatalf("wss through the adopted TLS listener: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	echoThrough(t, ws, "TLS, through the new process")
	if c, err := net.DialTimeout("tcp", gone, time.Second); err == nil {
		c.Close()
		t.Errorf("%s, gone from the configuration, still accepts", gone)
	}
}

// TestUpgradeUsage: what `sockrelay upgrade` refuses before it asks anything of a relay.
func TestUpgradeUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--binary", "sockrelay"}, `--binary: "sockrelay" is not an absolute path`},
		{[]string{"--timeout", "0s"}, "--timeout: 0s is not a positive duration"},
		{[]string{"--timeout", "10"}, `--timeout: "10" is not a duration; use a unit, e.g. 10s`},
		{[]string{"--config", "x.yaml", "run"}, `unexpected argument "run"; the new process's run flags go after --`},
		{[]string{"--nope"}, "--nope: unknown flag"},
	} {
		var stdout, stderr bytes.Buffer
		if code := dispatch(context.Background(), append([]string{"upgrade"}, tc.args...), &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("upgrade %q: exit %d, %q; want 2 and %q", tc.args, code, stderr.String(), tc.want)
		}
	}
}

// TestUpgradeRefusedWhileStopping: a relay told to stop, draining a tunnel, starts no successor.
func TestUpgradeRefusedWhileStopping(t *testing.T) {
	r := startUpgradable(t, newEchoUpstream(t), 5*time.Second)
	ws := dialWS(t, r.listen)
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the drain", func() bool { return len(r.logs.lines("shutting down: no new clients; draining tunnels")) == 1 })
	code, out := r.upgrade(t)
	if code != 1 || !strings.Contains(out, "409 Conflict: upgrade refused: the relay is stopping") {
		t.Errorf("upgrade while stopping: exit %d, %q; want 1 and the refusal", code, out)
	}
	closeWS(t, ws)
	r.waitExit(t, 5*time.Second)
}

// TestUpgradeBinaryRefused: the admin API starts only the relay's own executable, or the path fixed at its
// start (--upgrade-binary), and only with `sockrelay run` flags: another binary (a root-owned program such as
// /bin/sh would otherwise run with the relay's capabilities), other arguments, and a fixed path that someone
// else could have written are refused as bad requests, before anything starts.
func TestUpgradeBinaryRefused(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	file := func(name string, mode os.FileMode, uid int) string {
		path := filepath.Join(dir, name)
		writeFile(t, path, "#!/bin/sh\n")
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(path, uid, -1); err != nil {
			t.Fatal(err)
		}
		return path
	}
	other := file("other", 0o755, 0)
	writeFile(t, filepath.Join(dir, "sockrelay.yaml"), "listeners:\n  - address: 127.0.0.1:0\n    routes:\n      - pool: p\npools:\n  p:\n    servers: [127.0.0.1:9]\nadmin:\n  address: \"\"\n  upgrade_binary: /bin/sh\n")
	for _, tc := range []struct {
		name  string
		fixed string // --upgrade-binary
		req   relay.UpgradeRequest
		want  string
	}{
		{"another binary", "", relay.UpgradeRequest{Binary: "/bin/sh"},
			"binary /bin/sh: accepted only " + self + ", this relay's own executable"},
		{"another binary than the fixed one", other, relay.UpgradeRequest{Binary: self},
			"binary " + self + ": accepted only " + other + ", the relay's --upgrade-binary"},
		{"arguments that are not run flags", "", relay.UpgradeRequest{Args: []string{"-oProxyCommand=sh -c id", "host"}},
			"args: --oProxyCommand: unknown flag"},
		{"run flags that fix another binary", "", relay.UpgradeRequest{Args: []string{"--listen", ":8080", "--upstream", "127.0.0.1:9",
			"--upgrade-binary", "/bin/sh"}}, "args: --upgrade-binary /bin/sh: accepted only " + self},
		{"a file that fixes another binary", "", relay.UpgradeRequest{Args: []string{"--config", filepath.Join(dir, "sockrelay.yaml")}},
			"args: --upgrade-binary /bin/sh: accepted only " + self},
		{"group-writable", file("gw", 0o775, 0), relay.UpgradeRequest{}, "writable by group or others"},
		{"someone else's", file("nobody", 0o755, 65534), relay.UpgradeRequest{}, "owned by uid 65534"},
		{"a directory", dir, relay.UpgradeRequest{}, "not a regular file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := newUpgrader(slog.New(slog.DiscardHandler), nil, time.Second)
			u.fixedBinary = tc.fixed
			_, _, _, err := u.resolve(tc.req)
			if !errors.Is(err, relay.ErrUpgradeBadRequest) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("resolve(%+v) = %v, want a bad request saying %q", tc.req, err, tc.want)
			}
		})
	}
}

// TestUpgradeStartsTheCheckedBinary: the binary started is the file opened and checked, even when its path
// names another one by the time the new process is executed; the new process gets the handover end as
// descriptor 3 and the binary's as descriptor 4, which the environment names.
func TestUpgradeStartsTheCheckedBinary(t *testing.T) {
	dir := t.TempDir()
	path, out := filepath.Join(dir, "sockrelay"), filepath.Join(dir, "out")
	install := func(body string) {
		tmp := path + ".new"
		writeFile(t, tmp, "#!/bin/sh\n"+body+"\n")
		if err := os.Chmod(tmp, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	install(`echo "checked $0 $1 $2 $` + handoverFDEnv + ` $` + upgradeExeFDEnv + `" > ` + out)
	exe, err := openUpgradeBinary(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exe.Close() })
	install(`echo swapped > ` + out)
	theirs, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { theirs.Close() })
	cmd := startCommand(exe, theirs, []string{"--flag"})
	if output, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, output)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if want := "checked /proc/self/fd/4 run --flag 3 4\n"; string(got) != want {
		t.Errorf("the new process wrote %q, want %q (from the checked file, not the one put at its path after)", got, want)
	}
}

// TestUpgradeDoesNotReapTheNewProcess: once handed over, the old process no longer waits for the new one,
// its child: if the new process dies while the old one drains, it stays a zombie, its exit status left for
// the process it is reparented to once the old one exits (systemd, which watches it as the unit's main
// process), instead of being taken by the old one, which would hide the crash from systemd.
func TestUpgradeDoesNotReapTheNewProcess(t *testing.T) {
	r := startUpgradable(t, newEchoUpstream(t), 30*time.Second)
	ws := dialWS(t, r.listen) // the old process drains it
	code, out := r.upgrade(t)
	if code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	pid := newPID(t, out)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new process to die", func() bool { return processGone(pid) })
	time.Sleep(200 * time.Millisecond) // an old process that reaps would have by now
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	_, after, _ := strings.Cut(string(stat), ") ")
	if want := fmt.Sprintf("Z %d ", r.cmd.Process.Pid); err != nil || !strings.HasPrefix(after, want) {
		t.Errorf("the killed new process: stat %q (%v), want a zombie of the old process (%q): reaped by it", after, err, want)
	}
	closeWS(t, ws)
	r.waitExit(t, 10*time.Second)
}

// TestUpgradeDroppedAdminSocketIsRemoved: a new process whose flags have no admin (or another one) closes
// the admin socket it was offered and removes its file once it serves: the old process, which lets go of
// the socket without removing the file (a new process that keeps the admin serves on it), leaves nothing
// behind either.
func TestUpgradeDroppedAdminSocketIsRemoved(t *testing.T) {
	upstream := newEchoUpstream(t)
	r := startUpgradable(t, upstream, 5*time.Second)
	path := strings.TrimPrefix(r.admin, "unix:")
	code, out := r.upgrade(t, "--", "--listen", "127.0.0.1:0", "--upstream", upstream, "--datapath", "copy", "--log-format", "json")
	if code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	r.waitExit(t, 5*time.Second)
	echoThrough(t, dialWS(t, r.listen), "to the new process")
	waitFor(t, "the admin socket's file to go", func() bool {
		_, err := os.Lstat(path)
		return errors.Is(err, os.ErrNotExist)
	})
}

// TestInheritedListenerMatchesTheBoundAddress: a listener is adopted when the new configuration spells its
// address differently but names the same socket (localhost for 127.0.0.1, :PORT for 0.0.0.0:PORT), rather
// than bound again, which would fail with EADDRINUSE while the old process holds it.
func TestInheritedListenerMatchesTheBoundAddress(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bind    string // where the old process's listener is bound
		offered string // its address as the old configuration spells it; PORT is its port
		want    string // the new configuration's
		adopted bool
	}{
		{"localhost for 127.0.0.1", "127.0.0.1:0", "127.0.0.1:PORT", "localhost:PORT", true},
		{"127.0.0.1 for localhost", "127.0.0.1:0", "localhost:PORT", "127.0.0.1:PORT", true},
		{"every address for 0.0.0.0", "0.0.0.0:0", "0.0.0.0:PORT", ":PORT", true},
		{"another address", "127.0.0.1:0", "127.0.0.1:PORT", "127.0.0.2:PORT", false},
		{"another port", "127.0.0.1:0", "127.0.0.1:PORT", "127.0.0.1:1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp4", tc.bind)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			f, err := ln.(*net.TCPListener).File()
			if err != nil {
				t.Fatal(err)
			}
			port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
			h := &inheritance{log: slog.New(slog.DiscardHandler), files: []*os.File{f}, listeners: []handover.Listener{{
				Name: "default", Address: strings.ReplaceAll(tc.offered, "PORT", port), Bound: ln.Addr().String(), Kind: handover.KindWebSocket}}}
			t.Cleanup(func() { closeAllFiles(h.files) })
			errBind := errors.New("bound anew")
			want := handover.Listener{Name: "default", Address: strings.ReplaceAll(tc.want, "PORT", port), Kind: handover.KindWebSocket}
			got, err := h.listen(want, func() (net.Listener, error) { return nil, errBind })
			if got != nil {
				got.Close()
			}
			if adopted := err == nil; adopted != tc.adopted || (!adopted && !errors.Is(err, errBind)) {
				t.Errorf("listen(%s) with %s (bound %s) offered: %v, %v; want adopted %v", want.Address,
					h.listeners[0].Address, h.listeners[0].Bound, got, err, tc.adopted)
			}
		})
	}
}

// TestUpgradeKernelTunnelsStayWhenNotAdopted: a new process whose datapath is not sockmap does not adopt
// the BPF objects, and says why in its log: the old process's kernel tunnel stays there, flowing, and the
// old process exits once it ends.
func TestUpgradeKernelTunnelsStayWhenNotAdopted(t *testing.T) {
	if err := loader.Probe().Err(); err != nil {
		if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" {
			t.Fatalf("SOCKRELAY_REQUIRE_BPF=1 but the kernel datapath cannot run: %v", err)
		}
		t.Skipf("this host cannot run sockmap: %v", err)
	}
	up := newEchoUpstream(t)
	r := startUpgradableOn(t, "sockmap", up, 20*time.Second)
	before := dialWS(t, r.listen)
	echoThrough(t, before, "before the upgrade")
	code, out := r.upgrade(t, "--", "--listen", "127.0.0.1:0", "--admin", r.admin, "--upstream", up,
		"--datapath", "copy", "--drain-timeout", "20s", "--log-format", "json")
	if code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	waitFor(t, "the new process to say why it did not adopt the BPF objects", func() bool {
		return len(r.logs.lines("upgrade: this process's datapath is not sockmap; the old process's kernel tunnels stay there and drain")) == 1
	})
	for i := range 3 {
		echoThrough(t, before, fmt.Sprintf("after the upgrade %d", i))
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case err := <-r.exited:
		t.Fatalf("the old process exited (%v) with its kernel tunnel open and 20s of drain left:\n%s", err, r.logs)
	default:
	}
	closeWS(t, before)
	r.waitExit(t, 5*time.Second)
	echoThrough(t, dialWS(t, r.listen), "to the new process")
}

// TestUpgradeTwiceKernelTunnel: two upgrades back to back on sockmap: each new process adopts the BPF
// objects its predecessor adopted or loaded, the kernel tunnel opened before moves twice and keeps
// flowing, and both earlier processes exit at once.
func TestUpgradeTwiceKernelTunnel(t *testing.T) {
	if err := loader.Probe().Err(); err != nil {
		if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" {
			t.Fatalf("SOCKRELAY_REQUIRE_BPF=1 but the kernel datapath cannot run: %v", err)
		}
		t.Skipf("this host cannot run sockmap: %v", err)
	}
	r := startUpgradableOn(t, "sockmap", newEchoUpstream(t), 20*time.Second)
	ws := dialWS(t, r.listen)
	echoThrough(t, ws, "before the upgrades")
	code, out := r.upgrade(t)
	if code != 0 {
		t.Fatalf("first upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	first := newPID(t, out)
	echoThrough(t, ws, "after the first upgrade")
	code, out = r.upgrade(t)
	if code != 0 {
		t.Fatalf("second upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	echoThrough(t, ws, "after the second upgrade")
	r.waitExit(t, 5*time.Second)
	waitFor(t, "the first new process to exit", func() bool { return processGone(first) })
	if n := len(r.logs.lines("upgrade: adopted the old process's BPF objects; its kernel tunnels can move here")); n != 2 {
		t.Errorf("%d processes adopted the BPF objects, want 2\n%s", n, r.logs)
	}
	for i := range 3 {
		echoThrough(t, ws, fmt.Sprintf("on the third process %d", i))
	}
	closeWS(t, ws)
}
