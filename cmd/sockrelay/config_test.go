package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/internal/wsecho"
)

// countingEcho is the echo upstream that counts the WebSockets it accepted, so a test can tell which
// server a route led to.
type countingEcho struct {
	*httptest.Server
	n atomic.Int64
}

func startCountingEcho(t *testing.T) *countingEcho {
	t.Helper()
	e := &countingEcho{}
	h := wsecho.Handler(slog.New(slog.DiscardHandler))
	e.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.n.Add(1)
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(e.Close)
	return e
}

func (e *countingEcho) addr() string { return e.Listener.Addr().String() }

// freeAddr returns a loopback address free a moment ago, for a configuration file that must name one.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// dialPath opens a WebSocket to url; the error says the HTTP status when there was one.
func dialPath(t *testing.T, url string) (*websocket.Conn, error) {
	ws, resp, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil && resp != nil {
		err = fmt.Errorf("%w (HTTP %d)", err, resp.StatusCode)
	}
	if ws != nil {
		t.Cleanup(func() { ws.Close() })
	}
	return ws, err
}

// TestCheckCommand: `sockrelay check` says ok for the example file and reports every problem of a broken
// one with its file and line.
func TestCheckCommand(t *testing.T) {
	dir := t.TempDir()
	broken := filepath.Join(dir, "broken.yaml")
	writeFile(t, broken, "listeners:\n  - address: 127.0.0.1:8080\n    routes: [{pool: chat}]\npools:\n  echo:\n    servers: [127.0.0.1:0]\n")
	for _, tc := range []struct {
		name         string
		args         []string
		code         int
		stdout, errs []string
	}{
		{"example", []string{"--config", "../../config/example.yaml"}, 0, []string{"config/example.yaml: ok: 1 listeners, 1 pools"}, nil},
		{"broken", []string{"--config", broken}, 1, nil, []string{
			broken + `:3: listeners[0].routes[0].pool: "chat" is not a pool; accepted: echo`,
			broken + ":6: pools.echo.servers[0]",
		}},
		{"missing file", []string{"--config", filepath.Join(dir, "none.yaml")}, 1, nil, []string{"none.yaml", "no such file"}},
		{"no file given", nil, 2, nil, []string{"sockrelay check --config FILE"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := dispatch(context.Background(), append([]string{"check"}, tc.args...), &stdout, &stderr); code != tc.code {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			for _, w := range tc.stdout {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout.String())
				}
			}
			for _, w := range tc.errs {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
		})
	}
}

// TestRunConfigRejected: a broken file, or a flag that would contradict the file, stops `run` before it
// binds anything, with exit 2 and the reason.
func TestRunConfigRejected(t *testing.T) {
	dir := t.TempDir()
	broken := filepath.Join(dir, "broken.yaml")
	writeFile(t, broken, "listeners:\n  - address: 127.0.0.1:8080\n    routes: [{pool: echo}]\npools:\n  echo:\n    servers: [{address: 127.0.0.1:9000, wieght: 2}]\n")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--config", broken}, broken + ":6: pools.echo.servers[0].wieght: unknown key; accepted:"},
		{[]string{"--config", "../../config/example.yaml", "--upstream", "127.0.0.1:9000"}, "--upstream cannot be combined with --config"},
		{[]string{"--config", "../../config/example.yaml", "--listen", "127.0.0.1:0"}, "--listen cannot be combined with --config"},
	} {
		var stderr bytes.Buffer
		if code := runCommand(context.Background(), tc.args, &stderr, failReady(t)); code != 2 {
			t.Errorf("%v: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: stderr lacks %q:\n%s", tc.args, tc.want, stderr.String())
		}
	}
}

// configRelay is a relay run from a configuration file the test can rewrite and reload.
type configRelay struct {
	*relayRun
	path      string
	tokenFile string // the admin token's, which changes through the admin need
}

// testAdminToken is the admin token of the relays of startConfigRelay.
const testAdminToken = "test-admin-token-0123456789"

// startConfigRelay writes text to a file and runs `sockrelay run --config FILE --admin-token-file TOKEN
// extra...`.
func startConfigRelay(t *testing.T, text string, extra ...string) *configRelay {
	t.Helper()
	dir := t.TempDir()
	path, tokenFile := filepath.Join(dir, "sockrelay.yaml"), filepath.Join(dir, "admin.token")
	writeFile(t, path, text)
	writeFile(t, tokenFile, testAdminToken+"\n")
	r := startRelay(t, append([]string{"--config", path, "--admin-token-file", tokenFile, "--log-format", "json"}, extra...)...)
	return &configRelay{relayRun: r, path: path, tokenFile: tokenFile}
}

// reloadVia rewrites the file and reloads it the way how says: "sighup", "api" (POST /admin/reload) or
// "command" (`sockrelay reload`). It returns whether the relay took it.
func (r *configRelay) reloadVia(t *testing.T, how, text string) bool {
	t.Helper()
	writeFile(t, r.path, text)
	switch how {
	case "sighup":
		count := func() (ok, refused int) {
			return len(r.logLines(t, "configuration reloaded")),
				len(r.logLines(t, "configuration reload refused; the configuration in force is unchanged"))
		}
		ok0, refused0 := count()
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if ok, refused := count(); ok+refused > ok0+refused0 {
				return ok > ok0
			}
		}
		t.Fatal("no reload logged 10 s after SIGHUP")
	case "api":
		req, _ := http.NewRequest(http.MethodPost, "http://"+r.admin+"/admin/reload", nil)
		req.Header.Set("Authorization", "Bearer "+testAdminToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	case "command":
		var stdout, stderr bytes.Buffer
		return dispatch(context.Background(), []string{"reload", "--admin", r.admin, "--admin-token-file", r.tokenFile}, &stdout, &stderr) == 0
	}
	t.Fatalf("unknown reload %q", how)
	return false
}

// routesConfig is a file with two routes, /a to pool a and everything else to pool b, with pool b's
// servers given.
func routesConfig(listen, admin, a string, b []string, closeOnRemoval bool) string {
	servers := make([]string, len(b))
	for i, s := range b {
		servers[i] = "{address: " + s + "}"
	}
	return fmt.Sprintf(`admin: %s
listeners:
  - name: public
    address: %s
    routes:
      - {path_prefix: /a, pool: a}
      - {pool: b}
pools:
  a:
    servers: [%s]
  b:
    balance: least_tunnels
    close_tunnels_on_removal: %v
    servers: [%s]
`, admin, listen, a, closeOnRemoval, strings.Join(servers, ", "))
}

// TestRunConfigRoutes: a file's routes send each path to its pool; a flag overrides the file.
func TestRunConfigRoutes(t *testing.T) {
	a, b := startCountingEcho(t), startCountingEcho(t)
	r := startConfigRelay(t, routesConfig(freeAddr(t), freeAddr(t), a.addr(), []string{b.addr()}, false), "--datapath", "copy")
	for _, path := range []string{"/a", "/a/x", "/b", "/"} {
		ws, err := dialPath(t, "ws://"+r.listen+path)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		echoThrough(t, ws, "hi "+path)
	}
	if a.n.Load() != 2 || b.n.Load() != 2 {
		t.Errorf("pool a got %d, pool b %d WebSockets; want 2 and 2", a.n.Load(), b.n.Load())
	}
	if dp := r.datapath(t); dp != "copy" {
		t.Errorf("datapath %s; --datapath copy must override the file's auto", dp)
	}
}

// TestReloadUnderLoad: 1000 tunnels (200 on splice and copy) stay open, and new clients keep arriving, while the configuration is
// reloaded ten times (SIGHUP, the admin API and `sockrelay reload` in turn), every other time moving pool
// b between servers; an invalid file in the middle is refused and changes nothing. No tunnel is dropped,
// no new client fails, and new clients follow the configuration in force.
func TestReloadUnderLoad(t *testing.T) {
	// auto is sockmap where the kernel runs it (CI), so every datapath keeps its tunnels through reloads.
	for _, tc := range []struct {
		datapath string
		open     int
	}{{"auto", 1000}, {"splice", 200}, {"copy", 200}} {
		t.Run(tc.datapath, func(t *testing.T) { reloadUnderLoad(t, tc.datapath, tc.open) })
	}
}

func reloadUnderLoad(t *testing.T, datapath string, open int) {
	a, b1, b2 := startCountingEcho(t), startCountingEcho(t), startCountingEcho(t)
	listen, admin := freeAddr(t), freeAddr(t)
	configs := []string{
		routesConfig(listen, admin, a.addr(), []string{b1.addr()}, false),
		routesConfig(listen, admin, a.addr(), []string{b1.addr(), b2.addr()}, false),
	}
	r := startConfigRelay(t, configs[0], "--datapath", datapath)
	tunnels := make([]*websocket.Conn, open)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	var dialErr atomic.Value
	for i := range tunnels {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			ws, err := dialPath(t, "ws://"+listen+"/b")
			if err != nil {
				dialErr.Store(err)
				return
			}
			tunnels[i] = ws
		}()
	}
	wg.Wait()
	if err := dialErr.Load(); err != nil {
		t.Fatalf("opening %d tunnels: %v", open, err)
	}

	// New clients arrive all along; each must get its tunnel and its echo.
	stop := make(chan struct{})
	var newOK, newFailed atomic.Int64
	var firstFailure atomic.Value
	var clients sync.WaitGroup
	for range 4 {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ws, _, err := websocket.DefaultDialer.Dial("ws://"+listen+"/b", nil)
				if err == nil {
					ws.NetConn().SetDeadline(time.Now().Add(10 * time.Second))
					if err = ws.WriteMessage(websocket.TextMessage, []byte("new")); err == nil {
						_, _, err = ws.ReadMessage()
					}
					ws.Close()
				}
				if err != nil {
					newFailed.Add(1)
					firstFailure.CompareAndSwap(nil, err)
				} else {
					newOK.Add(1)
				}
			}
		}()
	}

	ways := []string{"sighup", "api", "command"}
	for i := range 10 {
		how := ways[i%len(ways)]
		if i == 5 {
			if r.reloadVia(t, how, "listeners: [\n") {
				t.Errorf("reload %d (%s): an invalid file was taken", i, how)
			}
			continue
		}
		if !r.reloadVia(t, how, configs[(i+1)%2]) {
			t.Fatalf("reload %d (%s) refused:\n%s", i, how, r.logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	clients.Wait()
	if n := newFailed.Load(); n > 0 {
		t.Errorf("%d of %d new clients failed during the reloads; first: %v", n, n+newOK.Load(), firstFailure.Load())
	}
	if newOK.Load() == 0 {
		t.Error("no new client got through during the reloads")
	}
	for i, ws := range tunnels {
		echoThrough(t, ws, fmt.Sprintf("still here %d", i))
	}
	// The last reload (9) left configs[0] in force: b2 is out of pool b, so new tunnels reach only b1.
	before := b2.n.Load()
	for range 5 {
		ws, err := dialPath(t, "ws://"+listen+"/b")
		if err != nil {
			t.Fatal(err)
		}
		echoThrough(t, ws, "after")
	}
	if b2.n.Load() != before {
		t.Errorf("a server removed by the last reload got %d new tunnels", b2.n.Load()-before)
	}
	// Back in: least_tunnels sends every new tunnel to b2, as b1 holds the 1000.
	if !r.reloadVia(t, "api", configs[1]) {
		t.Fatalf("last reload refused:\n%s", r.logs)
	}
	before, before1 := b2.n.Load(), b1.n.Load()
	for range 5 {
		ws, err := dialPath(t, "ws://"+listen+"/b")
		if err != nil {
			t.Fatal(err)
		}
		echoThrough(t, ws, "least")
	}
	if b2.n.Load()-before != 5 || b1.n.Load() != before1 {
		t.Errorf("after adding b2 back, b2 got %d and b1 %d of 5 new tunnels; want all on b2 (fewest tunnels)",
			b2.n.Load()-before, b1.n.Load()-before1)
	}
	if refused := r.logLines(t, "configuration reload refused; the configuration in force is unchanged"); len(refused) != 1 {
		t.Errorf("%d refused reloads logged, want 1", len(refused))
	}
}

// TestReloadClosesRemovedServersTunnels: with close_tunnels_on_removal a reload that removes a server
// closes its tunnels; without it they run on.
func TestReloadClosesRemovedServersTunnels(t *testing.T) {
	for _, closeOnRemoval := range []bool{true, false} {
		t.Run(fmt.Sprint("close_tunnels_on_removal=", closeOnRemoval), func(t *testing.T) {
			a, b1, b2 := startCountingEcho(t), startCountingEcho(t), startCountingEcho(t)
			listen, admin := freeAddr(t), freeAddr(t)
			r := startConfigRelay(t, routesConfig(listen, admin, a.addr(), []string{b1.addr()}, closeOnRemoval))
			ws, err := dialPath(t, "ws://"+listen+"/b")
			if err != nil {
				t.Fatal(err)
			}
			echoThrough(t, ws, "before")
			if !r.reloadVia(t, "api", routesConfig(listen, admin, a.addr(), []string{b2.addr()}, closeOnRemoval)) {
				t.Fatalf("reload refused:\n%s", r.logs)
			}
			ws.NetConn().SetDeadline(time.Now().Add(5 * time.Second))
			err = ws.WriteMessage(websocket.TextMessage, []byte("after"))
			if err == nil {
				_, _, err = ws.ReadMessage()
			}
			if closeOnRemoval && err == nil {
				t.Error("the tunnel of a removed server still echoes; close_tunnels_on_removal should have closed it")
			}
			if !closeOnRemoval && err != nil {
				t.Errorf("the tunnel of a removed server was dropped: %v", err)
			}
		})
	}
}
