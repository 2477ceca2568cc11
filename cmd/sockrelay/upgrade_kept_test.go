package main

import (
	"crypto/tls"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// TestUpgradeTwiceOldKeepsTLSTunnel: a process that keeps a tunnel it cannot hand over (TLS) is done
// sending tunnels once it can hand over no more, not when its drain ends: its successor, upgraded in
// turn, hands everything on and exits at once, while the first process keeps the TLS tunnel flowing
// until it ends, well within its drain time (20s).
func TestUpgradeTwiceOldKeepsTLSTunnel(t *testing.T) {
	echo, web, secure := newEchoUpstream(t), freeAddr(t), freeAddr(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "upgrade CA")
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, dir, "relay")
	admin := "unix:" + filepath.Join(dir, "admin.sock")
	config := filepath.Join(dir, "relay.yaml")
	writeFile(t, config, fmt.Sprintf(`admin: %q
listeners:
  - {name: web, address: %q, routes: [{pool: echo}]}
  - {name: secure, address: %q, tls: {certificates: [{cert: %q, key: %q}]}, routes: [{pool: echo}]}
pools:
  echo: {servers: [%q]}
`, admin, web, secure, cert, key, echo))
	r := startUpgradableWith(t, admin, nil, "--config", config, "--datapath", "copy", "--log-format", "json", "--drain-timeout", "20s")
	wss := websocket.Dialer{TLSClientConfig: &tls.Config{ServerName: "relay.test", RootCAs: ca.Pool()}, HandshakeTimeout: 5 * time.Second}
	kept, _, err := wss.Dial("wss://"+secure+"/", nil)
	if err != nil {
		t.Fatalf("wss before the upgrade: %v", err)
	}
	t.Cleanup(func() { kept.Close() })
	plain := dialWS(t, web)

	code, out := r.upgrade(t)
	if code != 0 {
		t.Fatalf("first upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	first := newPID(t, out)
	echoThrough(t, plain, "moved to the first new process")
	code, out = r.upgrade(t)
	if code != 0 {
		t.Fatalf("second upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	if !pollFor(5*time.Second, func() bool { return processGone(first) }) {
		t.Fatalf("the first new process (pid %d) had not exited 5s after it handed everything on: it waits for its "+
			"predecessor's drain of the TLS tunnel:\n%s", first, r.logs)
	}
	select {
	case err := <-r.exited:
		t.Fatalf("the first process exited (%v) with its TLS tunnel open and its drain time not over:\n%s", err, r.logs)
	default:
	}
	echoThrough(t, kept, "TLS, through the first process still")
	echoThrough(t, plain, "moved twice")
	if moved := r.logs.lines("upgrade: tunnels adopted from the old process"); len(moved) != 2 || moved[0]["tunnels"] != 1.0 || moved[1]["tunnels"] != 1.0 {
		t.Errorf("tunnels adopted: %v, want the plain one by each new process", moved)
	}
	closeWS(t, kept)
	r.waitExit(t, 5*time.Second)
	closeWS(t, plain)
}
