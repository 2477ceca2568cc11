package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/internal/wsecho"
)

func TestSummarize(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	thousand := make([]time.Duration, 1000)
	for i := range thousand {
		thousand[i] = time.Duration(1000-i) * time.Microsecond // reversed: summarize must sort
	}
	for _, tc := range []struct {
		name string
		in   []time.Duration
		want Percentiles
	}{
		{"empty", nil, Percentiles{}},
		{"one", ms(7), Percentiles{Count: 1, P50: 7 * time.Millisecond, P90: 7 * time.Millisecond,
			P99: 7 * time.Millisecond, P999: 7 * time.Millisecond, Max: 7 * time.Millisecond}},
		// Nearest rank: p50 of 10 is the 5th value, p90 the 9th, p99 and p99.9 the 10th.
		{"ten", ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), Percentiles{Count: 10, P50: 5 * time.Millisecond,
			P90: 9 * time.Millisecond, P99: 10 * time.Millisecond, P999: 10 * time.Millisecond, Max: 10 * time.Millisecond}},
		{"thousand", thousand, Percentiles{Count: 1000, P50: 500 * time.Microsecond, P90: 900 * time.Microsecond,
			P99: 990 * time.Microsecond, P999: 999 * time.Microsecond, Max: 1000 * time.Microsecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := summarize(tc.in); got != tc.want {
				t.Errorf("summarize = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseSockstatTCPMem(t *testing.T) {
	const sockstat = "sockets: used 250\nTCP: inuse 12 orphan 0 tw 3 alloc 20 mem 37\nUDP: inuse 2 mem 4\n"
	if got, err := parseSockstatTCPMem(sockstat, 4096); err != nil || got != 37*4096 {
		t.Errorf("parseSockstatTCPMem = %d, %v; want %d", got, err, 37*4096)
	}
	if _, err := parseSockstatTCPMem("UDP: inuse 2 mem 4\n", 4096); err == nil {
		t.Error("parseSockstatTCPMem without a TCP line: no error")
	}
	if _, err := parseSockstatTCPMem("TCP: inuse 1 mem lots\n", 4096); err == nil {
		t.Error("parseSockstatTCPMem with a bad number: no error")
	}
}

func TestParseMeminfoSlab(t *testing.T) {
	const meminfo = "MemTotal:       24684136 kB\nSlab:             312456 kB\nSReclaimable:     100 kB\n"
	if got, err := parseMeminfoSlab(meminfo); err != nil || got != 312456<<10 {
		t.Errorf("parseMeminfoSlab = %d, %v; want %d", got, err, 312456<<10)
	}
	for _, bad := range []string{"MemTotal: 1 kB\n", "Slab: many kB\n"} {
		if _, err := parseMeminfoSlab(bad); err == nil {
			t.Errorf("parseMeminfoSlab(%q): no error", bad)
		}
	}
}

func TestProcRSS(t *testing.T) {
	rss, err := procRSS(os.Getpid())
	if err != nil || rss < 1<<20 {
		t.Errorf("procRSS(self) = %d, %v; want a few MiB", rss, err)
	}
	if _, err := procRSS(1 << 30); err == nil {
		t.Error("procRSS of a process that does not exist: no error")
	}
}

// echoServer is the bundled echo upstream (internal/wsecho) on loopback, which the smoke tests measure.
func echoServer(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(wsecho.Handler(slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/"
}

// TestWorkloadsSmoke runs each workload for about a second against an echo server and checks its table and
// JSON.
func TestWorkloadsSmoke(t *testing.T) {
	url := echoServer(t)
	for _, tc := range []struct {
		args      []string
		tableHead string
		jsonKey   string
	}{
		{[]string{"rtt", "-tunnels", "4", "-duration", "1s"}, "p99.9", "round_trips_per_second"},
		{[]string{"rtt", "-tunnels", "2", "-duration", "1s", "-rate", "50", "-size", "1000"}, "p99.9", "rtt"},
		{[]string{"rtt", "-tunnels", "2", "-duration", "500ms", "-warmup", "500ms", "-rate", "100"}, "p99.9", "rtt"},
		{[]string{"rtt", "-tunnels", "2", "-duration", "300ms", "-warmup", "200ms", "-rate", "100", "-direct", "DIRECT", "-rounds", "2"}, "target ÷ direct", "p99_ratio"},
		{[]string{"idle", "-tunnels", "50", "-settle", "200ms"}, "slab/tunnel", "kernel_slab_per_tunnel_bytes"},
		{[]string{"idle", "-tunnels", "20", "-settle", "100ms", "-pid", "1"}, "RSS/tunnel", "relay_rss_per_tunnel_bytes"},
		{[]string{"idle", "-tunnels", "20", "-settle", "100ms", "-pid", fmt.Sprintf("1,%d", os.Getpid())}, "RSS/tunnel", "relay_rss_per_tunnel_bytes"},
		{[]string{"throughput", "-duration", "1s", "-url", url + "sink"}, "Gbit/s", "gbit_per_second"},
		{[]string{"throughput", "-duration", "1s", "-warmup", "500ms", "-url", url + "sink"}, "Gbit/s", "warmup_seconds"},
		{[]string{"throughput", "-duration", "1s", "-mode", "echo", "-tunnels", "2", "-size", "1000", "-url", url + "bulk"}, "Gbit/s", "gbit_per_second"},
		{[]string{"throughput", "-duration", "1s", "-mode", "echo", "-size", "65536", "-url", url + "bulk"}, "Gbit/s", "gbit_per_second"},
		{[]string{"handshakes", "-duration", "1s", "-tunnels", "2"}, "opened/s", "handshakes_per_second"},
		{[]string{"mixed", "-duration", "1s", "-warmup", "200ms", "-tunnels", "20", "-chatty", "4", "-rate", "50", "-pid", fmt.Sprint(os.Getpid())}, "chatty p99", "bulk_gbit_per_second"},
		{[]string{"cpu", "-duration", "1s", "-tunnels", "4", "-rate", "400", "-rounds", "2", "-direct", "DIRECT", "-pid", fmt.Sprint(os.Getpid())}, "relay adds: machine µs", "relay_cpu_us_per_message"},
		{[]string{"cpu", "-duration", "1s", "-tunnels", "4", "-rate", "400", "-rounds", "1", "-warmup", "300ms"}, "machine µs", "target_warmup_seconds"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			jsonPath := filepath.Join(t.TempDir(), "out.json")
			var stdout, stderr bytes.Buffer
			args := append([]string{}, tc.args...)
			if !slices.Contains(args, "-url") {
				args = append(args, "-url", url)
			}
			if i := slices.Index(args, "DIRECT"); i >= 0 {
				args[i] = url
			}
			args = append(args, "-json", jsonPath)
			if code := run(context.Background(), args, &stdout, &stderr); code != 0 {
				t.Fatalf("exit %d; stderr:\n%s", code, stderr.String())
			}
			if !strings.Contains(stdout.String(), tc.tableHead) {
				t.Errorf("table lacks %q:\n%s", tc.tableHead, stdout.String())
			}
			var out struct {
				Workload string
				Result   map[string]any
			}
			b, err := os.ReadFile(jsonPath)
			if err == nil {
				err = json.Unmarshal(b, &out)
			}
			if err != nil || out.Workload != tc.args[0] {
				t.Fatalf("JSON result %s: %v, workload %q\n%s", jsonPath, err, out.Workload, b)
			}
			if _, ok := out.Result[tc.jsonKey]; !ok {
				t.Errorf("JSON result lacks %q: %s", tc.jsonKey, b)
			}
			if tc.args[0] == "rtt" {
				if trips, _ := out.Result["round_trips_per_second"].(float64); trips <= 0 {
					t.Errorf("no round trips measured: %s", b)
				}
				// With -warmup, the warm-up's round trips are not counted: 2 tunnels at 100/s for 0.5 s
				// measured are about 100, not the 200 of the whole second.
				if slices.Contains(tc.args, "-warmup") && !slices.Contains(tc.args, "-direct") {
					count, _ := out.Result["rtt"].(map[string]any)["count"].(float64)
					if count < 50 || count > 150 {
						t.Errorf("%v round trips counted with a 500ms warm-up and 500ms measured; want about 100: %s", count, b)
					}
				}
			}
			if tc.args[0] == "rtt" && slices.Contains(tc.args, "-direct") {
				// -rounds 2: D,T then T,D on tunnels kept open, each round with round trips, and a ratio per
				// pair.
				for _, side := range []string{"target_rounds", "direct_rounds"} {
					rounds, _ := out.Result[side].([]any)
					if len(rounds) != 2 {
						t.Fatalf("%s: %d rounds, want 2: %s", side, len(rounds), b)
					}
					for _, r := range rounds {
						if n, _ := r.(map[string]any)["rtt"].(map[string]any)["count"].(float64); n <= 0 {
							t.Errorf("%s: a round without round trips: %s", side, b)
						}
					}
				}
				for _, key := range []string{"p50_ratio", "p99_ratio"} {
					if n, _ := out.Result[key].(map[string]any)["n"].(float64); n != 2 {
						t.Errorf("%s over %v pairs, want 2: %s", key, n, b)
					}
				}
				if order, _ := out.Result["order"].(string); order != "D T T D" {
					t.Errorf("order %q, want \"D T T D\"", order)
				}
			}
			if tc.args[0] == "handshakes" {
				if opened, _ := out.Result["latency"].(map[string]any)["count"].(float64); opened <= 0 {
					t.Errorf("no handshake measured: %s", b)
				}
			}
			if tc.args[0] == "cpu" {
				// -rounds 2 with -direct: D,T,D,T, each with messages, and the relay's spread over 2 pairs.
				for _, side := range []string{"target", "direct"} {
					rounds, _ := out.Result[side].([]any)
					if !slices.Contains(tc.args, "-direct") {
						break // the -warmup case: one round, no baseline
					}
					if len(rounds) != 2 {
						t.Fatalf("%s: %d rounds, want 2: %s", side, len(rounds), b)
					}
					for _, r := range rounds {
						if msgs, _ := r.(map[string]any)["messages"].(float64); msgs <= 0 {
							t.Errorf("%s: a round without messages: %s", side, b)
						}
					}
				}
				if w, _ := out.Result["target_warmup_seconds"].(float64); slices.Contains(tc.args, "-warmup") && w != 0.3 {
					t.Errorf("target_warmup_seconds %v, want 0.3: %s", w, b)
				}
				for _, key := range []string{"relay_ctxt_per_message", "process_cpu_us_per_message", "process_voluntary_switches_per_message"} {
					if !slices.Contains(tc.args, "-direct") {
						break
					}
					if n, _ := out.Result[key].(map[string]any)["n"].(float64); n != 2 {
						t.Errorf("%s over %v rounds, want 2: %s", key, n, b)
					}
				}
			}
			if tc.args[0] == "mixed" {
				if rtt, _ := out.Result["chatty_rtt"].(map[string]any); rtt["count"].(float64) <= 0 {
					t.Errorf("no chatty round trip measured: %s", b)
				}
				if g, _ := out.Result["bulk_gbit_per_second"].(float64); g <= 0 {
					t.Errorf("no bulk moved: %s", b)
				}
				if rss, _ := out.Result["relay_rss_bytes"].(float64); rss <= 0 {
					t.Errorf("no RSS with -pid: %s", b)
				}
			}
			if tc.args[0] == "throughput" {
				if moved, _ := out.Result["bytes"].(float64); moved <= 0 {
					t.Errorf("no bytes moved: %s", b)
				}
				// With -warmup 500ms -duration 1s, the seconds counted are about 1, not the 1.5 streamed.
				if secs, _ := out.Result["seconds"].(float64); slices.Contains(tc.args, "-warmup") && (secs < 0.9 || secs > 1.4) {
					t.Errorf("%v s counted with a 500ms warm-up and 1s counted; want about 1: %s", secs, b)
				}
			}
		})
	}
}

func TestBadUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "usage: wsbench"},
		{[]string{"flood"}, `unknown workload "flood"`},
		{[]string{"rtt"}, "-url is required"},
		{[]string{"rtt", "-url", "ws://x/", "-tunnels", "0"}, "-tunnels: 0"},
		{[]string{"rtt", "-url", "ws://x/", "-size", "0"}, "-size: 0; accepted 1 to"},
		{[]string{"rtt", "-url", "ws://x/", "-rate", "-1"}, "-rate: -1"},
		{[]string{"rtt", "-url", "ws://x/", "-duration", "0s"}, "-duration: 0s"},
		{[]string{"rtt", "-url", "ws://x/", "-warmup", "-1s"}, "-warmup: -1s"},
		{[]string{"cpu", "-url", "ws://x/", "-rounds", "0"}, "-rounds: 0; at least 1"},
		{[]string{"cpu", "-url", "ws://x/", "-warmup", "-1s"}, "-warmup: -1s; 0 or more"},
		{[]string{"rtt", "-url", "ws://x/", "-rounds", "4"}, "-rounds 4: rounds alternate with the direct baseline; give -direct URL"},
		{[]string{"rtt", "-url", "ws://x/", "-direct", "ws://d/", "-rounds", "0"}, "-rounds: 0; at least 1"},
		{[]string{"rtt", "-url", "ws://x/", "-direct", "ws://d/", "-rounds", "many"}, `invalid value "many" for flag -rounds`},
		{[]string{"throughput", "-url", "ws://x/sink", "-warmup", "-2s"}, "-warmup: -2s; 0 or more"},
		{[]string{"mixed", "-url", "ws://x/sink"}, "give the upstream's root"},
		{[]string{"mixed", "-url", "ws://x/", "-chatty", "0"}, "at least 1 chatty tunnel"},
		{[]string{"mixed", "-url", "ws://x/", "-duration", "100ms"}, "-duration: 100ms; at least 1s"},
		{[]string{"cpu", "-url", "ws://x/", "-pid", "x"}, `"x" is not a process id`},
		{[]string{"throughput", "-url", "ws://x/", "-mode", "echo"}, "-mode echo needs an upstream that echoes whole frames"},
		{[]string{"idle", "-url", "ws://x/", "-pid", "-3"}, `-pid: "-3" is not a process id`},
		{[]string{"idle", "-url", "ws://x/", "-pid", "1,x"}, `-pid: "x" is not a process id`},
		{[]string{"idle", "-url", "ws://x/", "extra"}, `unexpected argument "extra"`},
		{[]string{"throughput", "-url", "ws://x/"}, "-mode sink needs an upstream that discards"},
		{[]string{"throughput", "-url", "ws://x/", "-mode", "both"}, `-mode: "both"; accepted sink or echo`},
		{[]string{"idle", "-url", "ws://x/", "-pid", "1073741824"}, "-pid: read RSS of process 1073741824"},
		{[]string{"handshakes", "-url", "ws://x/", "-duration", "-1s"}, "-duration: -1s"},
		{[]string{"cpu", "-url", "ws://x/", "-rate", "0"}, "-rate: 0; a positive number"},
		{[]string{"cpu", "-url", "ws://x/", "-duration", "500ms"}, "-duration: 500ms; at least 1s"},
		{[]string{"cpu", "-url", "ws://x/", "-size", "0"}, "-size: 0; accepted 1 to"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), tc.args, &stdout, &stderr); code != 2 {
				t.Errorf("exit %d, want 2", code)
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("stderr lacks %q:\n%s", tc.want, stderr.String())
			}
		})
	}
}

// TestHandshakesUnreachableFails: a relay that opens no tunnel fails the run rather than reporting zero.
func TestHandshakesUnreachableFails(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"handshakes", "-url", "ws://127.0.0.1:1/", "-tunnels", "1", "-duration", "300ms"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "no tunnel opened to ws://127.0.0.1:1/") {
		t.Errorf("exit %d, stderr %q; want 1 and why no tunnel opened", code, stderr.String())
	}
}

func TestUnreachableRelayFails(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"rtt", "-url", "ws://127.0.0.1:1/", "-tunnels", "1", "-duration", "1s"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "open tunnel 0 to ws://127.0.0.1:1/") {
		t.Errorf("exit %d, stderr %q; want 1 and the tunnel that failed", code, stderr.String())
	}
}
