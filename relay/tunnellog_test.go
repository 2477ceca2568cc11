package relay

import (
	"encoding/json"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestLongLivedTunnelLogged: a tunnel that lives past the interval gets "tunnel alive" records with its
// bytes so far, on every datapath (kernel tunnels' bytes come from the BPF counters).
func TestLongLivedTunnelLogged(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, u := openTunnel(t, r.Addr, up, []byte("12345"), []byte("abc"))
			io.ReadFull(u.R, make([]byte, 5))
			io.ReadFull(c.R, make([]byte, 3))

			stop := make(chan struct{})
			defer close(stop)
			go r.logLongLivedTunnels(20*time.Millisecond, stop)
			want := []string{`msg="tunnel alive"`, "datapath=" + string(dp), "bytes_to_upstream=5", "bytes_to_client=3",
				"upstream=" + up.Addr}
			for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				log := r.Log.String()
				if strings.Count(log, `msg="tunnel alive"`) >= 2 && containsAll(log, want) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no two \"tunnel alive\" records with %q in 2 s:\n%s", want, log)
				}
			}
		})
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

func TestTunnelLogIntervalChecked(t *testing.T) {
	_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathCopy, TunnelLogInterval: 10 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "TunnelLogInterval: 10ms is out of range; accepted 0s (off) or 1s or more") {
		t.Errorf("NewServer with a 10 ms tunnel log interval: %v; want the accepted range", err)
	}
}

// jsonLogger logs at debug level, as JSON, into the returned buffer.
func jsonLogger() (func(*Config), *syncbuf.Buffer) {
	buf := &syncbuf.Buffer{}
	return func(c *Config) {
		c.Logger = slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}, buf
}

// logRecords waits up to 5 s for a record with msg in a JSON log and returns every such record.
func logRecords(t *testing.T, log *syncbuf.Buffer, msg string) []map[string]any {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var out []map[string]any
		for line := range strings.Lines(log.String()) {
			var rec map[string]any
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Fatalf("log line is not JSON: %v\n%s", err, line)
			}
			if rec["msg"] == msg {
				out = append(out, rec)
			}
		}
		if len(out) > 0 {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q record in 5 s:\n%s", msg, log.String())
		}
	}
}

// checkFields fails t for every field of want that rec lacks or has another value in (JSON numbers are
// float64), and for every key of absent that rec has.
func checkFields(t *testing.T, rec map[string]any, want map[string]any, absent ...string) {
	t.Helper()
	for k, v := range want {
		if got, ok := rec[k]; !ok || got != v {
			t.Errorf("%s: %s = %#v, want %#v\n%v", rec["msg"], k, got, v, rec)
		}
	}
	for _, k := range absent {
		if _, ok := rec[k]; ok {
			t.Errorf("%s: has %s (%v)", rec["msg"], k, rec[k])
		}
	}
}

// TestTunnelLogLines: a tunnel's debug "tunnel opened" line and its info "tunnel closed" line name the
// request (URI, Host, User-Agent), the listener and the pool; the close line gives its duration in
// milliseconds (a key with its unit, not a bare JSON count of nanoseconds) and an empty err after a clean
// end.
func TestTunnelLogLines(t *testing.T) {
	up := startUpstream(t)
	withJSON, log := jsonLogger()
	r := startRelay(t, DatapathCopy, []string{up.Addr}, withJSON)
	req := strings.Replace(upgradeRequest("/chat?room=1"), "Host: relay.test\r\n", "Host: relay.test\r\nUser-Agent: logtest/1\r\n", 1)
	c, u := openTunnelWith(t, r.Addr, up, req, []byte("12345"), nil)
	io.ReadFull(u.R, make([]byte, 5))
	request := map[string]any{"uri": "/chat?room=1", "host": "relay.test", "user_agent": "logtest/1",
		"listener": DefaultListener, "pool": "default", "upstream": up.Addr, "datapath": "copy"}
	checkFields(t, logRecords(t, log, "tunnel opened")[0], request)
	c.CloseWrite()
	u.CloseWrite()
	closed := logRecords(t, log, "tunnel closed")[0]
	checkFields(t, closed, request, "duration")
	checkFields(t, closed, map[string]any{"reason": ReasonClosed, "err": "", "bytes_to_upstream": 5.0})
	if d, ok := closed["duration_ms"].(float64); !ok || d <= 0 {
		t.Errorf("tunnel closed: duration_ms = %#v, want a positive number of milliseconds", closed["duration_ms"])
	}
}

// TestTunnelLogLinesOffCostNothing: a relay whose log is set above a tunnel's lines does not build their
// attributes (strings and numbers boxed for slog, on every tunnel): logOpened and logClosed allocate nothing.
func TestTunnelLogLinesOffCostNothing(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr}, func(cfg *Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	openTunnel(t, r.Addr, up, nil, nil)
	tunnels := r.Tunnels().Tunnels()
	if len(tunnels) != 1 {
		t.Fatalf("%d tunnels registered, want 1", len(tunnels))
	}
	tun := tunnels[0]
	if allocs := testing.AllocsPerRun(100, func() {
		r.logOpened(tun)
		r.logClosed(tun, 1000, 2000)
	}); allocs != 0 {
		t.Errorf("logOpened and logClosed at warn level: %v allocations, want 0", allocs)
	}
}

// TestDebugLogSaysHowTheHandshakeWent: at debug level the log says which route and server a handshake
// took, and each server it tried.
func TestDebugLogSaysHowTheHandshakeWent(t *testing.T) {
	up := startUpstream(t)
	withJSON, log := jsonLogger()
	r := startRelay(t, DatapathCopy, []string{up.Addr}, withJSON)
	openTunnel(t, r.Addr, up, nil, nil)
	checkFields(t, logRecords(t, log, "route chosen")[0], map[string]any{"uri": "/tunnel", "host": "relay.test", "pool": "default"})
	checkFields(t, logRecords(t, log, "trying upstream server")[0], map[string]any{"server": up.Addr, "try": 1.0, "pool": "default"})
}

// TestClientGoneAfterCloseIsAReset: a browser tab that closes sends its close frame and FIN, then
// resets the connection when the upstream's answer arrives; the relay's next write to it fails with
// EPIPE (a reset in CLOSE_WAIT). That is the client resetting, logged as client_reset with the error
// text, not a bare client_error.
func TestClientGoneAfterCloseIsAReset(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			withJSON, log := jsonLogger()
			r := startRelay(t, dp, []string{up.Addr}, withJSON)
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			c.Write([]byte{0x88, 0x80, 1, 2, 3, 4}) // a masked close frame
			c.Close()
			io.ReadFull(u.R, make([]byte, 6))
			var closed []map[string]any
			for range 100 { // the upstream answers; the relay's writes to the gone client fail
				if _, err := u.Write([]byte{0x88, 0x00}); err != nil {
					break
				}
				time.Sleep(20 * time.Millisecond)
				if strings.Contains(log.String(), `"tunnel closed"`) {
					break
				}
			}
			closed = logRecords(t, log, "tunnel closed")
			checkFields(t, closed[0], map[string]any{"reason": ReasonClientReset})
			if e, _ := closed[0]["err"].(string); !strings.Contains(e, "broken pipe") && !strings.Contains(e, "reset by peer") {
				t.Errorf("tunnel closed: err = %q, want the write's error", e)
			}
		})
	}
}

// TestAccessLogLine: every plain (not upgrade) request gets one info line, as nginx's access log: method,
// URI, host, status, bytes, duration in milliseconds, client, listener, pool and upstream server.
func TestAccessLogLine(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "hello")
	}))
	t.Cleanup(app.Close)
	appAddr := app.Listener.Addr().String()
	withJSON, log := jsonLogger()
	r := startRelay(t, DatapathCopy, []string{appAddr}, withJSON)
	req, _ := http.NewRequest(http.MethodPost, "http://"+r.Addr+"/api/items?x=1", strings.NewReader("body"))
	req.Host = "app.test"
	req.Header.Set("User-Agent", "logtest/1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	recs := logRecords(t, log, "request")
	if len(recs) != 1 {
		t.Fatalf("%d request lines, want 1:\n%s", len(recs), log.String())
	}
	checkFields(t, recs[0], map[string]any{"level": "INFO", "method": "POST", "uri": "/api/items?x=1", "host": "app.test",
		"status": 201.0, "bytes": 5.0, "listener": DefaultListener, "pool": "default", "upstream": appAddr,
		"user_agent": "logtest/1"}, "duration")
	if c, _ := recs[0]["client"].(string); !strings.HasPrefix(c, "127.0.0.1:") {
		t.Errorf("request: client = %q, want the client's address", c)
	}
	if d, ok := recs[0]["duration_ms"].(float64); !ok || d <= 0 {
		t.Errorf("request: duration_ms = %#v, want a positive number of milliseconds", recs[0]["duration_ms"])
	}
}
