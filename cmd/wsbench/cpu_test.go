package main

import (
	"strings"
	"testing"
	"time"
)

const procStat = `cpu  206033 0 317744 1367738 1589 0 54885 300 0 0
cpu0 103000 0 158000 683000 800 0 27000 150 0 0
cpu1 103033 0 159744 684738 789 0 27885 150 0 0
intr 123 4 5
ctxt 987
`

func TestParseProcStat(t *testing.T) {
	got, err := parseProcStat(procStat)
	if err != nil {
		t.Fatal(err)
	}
	if got.Idle != 1367738+1589 || got.Softirq != 54885 || got.Ctxt != 987 || got.CPUs != 2 {
		t.Errorf("parseProcStat = %+v; want idle %d (idle+iowait), softirq 54885, ctxt 987, 2 CPUs", got, 1367738+1589)
	}
	for _, bad := range []struct{ name, stat, want string }{
		{"empty", "", "is not \"cpu user"},
		{"not cpu first", "intr 1 2\ncpu 1 2 3 4 5\n", "is not \"cpu user"},
		{"short", "cpu 1 2 3 4 5 6\ncpu0 1 2 3 4\n", "is not \"cpu user"},
		{"not a number", "cpu 1 2 3 x 5 6 7 8\ncpu0 1\n", `"x"`},
		{"negative", "cpu 1 2 3 4 -5 6 7 8\ncpu0 1\n", `"-5"`},
		{"bad softirq", "cpu 1 2 3 4 5 6 y 8\ncpu0 1\n", `"y"`},
		{"bad ctxt", "cpu 1 2 3 4 5 6 7 8\ncpu0 1\nctxt many\n", `ctxt "many"`},
		{"no per-cpu line", "cpu 1 2 3 4 5 6 7 8\nintr 1\n", "no cpuN line"},
	} {
		if _, err := parseProcStat(bad.stat); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s: parseProcStat error %v; want one containing %s", bad.name, err, bad.want)
		}
	}
}

func TestCostOf(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(idleTicks int64, cpus int, sec float64) cpuTimes {
		return cpuTimes{Idle: idleTicks, CPUs: cpus, At: t0.Add(time.Duration(sec * float64(time.Second)))}
	}
	for _, tc := range []struct {
		name          string
		before, after cpuTimes
		messages      int64
		wantBusy      float64 // CPU seconds
		wantUtil      float64
		wantUSPerMsg  float64
		wantErr       string
	}{
		// Two CPUs for 1 s is 2 CPU-seconds; 100 ticks (1 s) of them idle leaves 1 s busy.
		{"half busy", at(1000, 2, 0), at(1100, 2, 1), 1000, 1, 0.5, 1000, ""},
		{"all idle", at(1000, 2, 0), at(1400, 2, 2), 10, 0, 0, 0, ""},
		// Tick rounding can show more idle than wall time allows: clamped to zero busy.
		{"idle over capacity", at(0, 1, 0), at(101, 1, 1), 10, 0, 0, 0, ""},
		{"fully busy", at(50, 4, 0), at(50, 4, 0.5), 2000, 2, 1, 1000, ""},
		{"cpu count changed", at(0, 2, 0), at(10, 3, 1), 10, 0, 0, 0, "2 CPUs before, 3 after"},
		{"no time passed", at(0, 2, 1), at(0, 2, 1), 10, 0, 0, 0, "no time passed"},
		{"idle went back", at(500, 2, 0), at(400, 2, 1), 10, 0, 0, 0, "no time passed"},
		{"no messages", at(0, 2, 0), at(10, 2, 1), 0, 0, 0, 0, "no message was echoed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := costOf(tc.before, tc.after, tc.messages, time.Second)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("costOf error %v; want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			near := func(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }
			if !near(got.CPUSeconds, tc.wantBusy) || !near(got.Utilization, tc.wantUtil) ||
				!near(got.USPerMessage, tc.wantUSPerMsg) || got.Messages != tc.messages {
				t.Errorf("costOf = %+v; want busy %v s, utilization %v, %v µs/message", got, tc.wantBusy, tc.wantUtil, tc.wantUSPerMsg)
			}
		})
	}
}
