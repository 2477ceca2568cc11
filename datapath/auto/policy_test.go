package auto

import (
	"strings"
	"testing"
	"time"
)

func TestDecide(t *testing.T) {
	p := DefaultPolicy
	settled := History{On: time.Minute}
	sec := time.Second
	cases := []struct {
		name string
		s    Sample
		h    History
		want Decision
	}{
		{"kernel idle stays", Sample{Engine: Kernel, Elapsed: sec}, settled, Decision{}},
		{"kernel chatty leaves", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 2000 * 100, Segments: 2000}}}, settled,
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"kernel chatty over two seconds is a rate", Sample{Engine: Kernel, Elapsed: 2 * sec, Dirs: [2]Flow{{Bytes: 1500 * 100, Segments: 1500}}}, settled,
			Decision{}},
		{"kernel at the chatty rate with large segments stays", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 2000 * 64 << 10, Segments: 2000}}}, settled,
			Decision{}},
		{"kernel below the chatty rate stays", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 999 * 100, Segments: 999}}}, settled,
			Decision{}},
		{"kernel demoting twice leaves", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 1 << 30, Segments: 1 << 20, Demotions: 2}}}, settled,
			Decision{Move: true, To: Loop, Reason: ReasonDemotions}},
		{"kernel demoting once stays", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 1 << 30, Segments: 1 << 14, Demotions: 1}}}, settled,
			Decision{}},
		{"kernel chatty within the dwell stays", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 5000 * 100, Segments: 5000}}}, History{On: 4 * sec, Moves: 1},
			Decision{}},
		{"kernel chatty within a doubled dwell stays", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 5000 * 100, Segments: 5000}}}, History{On: 9 * sec, Dwell: 10 * sec, Moves: 2},
			Decision{}},
		{"kernel chatty at its first sample leaves: the first move needs no dwell", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 5000 * 100, Segments: 5000}}}, History{On: sec},
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"loop quiet returns", Sample{Engine: Loop, Elapsed: sec}, History{On: time.Minute, Quiet: 10 * sec, Left: ReasonDemotions},
			Decision{Move: true, To: Kernel, Reason: ReasonQuiet}},
		{"loop quiet not long enough stays", Sample{Engine: Loop, Elapsed: sec}, History{On: time.Minute, Quiet: 9 * sec, Left: ReasonChatty},
			Decision{}},
		{"loop calm after chatty returns", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 100 * 100, Segments: 100}}}, History{On: time.Minute, Left: ReasonChatty},
			Decision{Move: true, To: Kernel, Reason: ReasonCalm}},
		{"loop between calm and chatty stays (hysteresis)", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 500 * 100, Segments: 500}}}, History{On: time.Minute, Left: ReasonChatty},
			Decision{}},
		{"loop large segments returns", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 500 * 64 << 10, Segments: 500}}}, History{On: time.Minute, Left: ReasonChatty},
			Decision{Move: true, To: Kernel, Reason: ReasonLargeSegments}},
		{"loop bulk that demoted stays while busy", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 500 * 64 << 10, Segments: 500}}}, History{On: time.Minute, Left: ReasonDemotions},
			Decision{}},
		{"loop bulk that demoted stays while slow", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 10, Segments: 1}}}, History{On: time.Minute, Left: ReasonDemotions},
			Decision{}},
		// Each direction is classified apart (Dirs: client → upstream, upstream → client).
		{"kernel chatty one way, quiet the other, leaves", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{}, {Bytes: 1500 * 64, Segments: 1500}}}, settled,
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"kernel chatty both ways, each below the rate, leaves", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 600 * 64, Segments: 600}, {Bytes: 600 * 64, Segments: 600}}}, settled,
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"kernel chatty one way, a few large messages the other, leaves", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 1500 * 64, Segments: 1500}, {Bytes: 10 << 20, Segments: 10}}}, settled,
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"kernel bulk one way, acks the other, stays", Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 300 * 8 << 10, Segments: 300}, {Bytes: 2000 * 16, Segments: 2000}}}, settled,
			Decision{}},
		{"loop bulk one way, acks the other, returns", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 2000 * 16, Segments: 2000}, {Bytes: 500 * 64 << 10, Segments: 500}}}, History{On: time.Minute, Left: ReasonChatty},
			Decision{Move: true, To: Kernel, Reason: ReasonLargeSegments}},
		{"loop chatty one way, a few large messages the other, stays", Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 1500 * 64, Segments: 1500}, {Bytes: 10 << 20, Segments: 10}}}, History{On: time.Minute, Left: ReasonChatty},
			Decision{}},
		{"a zero-length sample decides nothing", Sample{Engine: Kernel, Dirs: [2]Flow{{Demotions: 5}}}, settled, Decision{}},
		{"loop idle for one sample stays", Sample{Engine: Loop, Elapsed: sec}, History{On: time.Minute, Quiet: sec}, Decision{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Decide(p, tc.s, tc.h); got != tc.want {
				t.Errorf("Decide(%+v, %+v) = %+v, want %+v", tc.s, tc.h, got, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name string
		p    Policy
		s    Sample
		h    History
		want Decision
	}{
		// LoopFirst: tunnels start on the loop and stay; a kernel tunnel (adopted) leaves at any traffic.
		{"loop first: busy loop tunnel stays", LoopFirst, Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 5000 * 100, Segments: 5000}}}, History{On: sec},
			Decision{}},
		{"loop first: loop bulk of large segments stays", LoopFirst, Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 500 * 64 << 10, Segments: 500}}}, History{On: time.Minute},
			Decision{}},
		{"loop first: quiet loop tunnel stays", LoopFirst, Sample{Engine: Loop, Elapsed: sec}, History{On: time.Minute, Quiet: time.Minute},
			Decision{}},
		{"loop first: kernel tunnel with 10 segments a second leaves at its first sample", LoopFirst, Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 10 * 64, Segments: 10}}}, History{On: sec},
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"loop first: kernel bulk of large segments leaves", LoopFirst, Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 500 * 64 << 10, Segments: 500}}}, History{On: sec},
			Decision{Move: true, To: Loop, Reason: ReasonChatty}},
		{"loop first: kernel tunnel below 10 segments a second stays", LoopFirst, Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 9 * 64, Segments: 9}}}, History{On: sec},
			Decision{}},
		{"loop first: quiet kernel tunnel leaves", LoopFirst, Sample{Engine: Kernel, Elapsed: sec}, History{On: 10 * sec, Quiet: 10 * sec},
			Decision{Move: true, To: Loop, Reason: ReasonQuiet}},
		// KernelForBusy: start on the loop, busy to the kernel, quiet back.
		{"kernel for busy: loop tunnel at the busy rate leaves at its first sample", KernelForBusy, Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 100 * 64, Segments: 100}, {Bytes: 100 * 64, Segments: 100}}}, History{On: sec},
			Decision{Move: true, To: Kernel, Reason: ReasonBusy}},
		{"kernel for busy: loop tunnel below the busy rate stays", KernelForBusy, Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 199 * 64, Segments: 199}}}, History{On: sec},
			Decision{}},
		{"kernel for busy: busy loop tunnel that demoted stays", KernelForBusy, Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 5000 * 64, Segments: 5000}}}, History{On: time.Minute, Moves: 1, Left: ReasonDemotions},
			Decision{}},
		{"kernel for busy: busy kernel tunnel stays however chatty", KernelForBusy, Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 50000 * 64, Segments: 50000}}}, History{On: time.Minute, Moves: 1},
			Decision{}},
		{"kernel for busy: kernel tunnel with some traffic stays", KernelForBusy, Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 64, Segments: 1}}}, History{On: time.Minute, Moves: 1},
			Decision{}},
		{"kernel for busy: quiet kernel tunnel goes back", KernelForBusy, Sample{Engine: Kernel, Elapsed: sec}, History{On: time.Minute, Quiet: 10 * sec, Moves: 1},
			Decision{Move: true, To: Loop, Reason: ReasonQuiet}},
		{"kernel for busy: demoting kernel tunnel leaves", KernelForBusy, Sample{Engine: Kernel, Elapsed: sec, Dirs: [2]Flow{{Bytes: 1 << 30, Segments: 1 << 20, Demotions: 2}}}, History{On: time.Minute, Moves: 1},
			Decision{Move: true, To: Loop, Reason: ReasonDemotions}},
		{"kernel for busy: back on the loop within the dwell stays", KernelForBusy, Sample{Engine: Loop, Elapsed: sec, Dirs: [2]Flow{{Bytes: 5000 * 64, Segments: 5000}}}, History{On: 4 * sec, Moves: 2},
			Decision{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.p.Validate(); err != nil {
				t.Fatal(err)
			}
			if got := Decide(tc.p, tc.s, tc.h); got != tc.want {
				t.Errorf("Decide(%+v, %+v) = %+v, want %+v", tc.s, tc.h, got, tc.want)
			}
		})
	}
	flip := DefaultPolicy
	flip.Flip, flip.MinDwell = true, 0
	for _, e := range []Engine{Kernel, Loop} {
		if got := Decide(flip, Sample{Engine: e, Elapsed: time.Millisecond}, History{}); got != (Decision{Move: true, To: 1 - e, Reason: ReasonForced}) {
			t.Errorf("Flip on %v: %+v", e, got)
		}
	}
}

// TestHistory checks the bookkeeping Decide relies on: quiet time grows only while no byte moves, and
// a tunnel that comes back soon after leaving waits twice as long before it may move again, up to MaxDwell.
func TestHistory(t *testing.T) {
	p := DefaultPolicy
	var h History
	for _, b := range []uint64{0, 0, 5, 0, 0, 0} {
		h.Observe(Sample{Engine: Loop, Elapsed: time.Second, Dirs: [2]Flow{{Bytes: b}}})
	}
	if h.Quiet != 3*time.Second || h.On != 6*time.Second {
		t.Fatalf("after quiet, quiet, bytes, quiet ×3: Quiet %v On %v, want 3s and 6s", h.Quiet, h.On)
	}
	// First move: the dwell is the minimum. Each quick return doubles it, to the cap.
	h.Moved(p, Kernel, Decision{Move: true, To: Loop, Reason: ReasonChatty})
	if h.Dwell != p.MinDwell || h.Left != ReasonChatty || h.On != 0 || h.Moves != 1 {
		t.Fatalf("after the first move: %+v", h)
	}
	var dwells []time.Duration
	for range 8 {
		h.On = max(h.Dwell, p.MinDwell) // it moves as soon as it may
		h.Moved(p, Loop, Decision{Move: true, To: Kernel, Reason: ReasonCalm})
		dwells = append(dwells, h.Dwell)
	}
	want := []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second,
		160 * time.Second, 5 * time.Minute, 5 * time.Minute, 5 * time.Minute}
	for i := range want {
		if dwells[i] != want[i] {
			t.Fatalf("dwells after quick returns: %v, want %v", dwells, want)
		}
	}
	if h.Left != ReasonChatty {
		t.Errorf("moves off the loop changed why it left the kernel: %q", h.Left)
	}
	// A long stay starts over.
	h.On = time.Hour
	h.Moved(p, Kernel, Decision{Move: true, To: Loop, Reason: ReasonDemotions})
	if h.Dwell != p.MinDwell || h.Left != ReasonDemotions {
		t.Errorf("after a long stay: dwell %v left %q, want %v and demotions", h.Dwell, h.Left, p.MinDwell)
	}
}

// TestNoOscillation feeds a tunnel whose traffic sits just across the chatty threshold on the kernel and just
// across the calm one on the loop (the worst case: the counts of its engine say move every time) for an hour
// of samples, and counts its moves: the doubling dwell keeps them to a handful.
func TestNoOscillation(t *testing.T) {
	p := DefaultPolicy
	var h History
	e := Kernel
	moves := 0
	for range 3600 {
		s := Sample{Engine: e, Elapsed: time.Second, Dirs: [2]Flow{{Bytes: 500 * 100, Segments: 500}, {Bytes: 500 * 100, Segments: 500}}}
		if e == Loop {
			s.Dirs[0] = Flow{Bytes: 150 * 100, Segments: 150}
			s.Dirs[1] = Flow{}
		}
		h.Observe(s)
		if d := Decide(p, s, h); d.Move {
			h.Moved(p, e, d)
			e = d.To
			moves++
		}
	}
	t.Logf("%d moves in an hour", moves)
	if moves > 20 {
		t.Errorf("%d moves in an hour of samples that sit across both thresholds, want at most 20", moves)
	}
	if moves < 2 {
		t.Errorf("%d moves: the case does not exercise the dwell", moves)
	}
}

func TestValidate(t *testing.T) {
	for _, p := range []Policy{KernelFirst, LoopFirst, KernelForBusy} {
		if err := p.Validate(); err != nil {
			t.Fatalf("%+v: %v", p, err)
		}
	}
	for _, tc := range []struct {
		name   string
		change func(*Policy)
		want   string
	}{
		{"calm at the chatty threshold", func(p *Policy) { p.CalmSegments = p.ChattySegments }, "calm segments"},
		{"no chatty threshold", func(p *Policy) { p.ChattySegments = 0 }, "chatty segments"},
		{"negative busy", func(p *Policy) { p.BusySegments = -1 }, "busy"},
		{"no quiet time", func(p *Policy) { p.QuietFor = 0 }, "quiet"},
		{"a start that is no engine", func(p *Policy) { p.Start = 7 }, "start"},
		{"max dwell below min dwell", func(p *Policy) { p.MaxDwell = p.MinDwell - 1 }, "max dwell"},
	} {
		bad := DefaultPolicy
		tc.change(&bad)
		if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %q", tc.name, err, tc.want)
		}
	}
}

// TestPolicyMoves: Moves says, for each policy the relay runs (the configuration's overrides and the tests'
// Flip included), whether a tunnel on each engine can move, and agrees with Decide: where it says no, no
// sample and history of a grid moves a tunnel off that engine, and where it says yes, one does.
func TestPolicyMoves(t *testing.T) {
	over := func(p Policy, set func(*Policy)) Policy { set(&p); return p }
	flip := over(LoopFirst, func(p *Policy) { p.Flip, p.MinDwell, p.MaxDwell = true, 0, 0 })
	for _, tc := range []struct {
		name         string
		p            Policy
		kernel, loop bool
	}{
		{"LoopFirst", LoopFirst, true, false},
		{"KernelForBusy", KernelForBusy, true, true},
		{"KernelFirst", KernelFirst, true, true},
		{"a test's Flip over LoopFirst", flip, true, true},
		{"busy_segments over LoopFirst (auto.start: copy)", over(LoopFirst, func(p *Policy) { p.BusySegments = 300 }), true, true},
		{"chatty_segments, quiet and dwells over LoopFirst", over(LoopFirst, func(p *Policy) {
			p.ChattySegments, p.QuietFor, p.MinDwell, p.MaxDwell = 500, time.Minute, time.Second, time.Hour
		}), true, false},
		{"busy_segments over KernelForBusy", over(KernelForBusy, func(p *Policy) { p.BusySegments = 50 }), true, true},
		{"KernelFirst without calm or large segments: quiet still moves loop tunnels", over(KernelFirst, func(p *Policy) {
			p.CalmSegments, p.LargeBytesPerSegment = 0, 0
		}), true, true},
		{"LoopFirst with calm only", over(LoopFirst, func(p *Policy) { p.CalmSegments = 5 }), true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.p.Validate(); err != nil {
				t.Fatal(err)
			}
			for e, want := range map[Engine]bool{Kernel: tc.kernel, Loop: tc.loop} {
				if got := tc.p.Moves(e); got != want {
					t.Errorf("Moves(%s) = %v, want %v", e, got, want)
				}
				if moved, s, h := anyMove(tc.p, e); moved != tc.p.Moves(e) {
					t.Errorf("Moves(%s) = %v, but Decide moves one on the grid: %v (sample %+v, history %+v)", e, tc.p.Moves(e), moved, s, h)
				}
			}
		})
	}
}

// anyMove looks for a sample and a history, on a grid of rates, segment sizes, demotions, quiet times and
// reasons for having left the kernel, for which Decide moves a tunnel on e under p.
func anyMove(p Policy, e Engine) (bool, Sample, History) {
	var flows []Flow
	for _, segs := range []uint64{0, 1, 10, 100, 300, 2000, 1 << 20} {
		for _, size := range []uint64{1, 64, 4096, 8 << 10, 64 << 10} {
			for _, dem := range []uint64{0, 1, 2, 10} {
				flows = append(flows, Flow{Bytes: segs * size, Segments: segs, Demotions: dem})
			}
		}
	}
	for _, left := range []Reason{"", ReasonChatty, ReasonDemotions, ReasonQuiet, ReasonBusy} {
		for _, quiet := range []time.Duration{0, time.Second, time.Hour} {
			for _, moves := range []int{0, 3} {
				h := History{On: 2 * time.Hour, Quiet: quiet, Left: left, Moves: moves}
				for _, a := range flows {
					for _, b := range []Flow{{}, a, {Bytes: 16 * 2000, Segments: 2000}} {
						s := Sample{Engine: e, Elapsed: time.Second, Dirs: [2]Flow{a, b}}
						if Decide(p, s, h).Move {
							return true, s, h
						}
					}
				}
			}
		}
	}
	return false, Sample{}, History{}
}

func simulate(p Policy, start Engine, n int, traffic func(i int) [2]Flow) []Engine {
	var h History
	on := start
	out := make([]Engine, 0, n)
	for i := range n {
		s := Sample{Engine: on, Elapsed: time.Second, Dirs: traffic(i)}
		h.Observe(s)
		if d := Decide(p, s, h); d.Move {
			h.Moved(p, on, d)
			on = d.To
		}
		out = append(out, on)
	}
	return out
}

func steady(rate, size uint64) func(int) [2]Flow {
	f := Flow{Bytes: rate * size, Segments: rate}
	return func(int) [2]Flow { return [2]Flow{f, f} }
}

func TestBusySegmentsKeepBusyTunnelsInTheKernel(t *testing.T) {
	for _, tc := range []struct {
		name   string
		p      Policy
		busy   float64
		chatty float64 // 0: the policy's
	}{
		{"loop first", LoopFirst, 200, 0},
		{"kernel for busy with chatty set", KernelForBusy, 200, 50},
		{"kernel for busy with chatty set above busy", KernelForBusy, 200, 1000},
		{"kernel first", KernelFirst, 200, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.p
			p.BusySegments = tc.busy
			if tc.chatty != 0 {
				p.ChattySegments = tc.chatty
			}
			if err := p.Validate(); err != nil {
				t.Fatal(err)
			}
			for _, start := range []Engine{Loop, Kernel} {
				got := simulate(p, start, 120, steady(1000, 64))
				if got[len(got)-1] != Kernel || got[60] != Kernel {
					t.Errorf("from %v, a tunnel at 2000 segments a second is on %v after 60 s and %v after 120 s, want sockmap",
						start, got[60], got[len(got)-1])
				}
			}
		})
	}
}

func TestSteadyTrafficSettles(t *testing.T) {
	for _, base := range []struct {
		name string
		p    Policy
	}{{"KernelFirst", KernelFirst}, {"LoopFirst", LoopFirst}, {"KernelForBusy", KernelForBusy}} {
		for _, busy := range []float64{0, 50, 200, 1000, 5000} {
			for _, chatty := range []float64{0, 10, 150, 1000, 5000} {
				p := base.p
				if busy != 0 {
					p.BusySegments = busy
				}
				if chatty != 0 {
					p.ChattySegments = chatty
				}
				if p.Validate() != nil {
					continue
				}
				for _, rate := range []uint64{1, 5, 20, 60, 120, 300, 600, 1500, 3000, 8000} {
					for _, size := range []uint64{64, 64 << 10} {
						for _, start := range []Engine{Loop, Kernel} {
							got := simulate(p, start, 3600, steady(rate/2, size))
							moves := 0
							for i := 1; i < len(got); i++ {
								if got[i] != got[i-1] {
									moves++
								}
							}
							if got[0] != start {
								moves++
							}
							if moves > 2 {
								t.Errorf("%s busy %v chatty %v: %d segments/s of %d bytes from %v: %d moves in an hour",
									base.name, busy, chatty, rate, size, start, moves)
							}
						}
					}
				}
			}
		}
	}
}

func TestKernelForBusyComesBackAfterQuiet(t *testing.T) {
	got := simulate(KernelForBusy, Loop, 200, func(i int) [2]Flow {
		switch {
		case i < 10:
			return [2]Flow{{Bytes: 64000, Segments: 1000}}
		case i < 20:
			return [2]Flow{{Bytes: 1 << 30, Segments: 1 << 16, Demotions: 3}}
		case i < 80:
			return [2]Flow{}
		default:
			return [2]Flow{{Bytes: 64000, Segments: 1000}}
		}
	})
	if got[15] != Loop {
		t.Fatal("did not leave on demotions")
	}
	if got[len(got)-1] != Kernel {
		t.Error("pinned on the loop after one demotion burst")
	}
	// Quiet for less than QuietFor is not enough: its bulk may resume.
	got = simulate(KernelForBusy, Loop, 200, func(i int) [2]Flow {
		switch {
		case i < 10:
			return [2]Flow{{Bytes: 64000, Segments: 1000}}
		case i < 20:
			return [2]Flow{{Bytes: 1 << 30, Segments: 1 << 16, Demotions: 3}}
		case i < 25:
			return [2]Flow{}
		default:
			return [2]Flow{{Bytes: 64000, Segments: 1000}}
		}
	})
	if got[len(got)-1] != Loop {
		t.Error("back in the kernel after 5 s quiet, less than QuietFor")
	}
}
