package auto

import (
	"fmt"
	"slices"
)

// What an idle tunnel costs on each engine, in bytes of memory: not measured at start (the kernel's slab
// moves by more than a few hundred tunnels' worth while other processes run, and a start cannot wait for
// thousands of idle pairs), but taken from make bench on Linux 6.18 (docs/bench/RESULTS.md): the relay's
// RSS per idle tunnel (copy 1520 B, sockmap 3085 B at best) plus the machine's kernel slab per tunnel
// beyond copy's (a psock and its sockhash entries: 23.7 KB against 20.7 KB, so about 3000 B more).
const (
	LoopIdleBytes   = 1520
	KernelIdleBytes = 3085 + 3000
)

// Costs are what the relay measured at start, on this host, of a 64-byte message relayed on each engine:
// context switches, machine-wide, per message, in rounds that alternate the engines and a direct path with
// no relay. Counts, not times: contention from other processes on a shared host stretches a round, and
// changes the number of context switches a message costs far less.
type Costs struct {
	// Kernel, Loop and Direct are each round's context switches per message on the kernel engine, the
	// event loop and the direct path, less the background's (the same index is the same round); a round
	// that did not complete is left out of all three.
	Kernel, Loop, Direct []float64
	// BusyKernel, BusyLoop and BusyDirect are machine busy CPU µs per message over all the rounds together:
	// /proc/stat counts it in ticks of 10 ms, too coarse for one round. Logged, not decided on.
	BusyKernel, BusyLoop, BusyDirect float64
	// HostBusy and HostBusyAfter are the fractions of the machine's CPU time that were busy just before
	// and just after the rounds, while the relay sent nothing: other processes' work.
	HostBusy, HostBusyAfter float64
	// Background is the machine's context switches a second just before the rounds, while the relay sent
	// nothing: each round's count is less this rate over the round's time (Kernel, Loop and Direct are
	// net of it), so that the slower path is not charged more of other processes' switches.
	Background float64
	// Err is why the measurement stopped short, if it did.
	Err error
}

// MinRounds is how many complete rounds a measurement needs to decide on.
const MinRounds = 3

// MaxHostBusy is the most of the machine's CPU time that other work may take before the rounds, and after
// them, for the costs to be conclusive. On a loaded host the kernel's context switches per message fell by half (its work
// items run on CPUs already awake, several at a time), and one moment's load must not decide the policy
// for the relay's life: an in-process measurement of 64-byte round trips on a 2-vCPU VM at load average
// 4-5 once said the kernel was cheaper (0.83 against 1.09 context switches a message, every round), while
// make bench's 100 tunnels on an idle one say 3.85 against 1.82.
const MaxHostBusy = 0.5

// Margin is how much cheaper, as a fraction of the dearer, an engine must be per message in the median of
// the rounds, and ahead in every round, for the costs to be conclusive. Every round, because on a busy
// 2-vCPU host the kernel's count per message was seen to fall by half in some runs (0.5-1.2 against
// 1.8-2.4 context switches), in most of their rounds: one verdict from such a run must not decide.
const Margin = 0.10

// relay returns the engine's context switches per message minus the direct path's in the same round (what
// the relay adds), per round.
func (c Costs) relay(engine []float64) []float64 {
	out := make([]float64, 0, len(engine))
	for i, v := range engine {
		if i < len(c.Direct) {
			out = append(out, v-c.Direct[i])
		}
	}
	return out
}

// median is the middle of vs (the mean of the two middle ones for an even count); 0 for none.
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(vs))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Verdict is what the measured costs say: which engine a message costs less on, or that they do not say.
type Verdict string

const (
	// VerdictLoopCheaper: the loop added fewer context switches per message than the kernel in every
	// round, by at least Margin in the median.
	VerdictLoopCheaper Verdict = "loop_cheaper"
	// VerdictKernelCheaper: the same, the other way.
	VerdictKernelCheaper Verdict = "kernel_cheaper"
	// VerdictInconclusive: too few rounds, a host busy past MaxHostBusy before or after them, rounds
	// that disagree, or a difference within Margin.
	VerdictInconclusive Verdict = "inconclusive"
)

// Verdict compares the engines' medians of what the relay adds per message.
func (c Costs) Verdict() Verdict {
	k, l := c.relay(c.Kernel), c.relay(c.Loop)
	if len(k) < MinRounds || len(l) != len(k) || max(c.HostBusy, c.HostBusyAfter) > MaxHostBusy {
		return VerdictInconclusive
	}
	mk, ml := median(k), median(l)
	if max(mk, ml) <= 0 {
		return VerdictInconclusive
	}
	loopAhead, kernelAhead := 0, 0
	for i := range k {
		switch {
		case l[i] < k[i]:
			loopAhead++
		case k[i] < l[i]:
			kernelAhead++
		}
	}
	switch {
	case loopAhead == len(k) && ml <= (1-Margin)*mk:
		return VerdictLoopCheaper
	case kernelAhead == len(k) && mk <= (1-Margin)*ml:
		return VerdictKernelCheaper
	}
	return VerdictInconclusive
}

// Medians are the medians of what the relay adds per message on each engine (context switches), for the
// log.
func (c Costs) Medians() (kernel, loop float64) {
	return median(c.relay(c.Kernel)), median(c.relay(c.Loop))
}

// Measured is the policy the costs call for, and why in words. Idle tunnels cost less on the loop
// (LoopIdleBytes, KernelIdleBytes), so every tunnel starts there and goes back there once quiet; what the
// measurement decides is whether busy tunnels go to the kernel: only where a message measured clearly
// cheaper there. Inconclusive costs get LoopFirst, the policy of the host the figures were measured on.
func Measured(c Costs) (Policy, string) {
	switch v := c.Verdict(); v {
	case VerdictKernelCheaper:
		return KernelForBusy, "a message costs less in the kernel here: busy tunnels go there"
	case VerdictLoopCheaper:
		return LoopFirst, "a message costs less on the loop here, and an idle tunnel does too: tunnels stay on the loop"
	default:
		why := "the costs measured here do not say which engine a message costs less on"
		switch {
		case c.Err != nil:
			why = fmt.Sprintf("the measurement stopped short (%v)", c.Err)
		case c.HostBusy > MaxHostBusy:
			why = fmt.Sprintf("the host was %.0f%% busy before the measurement (over %.0f%%)", 100*c.HostBusy, 100*MaxHostBusy)
		case c.HostBusyAfter > MaxHostBusy:
			why = fmt.Sprintf("the host was %.0f%% busy after the measurement (over %.0f%%)", 100*c.HostBusyAfter, 100*MaxHostBusy)
		}
		return LoopFirst, why + ": the default, tunnels stay on the loop"
	}
}
