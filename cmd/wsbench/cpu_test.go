package main

import (
	"slices"
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

func TestSpreadOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []float64
		want spread
	}{
		{"empty", nil, spread{}},
		{"one", []float64{4}, spread{4, 4, 4, 1}},
		{"odd, unsorted", []float64{9, -1, 3}, spread{3, -1, 9, 3}},
		{"even: mean of the middle two", []float64{10, 2, 4, 100}, spread{7, 2, 100, 4}},
		{"outlier moves min-max, not the median", []float64{5, 5.5, 6, 60, 5.2}, spread{5.5, 5, 60, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := slices.Clone(tc.in)
			if got := spreadOf(in); got != tc.want {
				t.Errorf("spreadOf(%v) = %+v, want %+v", tc.in, got, tc.want)
			}
			if !slices.Equal(in, tc.in) {
				t.Errorf("spreadOf reordered its input: %v", in)
			}
		})
	}
}

func TestPairDiffs(t *testing.T) {
	sample := func(us float64, wq *float64) cpuSample {
		return cpuSample{cpuCost: cpuCost{USPerMessage: us}, WorkqueuePerMessage: wq}
	}
	f := func(v float64) *float64 { return &v }
	machine := func(s cpuSample) *float64 { return &s.USPerMessage }
	workqueue := func(s cpuSample) *float64 { return s.WorkqueuePerMessage }
	for _, tc := range []struct {
		name           string
		target, direct []cpuSample
		figure         func(cpuSample) *float64
		want           []float64
	}{
		// Each target round less the direct round just before it, not the other rounds' mean.
		{"pairs", []cpuSample{sample(50, nil), sample(90, nil), sample(60, nil)},
			[]cpuSample{sample(40, nil), sample(65, nil), sample(45, nil)}, machine, []float64{10, 25, 15}},
		{"a relay cheaper than direct gives a negative difference", []cpuSample{sample(30, nil)},
			[]cpuSample{sample(40, nil)}, machine, []float64{-10}},
		{"a missing count is left out, not zero", []cpuSample{sample(1, f(3)), sample(1, nil)},
			[]cpuSample{sample(1, f(1)), sample(1, f(1))}, workqueue, nil},
		{"counts present", []cpuSample{sample(1, f(3)), sample(1, f(2.5))},
			[]cpuSample{sample(1, f(1)), sample(1, f(0.5))}, workqueue, []float64{2, 2}},
		{"no direct", []cpuSample{sample(1, nil)}, nil, machine, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := pairDiffs(tc.target, tc.direct, tc.figure); !slices.Equal(got, tc.want) {
				t.Errorf("pairDiffs = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestSampleOf: counts between two readings, per message; process and work-queue figures only when read.
func TestSampleOf(t *testing.T) {
	cost := cpuCost{Messages: 1000}
	before := counters{cpu: cpuTimes{Softirq: 100, Ctxt: 5000}, proc: procCounts{Ticks: 10, Voluntary: 100, Involuntary: 7}, workqueue: 40}
	after := counters{cpu: cpuTimes{Softirq: 102, Ctxt: 9000}, proc: procCounts{Ticks: 13, Voluntary: 1100, Involuntary: 57}, workqueue: 2040}
	s := sampleOf(cost, before, after, true, true)
	// 2 ticks of softirq = 20 ms over 1000 messages = 20 µs; 3 ticks of process CPU = 30 µs.
	if s.CtxtPerMessage != 4 || s.SoftirqUSPerMessage != 20 || *s.WorkqueuePerMessage != 2 ||
		*s.ProcessUSPerMessage != 30 || *s.ProcessVoluntaryPerMessage != 1 || *s.ProcessInvolPerMessage != 0.05 {
		t.Errorf("sampleOf = %+v", s)
	}
	if s := sampleOf(cost, before, after, false, false); s.WorkqueuePerMessage != nil || s.ProcessUSPerMessage != nil {
		t.Errorf("sampleOf without pids or tracefs gave their figures: %+v", s)
	}
}
