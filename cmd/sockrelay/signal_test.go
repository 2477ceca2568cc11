package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"github.com/sockrelay/sockrelay/loader"
)

// runMainEnv, set in a child's environment, makes the test binary run main() with the child's arguments
// instead of the tests: the way to test what only the real process does (signals, exit status).
const runMainEnv = "SOCKRELAY_TEST_RUN_MAIN"

// refuseTunnelsEnv, set to "odd" in a relay child's environment, makes it refuse every handed-over tunnel
// of an odd id, set to "crash", exit when the first batch arrives, and set to "silent", never answer a
// batch (adoptHooks).
const refuseTunnelsEnv = "SOCKRELAY_TEST_REFUSE_TUNNELS"

// adoptAnswerTimeoutEnv, set to a duration in a relay child's environment, is how long it waits for the
// new process's answer to a batch of tunnels (adoptAnswerTimeout).
const adoptAnswerTimeoutEnv = "SOCKRELAY_TEST_ADOPT_ANSWER_TIMEOUT"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		switch os.Getenv(refuseTunnelsEnv) {
		case "odd":
			adoptHooks.refuse = func(id uint64) bool { return id%2 == 1 }
		case "crash":
			adoptHooks.crashOnBatch = true
		case "silent":
			adoptHooks.neverAnswer = true
		}
		if d, err := time.ParseDuration(os.Getenv(adoptAnswerTimeoutEnv)); err == nil {
			adoptAnswerTimeout = d
		}
		main()
		return // main exits; not reached
	}
	os.Exit(m.Run())
}

// mainCommand returns a command running `sockrelay args...` from this test binary. When args[0] is not
// "run" (e.g. a wrapper such as setpriv), everything up to "run" is the wrapper and its options. The child
// is killed when the test ends.
func mainCommand(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	var cmd *exec.Cmd
	if args[0] == "run" {
		cmd = exec.CommandContext(ctx, self, args...)
	} else {
		i := 0
		for i < len(args) && args[i] != "run" {
			i++
		}
		wrapper := append(append(args[1:i:i], self), args[i:]...)
		cmd = exec.CommandContext(ctx, args[0], wrapper...)
	}
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	return cmd
}

// TestSignalDrainsAndExits0 runs the real process, sends it SIGTERM or SIGINT with a tunnel open, and
// checks it drains, closes the tunnel, and exits 0.
func TestSignalDrainsAndExits0(t *testing.T) {
	upstream := newEchoUpstream(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			logs := &syncbuf.Buffer{}
			cmd := mainCommand(t, "run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", upstream,
				"--datapath", "copy", "--drain-timeout", "300ms", "--log-format", "json")
			cmd.Stderr = logs
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()

			// The process says where it listens, for the client and for the admin endpoints.
			var listening struct{ Listen, Admin string }
			waitFor(t, "the child to log that it listens", func() bool {
				sc := bufio.NewScanner(strings.NewReader(logs.String()))
				for sc.Scan() {
					if strings.Contains(sc.Text(), `"msg":"sockrelay listening"`) {
						if err := json.Unmarshal(sc.Bytes(), &listening); err != nil {
							t.Fatalf("listening line: %v: %s", err, sc.Text())
						}
						return true
					}
				}
				return false
			})
			r := &relayRun{listen: listening.Listen, admin: listening.Admin}
			if _, port, _ := net.SplitHostPort(r.admin); port == "0" || port == "" {
				t.Fatalf("the listening line gives the admin address as %q, not the bound one", r.admin)
			}
			r.get(t, "/healthz", 200)
			ws := dialWS(t, r.listen)
			echoThrough(t, ws, "hello")

			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Errorf("after %v the process ended with %v, want exit status 0:\n%s", sig, err, logs)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("the process had not exited 10s after %v with a 300ms drain:\n%s", sig, logs)
			}
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, _, err := ws.ReadMessage()
			var ne net.Error
			if err == nil || errors.As(err, &ne) && ne.Timeout() {
				t.Errorf("the open tunnel was not closed when the process exited: read gave %v", err)
			}
			for _, w := range []string{`"msg":"shutting down: no new clients; draining tunnels"`,
				`"msg":"tunnel closed"`, `"reason":"shutdown"`, `"msg":"sockrelay stopped"`} {
				if !strings.Contains(logs.String(), w) {
					t.Errorf("log lacks %s:\n%s", w, logs)
				}
			}
		})
	}
}

// TestSIGHUPDuringStart: a SIGHUP that comes while the relay starts (here during the sockmap self-test,
// some 100-300 ms) neither kills it (SIGHUP's default action, exit 129 with nothing logged) nor is lost:
// it is logged as held, applied as one reload once the relay serves, and the relay serves.
func TestSIGHUPDuringStart(t *testing.T) {
	if err := loader.Probe().Err(); err != nil {
		t.Skipf("the start is long enough to aim a signal at only with the sockmap self-test: %v", err)
	}
	path := filepath.Join(t.TempDir(), "sockrelay.yaml")
	// The unused pool makes the relay log a warning as soon as its logger exists: the mark that it runs.
	writeFile(t, path, fmt.Sprintf(`admin: 127.0.0.1:0
datapath: sockmap
listeners: [{address: "127.0.0.1:0", routes: [{pool: echo}]}]
pools:
  echo: {servers: [%q]}
  spare: {servers: ["127.0.0.1:9"]}
`, newEchoUpstream(t)))
	logs := &syncbuf.Buffer{}
	cmd := mainCommand(t, "run", "--config", path, "--log-format", "json", "--drain-timeout", "300ms")
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waitFor(t, "the relay's first log line", func() bool { return strings.Contains(logs.String(), `"msg":"configuration"`) })
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var listen string
	if !poll(func() bool {
		select {
		case err := <-exited:
			t.Fatalf("the relay ended (%v) after a SIGHUP during its start:\n%s", err, logs)
		default:
		}
		for _, l := range strings.Split(logs.String(), "\n") {
			var line struct{ Msg, Listen string }
			if json.Unmarshal([]byte(l), &line) == nil && line.Msg == "sockrelay listening" {
				listen = line.Listen
				return true
			}
		}
		return false
	}) {
		t.Fatalf("the relay did not serve within 5s:\n%s", logs)
	}
	waitFor(t, "the held reload", func() bool { return strings.Contains(logs.String(), `"msg":"configuration reloaded"`) })
	out := logs.String()
	held := strings.Index(out, `"msg":"reload requested during start; will apply once serving"`)
	if held < 0 || held > strings.Index(out, `"msg":"sockrelay listening"`) {
		t.Errorf("the SIGHUP was not logged as held during the start:\n%s", out)
	}
	if n := strings.Count(out, `"msg":"configuration reloaded"`); n != 1 {
		t.Errorf("%d reloads, want the one held", n)
	}
	echoThrough(t, dialWS(t, listen), "after the early hang-up")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("after SIGTERM the relay ended with %v, want exit status 0:\n%s", err, logs)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the relay had not exited 10s after SIGTERM:\n%s", logs)
	}
}
