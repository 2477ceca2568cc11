package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// TestLogFormatFromFile: log_format in the file sets the log's format, and --log-format overrides it.
func TestLogFormatFromFile(t *testing.T) {
	echo := startCountingEcho(t)
	file := fmt.Sprintf("admin: \"\"\nlog_format: json\nlisteners:\n  - address: 127.0.0.1:0\n    routes: [{pool: echo}]\npools:\n  echo:\n    servers: [%s]\n", echo.addr())
	path := filepath.Join(t.TempDir(), "sockrelay.yaml")
	writeFile(t, path, file)

	r := startRelay(t, "--config", path)
	if len(r.logLines(t, "sockrelay listening")) != 1 { // logLines fails on a line that is not JSON
		t.Errorf("log_format: json: no JSON \"sockrelay listening\" line:\n%s", r.logs)
	}
	r = startRelay(t, "--config", path, "--log-format", "text")
	if !strings.Contains(r.logs.String(), `msg="sockrelay listening"`) {
		t.Errorf("--log-format text over log_format: json: no text line:\n%s", r.logs)
	}
}

// TestJSONDurationsHaveAUnit: a duration in a JSON log line is text with its unit ("30s"), not slog's
// bare count of nanoseconds.
func TestJSONDurationsHaveAUnit(t *testing.T) {
	r := startRelay(t, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--log-format", "json", "--drain-timeout", "30s")
	r.stop()
	if _, ok := r.wait(10 * time.Second); !ok {
		t.Fatal("sockrelay did not stop")
	}
	lines := r.logLines(t, "shutting down: no new clients; draining tunnels")
	if len(lines) != 1 {
		t.Fatalf("%d shutting down lines, want 1:\n%s", len(lines), r.logs)
	}
	if got := lines[0]["drain_timeout"]; got != "30s" {
		b, _ := json.Marshal(got)
		t.Errorf("drain_timeout = %s, want \"30s\"", b)
	}
}

// TestTLSListenerStartLineSaysCopy: a TLS listener's tunnels run on copy (its bytes are decrypted in
// userspace), and its start line says so whatever the relay's datapath.
func TestTLSListenerStartLineSaysCopy(t *testing.T) {
	echo := startCountingEcho(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "start line CA")
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, dir, "relay")
	r := startConfigRelay(t, tlsListenerConfig("127.0.0.1:0", `""`, echo.addr(), cert, key), "--datapath", "splice")
	lines := r.logLines(t, "sockrelay listening")
	if len(lines) != 1 || lines[0]["datapath"] != "copy" {
		t.Errorf("start line of a TLS listener on --datapath splice: %v; want datapath copy", lines)
	}
}
