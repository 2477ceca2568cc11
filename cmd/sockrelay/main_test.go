package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"github.com/sockrelay/sockrelay/internal/wsecho"
)

func TestDispatch(t *testing.T) {
	for _, tc := range []struct {
		args           []string
		code           int
		stdout, stderr string // substrings expected
	}{
		{nil, 2, "", "Usage:"},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"help"}, 0, "sockrelay run --listen ADDR", ""},
		{[]string{"--help"}, 0, "Usage:", ""},
		{[]string{"version"}, 0, "sockrelay ", ""},
		{[]string{"doctor"}, 0, "datapaths:", ""},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := dispatch(context.Background(), tc.args, &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tc.code, stderr.String())
			}
			if !strings.Contains(stdout.String(), tc.stdout) {
				t.Errorf("stdout %q lacks %q", stdout.String(), tc.stdout)
			}
			if !strings.Contains(stderr.String(), tc.stderr) {
				t.Errorf("stderr %q lacks %q", stderr.String(), tc.stderr)
			}
		})
	}
}

// TestDoctorSaysWhy checks the doctor's report names every datapath and, on this host, the kernel checks.
func TestDoctorSaysWhy(t *testing.T) {
	var out bytes.Buffer
	doctorCommand(&out)
	for _, want := range []string{"kernel ", "capabilities", "sockmap self-test:", "sockmap ", "splice ", "copy     available"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("doctor output lacks %q:\n%s", want, out.String())
		}
	}
	if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" && !strings.Contains(out.String(), "sockmap  available") {
		t.Errorf("SOCKRELAY_REQUIRE_BPF=1 but the doctor says sockmap is unavailable:\n%s", out.String())
	}
}

func TestRunRejectsBadFlags(t *testing.T) {
	ok := []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000"}
	for _, tc := range []struct {
		name string
		args []string
		want []string // substrings of stderr: the flag, what was wrong, what is accepted
	}{
		{"no listen", []string{"--upstream", "127.0.0.1:9000"}, []string{"--listen is required", "e.g. --listen"}},
		{"no upstream", []string{"--listen", ":0"}, []string{"--upstream is required", "HOST:PORT"}},
		{"upstream without port", append(ok, "--upstream", "localhost"), []string{"--upstream", "HOST:PORT"}},
		{"upstream port 0", append(ok, "--upstream", "127.0.0.1:0"), []string{"--upstream", "1 to 65535"}},
		{"upstream empty host", append(ok, "--upstream", ":9000"), []string{"--upstream", "empty host"}},
		{"unknown datapath", append(ok, "--datapath", "kernel"), []string{"--datapath", `"kernel"`, "auto, sockmap, splice, copy"}},
		{"unknown flag", append(ok, "--listne", ":1"), []string{"--listne: unknown flag"}},
		{"stray argument", append(ok, "127.0.0.1:9001"), []string{`unexpected argument "127.0.0.1:9001"`}},
		{"zero drain", append(ok, "--drain-timeout", "0s"), []string{"--drain-timeout", "0s is out of range; accepted more than 0s"}},
		{"negative connect timeout", append(ok, "--connect-timeout", "-1s"), []string{"--connect-timeout", "-1s is out of range; accepted more than 0s"}},
		{"bad duration", append(ok, "--upstream-timeout", "ten"), []string{"--upstream-timeout", `"ten" is not a duration`, "10s"}},
		{"zero http idle", append(ok, "--http-idle-timeout", "0s"), []string{"--http-idle-timeout", "0s is out of range; accepted more than 0s"}},
		{"tiny header limit", append(ok, "--max-header-bytes", "10"), []string{"--max-header-bytes", "10 is out of range; accepted 1KiB to 1MiB"}},
		{"huge header limit", append(ok, "--max-header-bytes", "2097152"), []string{"--max-header-bytes", "2097152", "1MiB"}},
		{"tiny held limit", append(ok, "--kernel-held-limit", "1000"), []string{"--kernel-held-limit", "1000", "64KiB"}},
		{"huge held limit", append(ok, "--kernel-held-limit", "4294967296"), []string{"--kernel-held-limit", "4294967296", "1GiB"}},
		{"negative event loops", append(ok, "--event-loops", "-1"), []string{"--event-loops", "-1 is out of range", "0 (the default, one per two CPUs) or 1 to 1024"}},
		{"too many event loops", append(ok, "--event-loops", "5000"), []string{"--event-loops", "5000 is out of range", "1 to 1024"}},
		{"event loops not a number", append(ok, "--event-loops", "two"), []string{"--event-loops", `"two" is not a whole number`}},
		{"bad log level", append(ok, "--log-level", "loud"), []string{"--log-level", "debug, info, warn, error"}},
		{"bad log format", append(ok, "--log-format", "xml"), []string{"--log-format", "text, json"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := runCommand(context.Background(), tc.args, &stderr, nil); code != 2 {
				t.Errorf("exit code %d, want 2; stderr: %s", code, stderr.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
		})
	}
}

// TestFlagErrorsAreOneLine: a flag the flag package refuses is told in one line that names the flag, the
// value and what is accepted, and a hint to --help, not the forty lines of the usage.
func TestFlagErrorsAreOneLine(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--listen", ":0", "--connect-timeout", "5"},
			"sockrelay run: --connect-timeout: \"5\" is not a duration; use a unit, e.g. 5s\nsockrelay run --help lists every flag\n"},
		{[]string{"run", "--max-header-bytes", "16KiB"},
			"sockrelay run: --max-header-bytes: \"16KiB\" is not a whole number; accepted: digits only, e.g. 65536\nsockrelay run --help lists every flag\n"},
		{[]string{"run", "--listen"},
			"sockrelay run: --listen: needs a value, e.g. --listen VALUE\nsockrelay run --help lists every flag\n"},
		{[]string{"check", "--confg", "x.yaml"},
			"sockrelay check: --confg: unknown flag\nsockrelay check --help lists every flag\n"},
	} {
		var stdout, stderr bytes.Buffer
		if code := dispatch(context.Background(), tc.args, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2", tc.args, code)
		}
		if stderr.String() != tc.want {
			t.Errorf("%v: stderr:\n%s\nwant:\n%s", tc.args, stderr.String(), tc.want)
		}
	}
}

// TestRunAddressInUse: a --listen or --admin address another socket holds is a runtime failure (exit 1)
// that names the flag and the address.
func TestRunAddressInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, flagName := range []string{"--listen", "--admin"} {
		t.Run(flagName, func(t *testing.T) {
			args := []string{"--listen", busy.Addr().String(), "--upstream", "127.0.0.1:9000", "--datapath", "copy"}
			if flagName == "--admin" {
				args = []string{"--listen", "127.0.0.1:0", "--admin", busy.Addr().String(), "--upstream", "127.0.0.1:9000", "--datapath", "copy"}
			}
			var stderr bytes.Buffer
			if code := runCommand(context.Background(), args, &stderr, nil); code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
			for _, w := range []string{flagName, busy.Addr().String(), "address already in use"} {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
		})
	}
}

// TestRunEndToEnd runs the daemon as main does, for each datapath: a WebSocket echo through it, the admin
// endpoints, then SIGTERM (a cancelled context) with one tunnel still open and one that closes during the
// drain.
func TestRunEndToEnd(t *testing.T) {
	echo := httptest.NewServer(wsecho.Handler(slog.New(slog.DiscardHandler)))
	defer echo.Close()

	for _, dp := range []string{"auto", "copy", "splice", "sockmap"} {
		t.Run(dp, func(t *testing.T) {
			ctx, stop := context.WithCancel(context.Background())
			defer stop()
			type addrs struct{ listen, admin net.Addr }
			ready := make(chan addrs, 1)
			logs := &syncbuf.Buffer{}
			exit := make(chan int, 1)
			go func() {
				exit <- runCommand(ctx, []string{"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
					"--upstream", echo.Listener.Addr().String(), "--datapath", dp, "--drain-timeout", "300ms"},
					logs, func(l, a net.Addr) { ready <- addrs{l, a} })
			}()
			var a addrs
			select {
			case a = <-ready:
			case code := <-exit:
				if dp == "sockmap" && os.Getenv("SOCKRELAY_REQUIRE_BPF") != "1" {
					t.Skipf("sockmap unavailable here (exit %d): %s", code, logs)
				}
				t.Fatalf("sockrelay exited %d before serving:\n%s", code, logs)
			case <-time.After(10 * time.Second):
				t.Fatalf("sockrelay not serving after 10s:\n%s", logs)
			}

			dial := func() *websocket.Conn {
				ws, _, err := websocket.DefaultDialer.Dial("ws://"+a.listen.String()+"/", nil)
				if err != nil {
					t.Fatalf("dial through the relay: %v", err)
				}
				ws.SetReadDeadline(time.Now().Add(10 * time.Second))
				return ws
			}
			stays, leaves := dial(), dial()
			for _, ws := range []*websocket.Conn{stays, leaves} {
				ws.WriteMessage(websocket.TextMessage, []byte("hello"))
				if _, msg, err := ws.ReadMessage(); err != nil || string(msg) != "hello" {
					t.Fatalf("echo through the relay: %q, %v", msg, err)
				}
			}

			admin := "http://" + a.admin.String()
			if code, _ := httpGet(t, admin+"/healthz"); code != 200 {
				t.Errorf("/healthz answered %d, want 200", code)
			}
			want := dp
			if dp == "auto" {
				want = autoTunnels()
			}
			if _, body := httpGet(t, admin+"/metrics"); !strings.Contains(body, fmt.Sprintf(`sockrelay_tunnels_total{datapath=%q,listener="default",pool="default"} 2`, want)) {
				t.Errorf("/metrics lacks sockrelay_tunnels_total{datapath=%q,listener=\"default\",pool=\"default\"} 2", want)
			}
			var tunnels []map[string]any
			if _, body := httpGet(t, admin+"/debug/tunnels"); json.Unmarshal([]byte(body), &tunnels) != nil || len(tunnels) != 2 {
				t.Errorf("/debug/tunnels = %s, want two tunnels", body)
			} else {
				for _, k := range []string{"id", "client", "upstream", "datapath", "bytes_to_upstream", "bytes_to_client", "started"} {
					if _, ok := tunnels[0][k]; !ok {
						t.Errorf("/debug/tunnels entry lacks %q: %v", k, tunnels[0])
					}
				}
			}

			// SIGTERM: one tunnel leaves on its own during the drain, the other is closed when it ends.
			stop()
			time.Sleep(50 * time.Millisecond)
			leaves.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
			leaves.Close()
			select {
			case code := <-exit:
				if code != 0 {
					t.Errorf("exit code %d after SIGTERM, want 0", code)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("sockrelay did not exit within 5s of SIGTERM with a 300ms drain")
			}
			stays.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, _, err := stays.ReadMessage(); err == nil {
				t.Error("the tunnel left open still works after the relay exited")
			}
			for _, w := range []string{"shutting down", "msg=\"tunnel closed\"", "reason=shutdown", "sockrelay stopped"} {
				if !strings.Contains(logs.String(), w) {
					t.Errorf("log lacks %q:\n%s", w, logs)
				}
			}
		})
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
