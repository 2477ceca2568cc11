package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/loader"
)

// refusedListenerConfig is a configuration whose listener "kernel" asks for sockmap under a top-level
// datapath of auto: a relay whose kernel datapath cannot load (its probe fails without capabilities)
// runs on splice and refuses that listener when it starts, not when the file is checked.
func refusedListenerConfig(t *testing.T, dir, admin, web, upstream string) string {
	t.Helper()
	path := filepath.Join(dir, "refused.yaml")
	writeFile(t, path, fmt.Sprintf(`datapath: auto
admin: %q
listeners:
  - {name: web, address: %q, routes: [{pool: echo}]}
  - {name: kernel, address: 127.0.0.1:0, datapath: sockmap, routes: [{pool: echo}]}
pools:
  echo: {servers: [%q]}
`, admin, web, upstream))
	return path
}

// withoutCapabilities is the wrapper that runs a relay without any capability, so that its kernel
// datapath's probe fails; the test is skipped, saying why, where that cannot be arranged.
func withoutCapabilities(t *testing.T) []string {
	t.Helper()
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skipf("no setpriv to drop the relay's capabilities: %v", err)
	}
	if err := loader.Probe().Err(); err != nil {
		t.Skipf("this host cannot run sockmap at all, so no listener is refused for lack of it: %v", err)
	}
	return []string{"setpriv", "--bounding-set=-all"}
}

// TestRefusedListenerFailsTheStart: a relay whose listener it refuses (sockmap asked for, the kernel
// datapath unavailable) fails its start with an error naming the listener: it says READY=1 to no one
// and exits 1, since every listener is set up before the relay says it serves.
func TestRefusedListenerFailsTheStart(t *testing.T) {
	wrapper := withoutCapabilities(t)
	dir := t.TempDir()
	socket := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: socket, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { notify.Close() })
	config := refusedListenerConfig(t, dir, "unix:"+filepath.Join(dir, "admin.sock"), "127.0.0.1:0", "127.0.0.1:9")

	f, logs := newLogFile(t)
	cmd := mainCommand(t, append(wrapper, "run", "--config", config, "--log-format", "json")...)
	cmd.Stderr = f
	cmd.Env = append(cmd.Env, "NOTIFY_SOCKET="+socket)
	err = cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("the relay ended with %v, want exit status 1:\n%s", err, logs)
	}
	stopped := logs.lines("sockrelay stopped")
	if want := `refused.yaml: listener "kernel": datapath sockmap: datapath unavailable: the relay's datapath is auto, and its kernel datapath did not load`; len(stopped) != 1 ||
		!strings.Contains(fmt.Sprint(stopped[0]["err"]), want) {
		t.Errorf("the relay's last words %v, want an error with %q:\n%s", stopped, want, logs)
	}
	_ = notify.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if msg, err := readDatagram(notify); err == nil {
		t.Errorf("the relay sent %q to NOTIFY_SOCKET; want nothing from a relay that failed its start", msg)
	}
	if n := len(logs.lines("sockrelay listening")); n != 0 {
		t.Errorf("the relay logged %d listeners as listening; want none:\n%s", n, logs)
	}
}

func readDatagram(c *net.UnixConn) (string, error) {
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	return string(buf[:n]), err
}

// TestUpgradeRefusedListenerKeepsServing: in an upgrade, a new process that refuses one of its
// listeners fails before it answers: the old process keeps its listeners and its tunnel, which flows on,
// and upgrade exits 1 naming the listener.
func TestUpgradeRefusedListenerKeepsServing(t *testing.T) {
	wrapper := withoutCapabilities(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	binary := filepath.Join(dir, "sockrelay")
	writeFile(t, binary, "#!/bin/sh\nexec "+strings.Join(wrapper, " ")+" "+self+` "$@"`+"\n")
	if err := os.Chmod(binary, 0o755); err != nil {
		t.Fatal(err)
	}
	admin, web, echo := "unix:"+filepath.Join(dir, "admin.sock"), freeAddr(t), newEchoUpstream(t)
	r := startUpgradableWith(t, admin, nil, "--listen", web, "--admin", admin, "--upstream", echo,
		"--datapath", "copy", "--drain-timeout", "5s", "--log-format", "json", "--upgrade-binary", binary)
	ws := dialWS(t, r.listen)
	echoThrough(t, ws, "before the upgrade")

	config := refusedListenerConfig(t, dir, admin, web, echo)
	code, out := r.upgrade(t, "--", "--config", config, "--log-format", "json")
	if want := `listener "kernel": datapath sockmap: datapath unavailable`; code != 1 ||
		!strings.Contains(out, "upgrade failed, this relay keeps serving") || !strings.Contains(out, want) {
		t.Errorf("upgrade: exit %d, %q; want 1 and %q", code, out, want)
	}
	echoThrough(t, ws, "the tunnel, still carried by the old process")
	echoThrough(t, dialWS(t, r.listen), "a new client, still served by the old process")
	if n := len(r.logs.lines("handed over to the new process: no new clients here; draining tunnels")); n != 0 {
		t.Errorf("the old process let go after a failed upgrade:\n%s", r.logs)
	}
	select {
	case err := <-r.exited:
		t.Fatalf("the old process exited (%v) after a failed upgrade:\n%s", err, r.logs)
	default:
	}
	closeWS(t, ws)
}
