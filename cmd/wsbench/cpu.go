package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// cpuWorkload measures what relaying costs in CPU at a fixed message rate: the whole machine's busy time
// (/proc/stat) per message while tunnels echo small messages at rate messages per second in all. The whole
// machine, not the relay's process, because a sockmap relay's work happens in softirq, charged to no
// process. With -direct, the same load sent straight to the upstream (load generator, upstream, loopback
// TCP) alternates with the load through the relay, rounds times each (D,T,D,T,...): the relay's cost is the
// median of the differences of each pair, given with their min and max, since on a shared machine one
// measurement of either swings by more than the gaps between relays.
//
// Beside CPU time it counts, per message, what contention barely changes and what says why a datapath
// costs what it costs: the machine's context switches and softirq time, the work-queue executions
// (tracefs), and with -pid the relay's own CPU time and context switches.
type cpuWorkload struct {
	commonFlags
	direct   string
	size     int
	rate     float64
	duration time.Duration
	rounds   int
	pids     []int
	// warmup is how long the target's load runs, unmeasured, before the first round: a per-tunnel policy
	// (--datapath auto) moves tunnels only after a sample of their traffic and a dwell, which a first
	// round on fresh tunnels would measure before it.
	warmup time.Duration
}

func parseCPU(args []string, stderr io.Writer) (*cpuWorkload, string, error) {
	w := &cpuWorkload{}
	err := w.parse("cpu", args, stderr, 100, func(fs *flag.FlagSet) {
		fs.StringVar(&w.direct, "direct", "", "the upstream's own `URL`: the same load sent there, alternating with the target's, is the baseline subtracted")
		fs.IntVar(&w.rounds, "rounds", 3, "measurements of the target (each after one of -direct, with -direct)")
		fs.Func("pid", "`PID[,PID...]` of the relay's processes, whose own CPU time and context switches to count", func(v string) error {
			pids, err := parsePIDs(v)
			w.pids = pids
			return err
		})
		fs.IntVar(&w.size, "size", 32, "message size in `BYTES`")
		fs.Float64Var(&w.rate, "rate", 10000, "messages per second, all tunnels together")
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long each measurement lasts")
		fs.DurationVar(&w.warmup, "warmup", 0, "how long the target's load runs, unmeasured, before the first round")
	})
	if err != nil {
		return nil, "", err
	}
	switch {
	case w.size < 1 || w.size > 16<<20:
		return nil, "", fmt.Errorf("-size: %d; accepted 1 to %d", w.size, 16<<20)
	case w.rate <= 0:
		return nil, "", fmt.Errorf("-rate: %v; a positive number of messages per second", w.rate)
	case w.rounds < 1:
		return nil, "", fmt.Errorf("-rounds: %d; at least 1", w.rounds)
	case w.warmup < 0:
		return nil, "", fmt.Errorf("-warmup: %v; 0 or more", w.warmup)
	case w.duration < time.Second:
		// /proc/stat counts in 10 ms ticks: a shorter run would measure mostly rounding.
		return nil, "", fmt.Errorf("-duration: %v; at least 1s", w.duration)
	}
	return w, w.jsonPath, nil
}

// cpuSample is one measurement: the machine's CPU per message and the counts beside it. The process fields
// are present with -pid, the work-queue field where tracefs counts it.
type cpuSample struct {
	cpuCost
	CtxtPerMessage             float64  `json:"ctxt_per_message"`
	SoftirqUSPerMessage        float64  `json:"softirq_us_per_message"`
	WorkqueuePerMessage        *float64 `json:"workqueue_per_message,omitempty"`
	ProcessUSPerMessage        *float64 `json:"process_cpu_us_per_message,omitempty"`
	ProcessVoluntaryPerMessage *float64 `json:"process_voluntary_switches_per_message,omitempty"`
	ProcessInvolPerMessage     *float64 `json:"process_involuntary_switches_per_message,omitempty"`
}

// spread is the median of a set of figures with its min and max.
type spread struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// spreadOf returns v's median (the mean of the middle two for an even count), min and max, leaving v as it
// was. An empty v gives zeros.
func spreadOf(v []float64) spread {
	if len(v) == 0 {
		return spread{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return spread{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// String formats a spread as "median (min–max)".
func (s spread) String() string {
	return fmt.Sprintf("%.2f (%.2f–%.2f)", s.Median, s.Min, s.Max)
}

// pairDiffs returns, for each round, the target's figure less the direct one measured just before it. It
// stops at the first figure either lacks (a pointer field that is nil), returning nil: a count the kernel
// did not give is left out, not taken as zero.
func pairDiffs(target, direct []cpuSample, figure func(cpuSample) *float64) []float64 {
	var out []float64
	for i := range min(len(target), len(direct)) {
		t, d := figure(target[i]), figure(direct[i])
		if t == nil || d == nil {
			return nil
		}
		out = append(out, *t-*d)
	}
	return out
}

// figures returns one figure of every sample, or nil when a sample lacks it.
func figures(samples []cpuSample, figure func(cpuSample) *float64) []float64 {
	var out []float64
	for _, s := range samples {
		v := figure(s)
		if v == nil {
			return nil
		}
		out = append(out, *v)
	}
	return out
}

// cpuResult is what cpu measured. A message is one round trip: the message and its echo both cross the
// relay. The relay_ spreads are target less direct, round by round, present only with -direct; the
// process_ ones only with -pid.
type cpuResult struct {
	Tunnels       int         `json:"tunnels"`
	Size          int         `json:"size"`
	Rate          float64     `json:"rate"`
	Rounds        int         `json:"rounds"`
	WarmupSeconds float64     `json:"target_warmup_seconds"`
	Target        []cpuSample `json:"target"`
	Direct        []cpuSample `json:"direct,omitempty"`
	Achieved      float64     `json:"achieved_rate"` // the median of the target's rounds
	WorkqueueNote string      `json:"workqueue_note,omitempty"`

	MachineUS          spread  `json:"machine_cpu_us_per_message"`
	RelayUS            *spread `json:"relay_cpu_us_per_message,omitempty"`
	RelayCtxt          *spread `json:"relay_ctxt_per_message,omitempty"`
	RelaySoftirqUS     *spread `json:"relay_softirq_us_per_message,omitempty"`
	RelayWorkqueue     *spread `json:"relay_workqueue_per_message,omitempty"`
	ProcessUS          *spread `json:"process_cpu_us_per_message,omitempty"`
	ProcessVoluntary   *spread `json:"process_voluntary_switches_per_message,omitempty"`
	ProcessInvoluntary *spread `json:"process_involuntary_switches_per_message,omitempty"`
}

func (r *cpuResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-10s %-10s %-7s %-8s %-10s %-10s %-10s %-10s\n",
		"tunnels", "rate", "achieved", "round", "target", "cpu %", "µs/msg", "ctxt/msg", "softirq µs")
	for i, t := range r.Target {
		row := func(name string, s cpuSample) {
			fmt.Fprintf(w, "%-8d %-10.0f %-10.0f %-7d %-8s %-10.1f %-10.1f %-10.2f %-10.2f\n", r.Tunnels, r.Rate,
				float64(s.Messages)/s.Seconds, i+1, name, s.Utilization*100, s.USPerMessage, s.CtxtPerMessage, s.SoftirqUSPerMessage)
		}
		if i < len(r.Direct) {
			row("direct", r.Direct[i])
		}
		row("target", t)
	}
	line := func(name string, s *spread) {
		if s != nil {
			fmt.Fprintf(w, "%-40s %s\n", name, s)
		}
	}
	fmt.Fprintln(w, "per message, median (min–max) over the rounds:")
	line("machine µs", &r.MachineUS)
	line("relay adds: machine µs", r.RelayUS)
	line("relay adds: context switches", r.RelayCtxt)
	line("relay adds: softirq µs (tick-sampled)", r.RelaySoftirqUS)
	line("relay adds: work-queue executions", r.RelayWorkqueue)
	line("relay process: µs (tick-sampled)", r.ProcessUS)
	line("relay process: voluntary switches", r.ProcessVoluntary)
	line("relay process: involuntary switches", r.ProcessInvoluntary)
	if r.WorkqueueNote != "" {
		fmt.Fprintf(w, "work-queue executions not counted: %s\n", r.WorkqueueNote)
	}
}

func (w *cpuWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	res := &cpuResult{Tunnels: w.tunnels, Size: w.size, Rate: w.rate, Rounds: w.rounds, WarmupSeconds: w.warmup.Seconds()}
	wq, err := openWorkqueueCounter()
	if err != nil {
		res.WorkqueueNote = err.Error()
	} else {
		defer wq.close()
	}
	var direct []*websocket.Conn
	if w.direct != "" {
		if direct, err = dialAll(ctx, w.direct, w.tunnels, progress); err != nil {
			return nil, fmt.Errorf("direct baseline: %w", err)
		}
		defer closeAll(direct)
	}
	target, err := dialAll(ctx, w.url, w.tunnels, progress)
	if err != nil {
		return nil, err
	}
	defer closeAll(target)
	if w.warmup > 0 {
		if _, _, err := w.load(ctx, w.url, target, w.warmup, progress); err != nil {
			return nil, fmt.Errorf("warm up: %w", err)
		}
	}
	for range w.rounds {
		if direct != nil {
			d, err := w.measure(ctx, w.direct, direct, nil, wq, progress)
			if err != nil {
				return nil, fmt.Errorf("direct baseline: %w", err)
			}
			res.Direct = append(res.Direct, d)
		}
		t, err := w.measure(ctx, w.url, target, w.pids, wq, progress)
		if err != nil {
			return nil, err
		}
		res.Target = append(res.Target, t)
	}
	res.summarize(w.pids != nil)
	return res, nil
}

// summarize computes the spreads of r's samples.
func (r *cpuResult) summarize(withPIDs bool) {
	machine := func(s cpuSample) *float64 { return &s.USPerMessage }
	rate := func(s cpuSample) *float64 { v := float64(s.Messages) / s.Seconds; return &v }
	r.MachineUS = spreadOf(figures(r.Target, machine))
	r.Achieved = spreadOf(figures(r.Target, rate)).Median
	some := func(v []float64) *spread {
		if v == nil {
			return nil
		}
		s := spreadOf(v)
		return &s
	}
	if r.Direct != nil {
		r.RelayUS = some(pairDiffs(r.Target, r.Direct, machine))
		r.RelayCtxt = some(pairDiffs(r.Target, r.Direct, func(s cpuSample) *float64 { return &s.CtxtPerMessage }))
		r.RelaySoftirqUS = some(pairDiffs(r.Target, r.Direct, func(s cpuSample) *float64 { return &s.SoftirqUSPerMessage }))
		r.RelayWorkqueue = some(pairDiffs(r.Target, r.Direct, func(s cpuSample) *float64 { return s.WorkqueuePerMessage }))
	}
	if withPIDs {
		r.ProcessUS = some(figures(r.Target, func(s cpuSample) *float64 { return s.ProcessUSPerMessage }))
		r.ProcessVoluntary = some(figures(r.Target, func(s cpuSample) *float64 { return s.ProcessVoluntaryPerMessage }))
		r.ProcessInvoluntary = some(figures(r.Target, func(s cpuSample) *float64 { return s.ProcessInvolPerMessage }))
	}
}

// counters is every reading a measurement takes before and after the load.
type counters struct {
	cpu       cpuTimes
	proc      procCounts
	workqueue int64
}

func readCounters(pids []int, wq *workqueueCounter) (counters, error) {
	var c counters
	var err error
	if c.cpu, err = readCPUTimes(); err != nil {
		return c, err
	}
	if pids != nil {
		if c.proc, err = readProcCounts(pids); err != nil {
			return c, err
		}
	}
	if wq != nil {
		if c.workqueue, err = wq.read(); err != nil {
			return c, err
		}
	}
	return c, nil
}

// measure sends the load on conns, already open to url, for duration and accounts the machine's CPU and
// counts to it, and those of pids (when not nil) and the work queues (wq, when not nil).
func (w *cpuWorkload) measure(ctx context.Context, url string, conns []*websocket.Conn, pids []int,
	wq *workqueueCounter, progress io.Writer) (cpuSample, error) {
	before, err := readCounters(pids, wq)
	if err != nil {
		return cpuSample{}, err
	}
	trips, elapsed, err := w.load(ctx, url, conns, w.duration, progress)
	if err != nil {
		return cpuSample{}, err
	}
	after, err := readCounters(pids, wq)
	if err != nil {
		return cpuSample{}, err
	}
	cost, err := costOf(before.cpu, after.cpu, trips, elapsed)
	if err != nil {
		return cpuSample{}, err
	}
	return sampleOf(cost, before, after, pids != nil, wq != nil), nil
}

// load sends the load on conns, already open to url, for duration and returns how many messages were
// echoed and how long it ran.
func (w *cpuWorkload) load(ctx context.Context, url string, conns []*websocket.Conn, duration time.Duration,
	progress io.Writer) (int64, time.Duration, error) {
	pinger := &rttWorkload{size: w.size, rate: w.rate / float64(w.tunnels), drain: rttDrain}
	var trips atomic.Int64
	elapsed, err := runConns(ctx, conns, duration, progress,
		func() string { return fmt.Sprintf("%s: %d messages", url, trips.Load()) },
		func(ctx context.Context, i int, c *websocket.Conn) error {
			_, err := pinger.pingPong(ctx, c, i, &trips)
			return err
		})
	return trips.Load(), elapsed, err
}

// sampleOf divides the counts between two readings by the messages cost covers.
func sampleOf(cost cpuCost, before, after counters, withPIDs, withWorkqueue bool) cpuSample {
	msgs := float64(cost.Messages)
	perMsg := func(delta int64) float64 { return float64(delta) / msgs }
	tickUS := func(delta int64) float64 { return perMsg(delta) * 1e6 / clockTicksPerSecond }
	s := cpuSample{cpuCost: cost, CtxtPerMessage: perMsg(after.cpu.Ctxt - before.cpu.Ctxt),
		SoftirqUSPerMessage: tickUS(after.cpu.Softirq - before.cpu.Softirq)}
	if withWorkqueue {
		v := perMsg(after.workqueue - before.workqueue)
		s.WorkqueuePerMessage = &v
	}
	if withPIDs {
		us, vol, invol := tickUS(after.proc.Ticks-before.proc.Ticks), perMsg(after.proc.Voluntary-before.proc.Voluntary),
			perMsg(after.proc.Involuntary-before.proc.Involuntary)
		s.ProcessUSPerMessage, s.ProcessVoluntaryPerMessage, s.ProcessInvolPerMessage = &us, &vol, &invol
	}
	return s
}
