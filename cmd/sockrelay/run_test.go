package main

import (
	"bufio"
	"bytes"
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
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"github.com/sockrelay/sockrelay/internal/wsecho"
	"github.com/sockrelay/sockrelay/loader"
	"github.com/sockrelay/sockrelay/relay"
)

// TestRunRejectsBadAddresses: a malformed --listen, --admin or --upstream is a usage error (exit 2) found
// before anything starts, naming the flag, the value and what is accepted.
func TestRunRejectsBadAddresses(t *testing.T) {
	up := []string{"--upstream", "127.0.0.1:9000"}
	for _, tc := range []struct {
		name string
		args []string
		want []string // substrings of stderr
	}{
		{"listen without port", append([]string{"--listen", "localhost"}, up...),
			[]string{"--listen", `"localhost"`, "missing port", "HOST:PORT", "e.g. 127.0.0.1:8080"}},
		{"listen port out of range", append([]string{"--listen", "127.0.0.1:99999"}, up...),
			[]string{"--listen", `"127.0.0.1:99999"`, "invalid port", "HOST:PORT"}},
		{"listen IPv6 without brackets", append([]string{"--listen", "::1"}, up...),
			[]string{"--listen", `"::1"`, "HOST:PORT"}},
		{"admin without port", append([]string{"--listen", "127.0.0.1:0", "--admin", "metrics"}, up...),
			[]string{"--admin", `"metrics"`, "missing port", "HOST:PORT", "e.g. 127.0.0.1:9180"}},
		{"admin port not a number", append([]string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:nope"}, up...),
			[]string{"--admin", `"127.0.0.1:nope"`, "HOST:PORT"}},
		{"upstream port too big", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:65536"},
			[]string{"--upstream", `"127.0.0.1:65536"`, "1 to 65535"}},
		{"upstream port is a name", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:http"},
			[]string{"--upstream", `"127.0.0.1:http"`, "1 to 65535"}},
		{"upstream IPv6 without brackets", []string{"--listen", "127.0.0.1:0", "--upstream", "::1:9000"},
			[]string{"--upstream", "not HOST:PORT", "[::1]:9000"}},
		{"second upstream bad", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000", "--upstream", "b"},
			[]string{"--upstream", `upstream "b"`, "HOST:PORT"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := runCommand(context.Background(), tc.args, &stderr, failReady(t)); code != 2 {
				t.Errorf("exit code %d, want 2; stderr:\n%s", code, stderr.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
			if strings.Contains(stderr.String(), "datapath chosen") {
				t.Errorf("a usage error set up a datapath before it was reported:\n%s", stderr.String())
			}
		})
	}
}

// failReady is a ready callback for runs that must never serve.
func failReady(t *testing.T) readyFunc {
	return func(listen, _ net.Addr) { t.Errorf("sockrelay served on %s; it should have refused its flags", listen) }
}

// TestRunHelp: `sockrelay run -h` exits 0 and lists every flag.
func TestRunHelp(t *testing.T) {
	for _, arg := range []string{"-h", "--help"} {
		t.Run(arg, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := runCommand(context.Background(), []string{arg}, &stderr, failReady(t)); code != 0 {
				t.Errorf("exit code %d, want 0", code)
			}
			for _, f := range []string{"-listen ADDR", "-upstream HOST:PORT", "-datapath", "auto, sockmap, splice or copy",
				"-admin ADDR", "-drain-timeout", "-client-header-timeout", "-connect-timeout", "-upstream-timeout", "-http-idle-timeout",
				"-max-header-bytes", "-log-level", "-log-format"} {
				if !strings.Contains(stderr.String(), f) {
					t.Errorf("help lacks %q:\n%s", f, stderr.String())
				}
			}
		})
	}
}

// TestRunSockmapRefusedSaysWhy: --datapath sockmap on a host that cannot run it is a runtime failure
// (exit 1: the flag is valid, the host is not) that says which check failed and what to do. On a host that
// can run it, the relay is run as a child with an empty capability bounding set, as an unprivileged
// user would run it.
func TestRunSockmapRefusedSaysWhy(t *testing.T) {
	args := []string{"run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000", "--datapath", "sockmap"}
	want := []string{"sockrelay stopped", "--datapath sockmap: datapath unavailable: sockmap: kernel "}
	var code int
	var stderr string
	if err := loader.Probe().Err(); err != nil {
		var buf bytes.Buffer
		code = dispatch(context.Background(), args, io.Discard, &buf)
		stderr = buf.String()
	} else {
		if _, err := exec.LookPath("setpriv"); err != nil {
			t.Skip("this host can run sockmap, and setpriv (util-linux), needed to run the relay without capabilities, is missing")
		}
		cmd := mainCommand(t, append([]string{"setpriv", "--bounding-set=-all"}, args...)...)
		var buf syncbuf.Buffer
		cmd.Stderr = &buf
		err := cmd.Run()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("run the relay without capabilities: %v", err)
		}
		code, stderr = cmd.ProcessState.ExitCode(), buf.String()
		want = append(want, "capabilities: missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON",
			"run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")
	}
	if code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	for _, w := range want {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr lacks %q:\n%s", w, stderr)
		}
	}
	if strings.Contains(stderr, "sockrelay listening") {
		t.Errorf("the relay listened although its datapath was refused:\n%s", stderr)
	}
}

// TestRunDrain runs the daemon on every datapath with one tunnel open, checks the admin endpoints describe
// it, then cancels the context (what SIGINT/SIGTERM do) and checks the drain: either the tunnel leaves by
// itself while the relay waits for it, or the drain time runs out and the relay closes it.
func TestRunDrain(t *testing.T) {
	upstream := newEchoUpstream(t)
	for _, dp := range []string{"copy", "splice", "auto", "sockmap"} {
		for _, tc := range []struct {
			name  string
			drain string
			// leaves: the client closes its tunnel during the drain; otherwise it keeps it open.
			leaves bool
		}{
			{"tunnel leaves during drain", "60s", true},
			{"drain time runs out", "300ms", false},
		} {
			t.Run(dp+"/"+tc.name, func(t *testing.T) {
				r := startRelay(t, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", upstream,
					"--datapath", dp, "--drain-timeout", tc.drain, "--log-format", "json")
				want := r.datapath(t)
				if dp == "auto" && want != autoChoice() {
					t.Errorf("auto chose %q, want %q", want, autoChoice())
				} else if dp != "auto" && want != dp {
					t.Errorf("datapath chosen %q, want %q", want, dp)
				}
				if dp == "auto" {
					want = autoTunnels()
				}

				opened := time.Now()
				ws := dialWS(t, r.listen)
				echoThrough(t, ws, "hello")
				// A client frame of 5 bytes is 11 on the wire (2 header, 4 mask); the echo back is 7.
				info := r.waitForTunnel(t, 11, 7)
				for _, c := range []struct{ field, got, want string }{
					{"client", info.Client, ws.LocalAddr().String()},
					{"upstream", info.Upstream, upstream},
					{"datapath", info.Datapath, want},
				} {
					if c.got != c.want {
						t.Errorf("/debug/tunnels %s = %q, want %q", c.field, c.got, c.want)
					}
				}
				if info.ID == 0 || info.Started.Before(opened.Add(-time.Second)) || info.Started.After(time.Now()) {
					t.Errorf("/debug/tunnels id %d started %v; want a non-zero id and a start after %v", info.ID, info.Started, opened)
				}
				metrics := r.get(t, "/metrics", 200)
				for _, m := range []string{
					fmt.Sprintf(`sockrelay_tunnels_total{datapath=%q,listener="default",pool="default"} 1`, want),
					`sockrelay_build_info{commit="",goversion="` + runtime.Version() + `",version="dev"} 1`,
					fmt.Sprintf(`sockrelay_tunnels_active{datapath=%q} 1`, want),
					`sockrelay_bytes_relayed_total{direction="client_to_upstream"} 11`,
					`sockrelay_bytes_relayed_total{direction="upstream_to_client"} 7`,
				} {
					if !strings.Contains(metrics, m) {
						t.Errorf("/metrics lacks %s", m)
					}
				}
				if body := r.get(t, "/healthz", 200); body != "ok\n" {
					t.Errorf("/healthz said %q, want ok", body)
				}

				r.stop()
				if tc.leaves {
					// While draining: the balancer is told, new clients are turned away, the tunnel still works.
					waitFor(t, "/healthz to answer 503 while draining", func() bool { return r.status(t, "/healthz") == 503 })
					waitFor(t, "the relay to stop accepting clients", func() bool {
						c, err := net.DialTimeout("tcp", r.listen, time.Second)
						if err == nil {
							c.Close()
						}
						return err != nil
					})
					echoThrough(t, ws, "still here")
					closeWS(t, ws)
				}
				code, ok := r.wait(10 * time.Second)
				if !ok {
					t.Fatalf("sockrelay did not exit within 10s of the cancel (drain %s, tunnel leaves: %v):\n%s", tc.drain, tc.leaves, r.logs)
				}
				if code != 0 {
					t.Errorf("exit code %d after the cancel, want 0", code)
				}

				// Read at once, not waited for: the tunnel's end must be logged before the drain can finish,
				// or a real process exits without the line (relay.Server.tunnelEnded removes it last).
				ends := r.logLines(t, "tunnel closed")
				if len(ends) != 1 {
					t.Fatalf("%d tunnel-end log lines, want 1:\n%s", len(ends), r.logs)
				}
				end := ends[0]
				for _, k := range []string{"id", "client", "upstream", "datapath", "bytes_to_upstream", "bytes_to_client", "duration_ms", "reason"} {
					if _, ok := end[k]; !ok {
						t.Errorf("tunnel-end log line lacks %q: %v", k, end)
					}
				}
				if end["id"] != float64(info.ID) || end["client"] != info.Client {
					t.Errorf("tunnel-end log line is not about tunnel %d from %s: %v", info.ID, info.Client, end)
				}
				overrun := r.logLines(t, "drain time over: closed the remaining tunnels")
				if tc.leaves {
					if end["reason"] != "closed" {
						t.Errorf("tunnel that left during the drain ended with reason %v, want closed", end["reason"])
					}
					if len(overrun) != 0 {
						t.Errorf("the drain timed out although the tunnel left:\n%s", r.logs)
					}
				} else {
					if end["reason"] != "shutdown" {
						t.Errorf("tunnel open at the end of the drain ended with reason %v, want shutdown", end["reason"])
					}
					if len(overrun) != 1 {
						t.Errorf("no warning that the drain time ran out:\n%s", r.logs)
					}
					// The relay, not the test's read deadline, ended the connection.
					_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
					_, _, err := ws.ReadMessage()
					var ne net.Error
					if err == nil || errors.As(err, &ne) && ne.Timeout() {
						t.Errorf("the tunnel left open was not closed by the relay: read gave %v", err)
					}
				}
				if n := len(r.logLines(t, "sockrelay stopped")); n != 1 {
					t.Errorf("%d \"sockrelay stopped\" lines, want 1:\n%s", n, r.logs)
				}
			})
		}
	}
}

// relayRun is `sockrelay run` running in a goroutine, as main runs it.
type relayRun struct {
	listen, admin string
	logs          *syncbuf.Buffer
	stop          context.CancelFunc
	done          chan struct{}
	code          int // valid once done is closed
}

// startRelay runs `sockrelay run args...` and waits until it serves. A relay asked for sockmap on a host
// that cannot run it skips the test, unless SOCKRELAY_REQUIRE_BPF=1.
func startRelay(t *testing.T, args ...string) *relayRun {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	r := &relayRun{logs: &syncbuf.Buffer{}, stop: stop, done: make(chan struct{})}
	ready := make(chan [2]net.Addr, 1)
	go func() {
		defer close(r.done)
		r.code = runCommand(ctx, args, r.logs, func(l, a net.Addr) { ready <- [2]net.Addr{l, a} })
	}()
	t.Cleanup(func() {
		stop()
		if _, ok := r.wait(10 * time.Second); !ok {
			t.Errorf("sockrelay still running 10s after the test ended:\n%s", r.logs)
		}
	})
	select {
	case a := <-ready:
		r.listen = a[0].String()
		if a[1] != nil {
			r.admin = a[1].String()
		}
	case <-r.done:
		if slices.Contains(args, "sockmap") && os.Getenv("SOCKRELAY_REQUIRE_BPF") != "1" {
			t.Skipf("the sockmap datapath cannot run here (exit %d):\n%s", r.code, r.logs)
		}
		t.Fatalf("sockrelay exited %d before serving:\n%s", r.code, r.logs)
	case <-time.After(10 * time.Second):
		t.Fatalf("sockrelay not serving after 10s:\n%s", r.logs)
	}
	return r
}

// wait waits up to d for runCommand to return, and returns its exit code.
func (r *relayRun) wait(d time.Duration) (int, bool) {
	select {
	case <-r.done:
		return r.code, true
	case <-time.After(d):
		return 0, false
	}
}

// logLines returns the JSON log lines whose msg is msg.
func (r *relayRun) logLines(t *testing.T, msg string) []map[string]any {
	t.Helper()
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(r.logs.String()))
	for sc.Scan() {
		var l map[string]any
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("log line is not JSON (%v): %s", err, sc.Text())
		}
		if l["msg"] == msg {
			lines = append(lines, l)
		}
	}
	return lines
}

// datapath is the datapath the relay logged it chose.
func (r *relayRun) datapath(t *testing.T) string {
	t.Helper()
	chosen := r.logLines(t, "datapath chosen")
	if len(chosen) != 1 {
		t.Fatalf("%d \"datapath chosen\" log lines, want 1:\n%s", len(chosen), r.logs)
	}
	dp, _ := chosen[0]["datapath"].(string)
	return dp
}

var adminClient = &http.Client{Timeout: 5 * time.Second}

// get fetches an admin path, expecting status, and returns the body.
func (r *relayRun) get(t *testing.T, path string, status int) string {
	t.Helper()
	resp, err := adminClient.Get("http://" + r.admin + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	if resp.StatusCode != status {
		t.Fatalf("GET %s answered %d, want %d: %s", path, resp.StatusCode, status, body)
	}
	return string(body)
}

// status is the status an admin path answers, 0 when the request fails.
func (r *relayRun) status(t *testing.T, path string) int {
	resp, err := adminClient.Get("http://" + r.admin + path)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// tunnelInfo is one entry of /debug/tunnels, decoded with the field names the endpoint promises.
type tunnelInfo struct {
	ID              uint64    `json:"id"`
	Client          string    `json:"client"`
	Upstream        string    `json:"upstream"`
	Datapath        string    `json:"datapath"`
	BytesToUpstream uint64    `json:"bytes_to_upstream"`
	BytesToClient   uint64    `json:"bytes_to_client"`
	Started         time.Time `json:"started"`
}

// waitForTunnel waits until /debug/tunnels lists one tunnel with the given byte counts (a datapath counts
// bytes once it has written them, which may be after the peer has read them) and returns it.
func (r *relayRun) waitForTunnel(t *testing.T, toUpstream, toClient uint64) tunnelInfo {
	t.Helper()
	var last string
	var info tunnelInfo
	ok := poll(func() bool {
		last = r.get(t, "/debug/tunnels", 200)
		var ts []tunnelInfo
		if err := json.Unmarshal([]byte(last), &ts); err != nil {
			t.Fatalf("/debug/tunnels is not a JSON list of tunnels (%v): %s", err, last)
		}
		if len(ts) != 1 {
			return false
		}
		info = ts[0]
		return info.BytesToUpstream == toUpstream && info.BytesToClient == toClient
	})
	if !ok {
		t.Fatalf("/debug/tunnels never listed one tunnel with %d bytes to upstream and %d to client: %s", toUpstream, toClient, last)
	}
	return info
}

// poll calls cond every 10ms until it is true or 5s have passed, and says whether it became true.
func poll(cond func() bool) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return false
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	if !poll(cond) {
		t.Fatalf("timed out after 5s waiting for %s", what)
	}
}

// newEchoUpstream starts the bundled WebSocket echo server (internal/wsecho) and returns its HOST:PORT.
func newEchoUpstream(t *testing.T) string {
	echo := httptest.NewServer(wsecho.Handler(slog.New(slog.DiscardHandler)))
	t.Cleanup(echo.Close)
	return echo.Listener.Addr().String()
}

// dialWS opens a WebSocket through the relay at addr.
func dialWS(t *testing.T, addr string) *websocket.Conn {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	ws, _, err := d.Dial("ws://"+addr+"/", nil)
	if err != nil {
		t.Fatalf("dial through the relay: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	return ws
}

// echoThrough sends msg and expects it back.
func echoThrough(t *testing.T, ws *websocket.Conn, msg string) {
	t.Helper()
	_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatalf("send %q through the relay: %v", msg, err)
	}
	if _, got, err := ws.ReadMessage(); err != nil || string(got) != msg {
		t.Fatalf("echo through the relay: got %q, %v; want %q", got, err, msg)
	}
}

// closeWS runs the WebSocket closing handshake and closes the connection.
func closeWS(t *testing.T, ws *websocket.Conn) {
	t.Helper()
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	if err := ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(5*time.Second)); err != nil {
		t.Fatalf("send close frame: %v", err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err := ws.ReadMessage()
	if !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
		t.Errorf("closing handshake through the relay: got %v, want the upstream's close frame", err)
	}
	ws.Close()
}

// autoChoice is what --datapath auto must choose on this host: sockmap where its probe and self-test pass,
// else splice (which runs wherever these tests do).
var autoChoice = sync.OnceValue(func() string {
	if relay.DatapathAvailable(relay.DatapathSockmap) == nil {
		return "sockmap"
	}
	return "splice"
})

// autoTunnels is the datapath --datapath auto's new tunnels start on: where it chose sockmap, its per-tunnel
// policy starts them on the event loop (copy); else its choice.
func autoTunnels() string {
	if autoChoice() == "sockmap" {
		return "copy"
	}
	return autoChoice()
}

// TestHalfClosedTimeoutSettings: the half-close timeouts default to 5s (WebSocket) and 60s (tcp), come
// from the file's timeouts.half_closed and tcp_half_closed, yield to their flags, are refused under 1s,
// and 0 reaches the relay as off, not as "take the default".
func TestHalfClosedTimeoutSettings(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sockrelay.yaml")
	writeFile(t, file, "timeouts: {half_closed: 0s, tcp_half_closed: 2m}\n"+
		"listeners: [{address: \"127.0.0.1:0\", routes: [{pool: p}]}]\npools: {p: {servers: [\"127.0.0.1:9000\"]}}\n")
	for _, tc := range []struct {
		name       string
		args       []string
		ws, tcp    time.Duration
		wantRelay  [2]time.Duration // what relay.Config gets
		wantErrSub string
	}{
		{"defaults", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000"},
			5 * time.Second, time.Minute, [2]time.Duration{5 * time.Second, time.Minute}, ""},
		{"file", []string{"--config", file}, 0, 2 * time.Minute, [2]time.Duration{-1, 2 * time.Minute}, ""},
		{"flag over file", []string{"--config", file, "--tcp-half-closed-timeout", "30s"},
			0, 30 * time.Second, [2]time.Duration{-1, 30 * time.Second}, ""},
		{"under 1s", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000", "--tunnel-half-closed-timeout", "500ms"},
			0, 0, [2]time.Duration{}, "--tunnel-half-closed-timeout: 500ms is out of range; accepted 0s (off) or 1s or more"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseRunFlags(tc.args, io.Discard)
			if err == nil {
				err = o.loadConfig()
			}
			if tc.wantErrSub != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErrSub) {
					t.Fatalf("error %v, want one with %q", err, tc.wantErrSub)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.halfClosedTimeout != tc.ws || o.tcpHalfClosed != tc.tcp {
				t.Errorf("half-close timeouts %v and %v (tcp), want %v and %v", o.halfClosedTimeout, o.tcpHalfClosed, tc.ws, tc.tcp)
			}
			if got := [2]time.Duration{offIfZero(o.halfClosedTimeout), offIfZero(o.tcpHalfClosed)}; got != tc.wantRelay {
				t.Errorf("relay gets %v, want %v", got, tc.wantRelay)
			}
		})
	}
}

// TestEventLoopsSettings: the number of event loops is 0 (the relay's default) unless the file's event_loops
// or --event-loops sets it, the flag over the file; and it reaches the relay, whose start log says how many
// loops run.
func TestEventLoopsSettings(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sockrelay.yaml")
	writeFile(t, file, "event_loops: 2\n"+
		"listeners: [{address: \"127.0.0.1:0\", routes: [{pool: p}]}]\npools: {p: {servers: [\"127.0.0.1:9000\"]}}\n")
	for _, tc := range []struct {
		name string
		args []string
		want int
	}{
		{"default", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000"}, 0},
		{"flag", []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000", "--event-loops", "3"}, 3},
		{"file", []string{"--config", file}, 2},
		{"flag over file", []string{"--config", file, "--event-loops", "1"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseRunFlags(tc.args, io.Discard)
			if err == nil {
				err = o.loadConfig()
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.eventLoops != tc.want {
				t.Errorf("event loops %d, want %d", o.eventLoops, tc.want)
			}
		})
	}
	t.Run("reaches the relay", func(t *testing.T) {
		r := startRelay(t, "--listen", "127.0.0.1:0", "--upstream", newEchoUpstream(t), "--datapath", "copy",
			"--event-loops", "3", "--log-format", "json")
		lines := r.logLines(t, "event loops started")
		if len(lines) != 1 || lines[0]["loops"] != 3.0 {
			t.Errorf("start log %v, want one line with loops 3:\n%s", lines, r.logs)
		}
	})
}

// TestFlagsAndFileAcceptTheSameValues: each bounded setting is checked against one range (package
// settings), so a value the command line accepts the configuration file accepts too, and the reverse; and
// the relay accepts what both pass.
func TestFlagsAndFileAcceptTheSameValues(t *testing.T) {
	ok := []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000"}
	for _, tc := range []struct {
		flag, key string // key: the file's, with its section
		values    []string
	}{
		{"--drain-timeout", "timeouts.shutdown", []string{"0s", "1ms", "30s"}},
		{"--client-header-timeout", "timeouts.client_header", []string{"0s", "-1s", "10s"}},
		{"--connect-timeout", "timeouts.connect", []string{"0s", "1s"}},
		{"--upstream-timeout", "timeouts.upstream_response", []string{"0s", "15s"}},
		{"--http-idle-timeout", "timeouts.http_idle", []string{"0s", "60s"}},
		{"--tunnel-idle-timeout", "timeouts.tunnel_idle", []string{"0s", "500ms", "1s", "-1s"}},
		{"--tunnel-lifetime", "timeouts.tunnel_lifetime", []string{"0s", "999ms", "1h"}},
		{"--tunnel-half-closed-timeout", "timeouts.half_closed", []string{"0s", "500ms", "5s"}},
		{"--tcp-half-closed-timeout", "timeouts.tcp_half_closed", []string{"0s", "500ms", "60s"}},
		{"--tunnel-log-interval", "tunnel_log_interval", []string{"0s", "500ms", "1m"}},
		{"--max-header-bytes", "max_header_bytes", []string{"1023", "1024", "1048576", "1048577"}},
		{"--kernel-held-limit", "kernel_held_limit", []string{"65535", "65536", "1073741824", "1073741825"}},
		{"--event-loops", "event_loops", []string{"-1", "0", "1", "1024", "1025"}},
	} {
		for _, v := range tc.values {
			t.Run(tc.flag+"="+v, func(t *testing.T) {
				_, flagErr := parseRunFlags(append(slices.Clone(ok), tc.flag+"="+v), io.Discard)
				_, fileErr := config.Parse("sockrelay.yaml", []byte(fileWith(tc.key, v)))
				if (flagErr == nil) != (fileErr == nil) {
					t.Errorf("flag: %v; file: %v; want both to accept or both to refuse", flagErr, fileErr)
				}
			})
		}
	}
}

// fileWith is a minimal configuration file with key (section.key or key) set to v.
func fileWith(key, v string) string {
	setting := key + ": " + v + "\n"
	if section, k, nested := strings.Cut(key, "."); nested {
		setting = section + ":\n  " + k + ": " + v + "\n"
	}
	return setting + "listeners:\n  - address: 127.0.0.1:0\n    routes:\n      - pool: p\npools:\n  p:\n    servers: [127.0.0.1:9000]\n"
}
