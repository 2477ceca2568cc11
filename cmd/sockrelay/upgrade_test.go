package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
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

	"github.com/sockrelay/sockrelay/loader"
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

// logsBuffer is the logs so far, for helpers that print a *syncBuffer.
func (r *upgradable) logsBuffer() *syncBuffer {
	b := &syncBuffer{}
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
	var n atomic.Int64
	var mu sync.Mutex
	var errs []error
	done, wg := make(chan struct{}), sync.WaitGroup{}
	for range 2 {
		wg.Go(func() {
			d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
			for {
				select {
				case <-done:
					return
				default:
				}
				n.Add(1)
				ws, _, err := d.Dial("ws://"+addr+"/", nil)
				if err == nil {
					_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
					_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
					if err = ws.WriteMessage(websocket.TextMessage, []byte("x")); err == nil {
						_, _, err = ws.ReadMessage()
					}
					ws.Close()
				}
				if err != nil {
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
// WebSockets back to back: none is refused or fails. A tunnel open before the upgrade keeps flowing: on
// copy the new process carries it on and the old one exits 0 at once; on sockmap it stays with the old
// process, which exits 0 once that tunnel ends. The new process serves on. On copy, and
// on sockmap where the host runs it (each process with a kernel datapath of its own, the new one's
// self-test included in the handover time).
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

	// The tunnel from before moves to the new process on copy, and the old one exits at once; on sockmap
	// it stays with the old process, which waits for it.
	for i := range 3 {
		echoThrough(t, before, fmt.Sprintf("after the upgrade %d", i))
		time.Sleep(50 * time.Millisecond)
	}
	if datapath == "copy" {
		r.waitExit(t, 5*time.Second)
		closeWS(t, before)
	} else {
		select {
		case err := <-r.exited:
			t.Fatalf("the old process exited (%v) with a tunnel open and 20s of drain left:\n%s", err, r.logs)
		default:
		}
		closeWS(t, before)
		r.waitExit(t, 5*time.Second)
	}
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
// goes through.
func TestUpgradeFailureKeepsServing(t *testing.T) {
	r := startUpgradable(t, newEchoUpstream(t), 5*time.Second)
	dir := t.TempDir()
	script := func(name, body string) string {
		path := filepath.Join(dir, name)
		writeFile(t, path, "#!/bin/sh\n"+body+"\n")
		if err := os.Chmod(path, 0o755); err != nil {
			t.Fatal(err)
		}
		return path
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
		args []string
		want string
	}
	var kernel []failure
	if _, err := exec.LookPath("setpriv"); err == nil && loader.Probe().Err() == nil {
		// The kernel datapath's probe, run without the capabilities it needs (as an unprivileged user would):
		// the new process's start fails as a failed self-test makes it fail.
		kernel = append(kernel, failure{"fails its datapath probe", []string{"--binary", script("nocaps", "exec setpriv --bounding-set=-all "+self+` "$@"`),
			"--", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--admin", r.admin, "--datapath", "sockmap", "--log-format", "json"},
			"could not start: --datapath sockmap: datapath unavailable: sockmap: kernel "})
	}
	for _, tc := range append([]failure{
		{"exits at once", []string{"--binary", script("exits", "exit 3")},
			"ended before it"}, // took the listeners, or served: whichever it was at when the old process noticed
		{"cannot start", []string{"--binary", self, "--", "--listen", taken.Addr().String(), "--upstream", "127.0.0.1:9",
			"--admin", r.admin, "--datapath", "copy", "--log-format", "json"},
			"could not start: --listen: listen tcp " + taken.Addr().String() + ": bind: address already in use (exit status 1)"},
		{"never confirms", []string{"--binary", script("hangs", "exec sleep 30"), "--timeout", "500ms"},
			"did not confirm that it serves within 500ms; killed it"},
	}, kernel...) {
		t.Run(tc.name, func(t *testing.T) {
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
