package main

import (
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// TestUpgradeKeepsLimits: tunnels handed over count under the new process's limits, here its listener's
// max_tunnels_per_ip: with the limit's worth of tunnels moved, the new process refuses the next handshake
// from that address (503), and takes one again once a moved tunnel has ended.
func TestUpgradeKeepsLimits(t *testing.T) {
	const limit = 3
	dir := t.TempDir()
	path, admin := filepath.Join(dir, "sockrelay.yaml"), "unix:"+filepath.Join(dir, "admin.sock")
	writeFile(t, path, fmt.Sprintf(`datapath: copy
admin: %q
listeners:
  - {name: web, address: %q, limits: {max_tunnels_per_ip: %d}, routes: [{pool: echo}]}
pools:
  echo: {servers: [%q]}
`, admin, freeAddr(t), limit, newEchoUpstream(t)))
	r := startUpgradableWith(t, admin, nil, "--config", path, "--log-format", "json", "--drain-timeout", "5s")
	var moved []*websocket.Conn
	for range limit {
		moved = append(moved, dialWS(t, r.listen))
	}
	if code, out := r.upgrade(t); code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	r.waitExit(t, 5*time.Second) // every tunnel moved
	for i, ws := range moved {
		echoThrough(t, ws, fmt.Sprintf("moved tunnel %d", i))
	}

	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	if ws, resp, err := d.Dial("ws://"+r.listen+"/", nil); err == nil {
		ws.Close()
		t.Errorf("a handshake past max_tunnels_per_ip, with %d tunnels moved: taken, want 503", limit)
	} else if resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("a handshake past max_tunnels_per_ip: %v, want 503", err)
	}
	closeWS(t, moved[0])
	waitFor(t, "the new process to take a handshake again", func() bool {
		ws, _, err := d.Dial("ws://"+r.listen+"/", nil)
		if err == nil {
			ws.Close()
		}
		return err == nil
	})
}
