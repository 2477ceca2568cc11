// Package auto is the per-tunnel policy of `--datapath auto` where the kernel engine runs: each plain tunnel
// starts on the engine the policy names (Policy.Start) and moves between the kernel (sockmap) and the event
// loop (copy) as its traffic changes (docs/datapath.md, "auto per tunnel"). The package is pure: Decide
// takes a sample of a tunnel's counters and its history and says whether to move it, and why; Measured
// derives the policy from what a message costs on each engine, as the relay measured it at start; the relay
// gathers the counters and moves the pairs.
package auto

import (
	"fmt"
	"math"
	"time"
)

// Engine is where a tunnel runs, as the policy sees it.
type Engine int8

const (
	// Kernel is the sockmap engine.
	Kernel Engine = iota
	// Loop is the copy engine's event loop.
	Loop
)

func (e Engine) String() string {
	if e == Kernel {
		return "sockmap"
	}
	return "copy"
}

// Reason says why a tunnel moves; it labels sockrelay_tunnel_moves_total.
type Reason string

const (
	// ReasonDemotions: a kernel tunnel kept reaching its held limit (small-segment bulk, issue 16), so most
	// of its bytes passed through userspace anyway, at a higher cost than the loop's.
	ReasonDemotions Reason = "demotions"
	// ReasonChatty: a kernel tunnel carried many small segments a second; each costs the kernel a work item
	// and about three context switches, more than the loop pays per message.
	ReasonChatty Reason = "chatty"
	// ReasonQuiet: a tunnel moved no byte for Policy.QuietFor, on the engine that is not Policy.Idle.
	ReasonQuiet Reason = "quiet"
	// ReasonCalm: a tunnel that left the kernel for being chatty now carries few segments a second.
	ReasonCalm Reason = "calm"
	// ReasonLargeSegments: a loop tunnel that did not leave the kernel for demotions reads large segments,
	// which the kernel moves for less.
	ReasonLargeSegments Reason = "large_segments"
	// ReasonBusy: a loop tunnel read at least Policy.BusySegments a second, where a message measured
	// cheaper in the kernel than on the loop.
	ReasonBusy Reason = "busy"
	// ReasonForced: a test's policy moved it (Policy.Flip).
	ReasonForced Reason = "forced"
)

// Reasons lists every Reason a relay's policy moves a tunnel for, for metrics to start at 0 (ReasonForced is
// only ever a test's).
var Reasons = []Reason{ReasonDemotions, ReasonChatty, ReasonQuiet, ReasonCalm, ReasonLargeSegments, ReasonBusy}

// Policy is the thresholds. Rates are per second of the sample; a sample shorter than Interval/2 (the
// sampler ran late or early) is still a valid rate.
type Policy struct {
	// Interval is how often the sampler reads every auto tunnel's counters.
	Interval time.Duration
	// Start is the engine a new tunnel starts on; Idle, the one a tunnel with no byte either way for
	// QuietFor moves to (the cheaper one per idle tunnel).
	Start, Idle Engine
	// LeaveDemotions: a kernel tunnel demoted this many times within one sample moves to the loop.
	LeaveDemotions uint64
	// ChattySegments and ChattyBytesPerSegment: a kernel tunnel whose directions averaging at most
	// ChattyBytesPerSegment bytes a segment carry at least ChattySegments segments a second together, with
	// no bulk direction (larger segments, CalmSegments a second or more), moves to the loop, unless a busy
	// rule holds it in the kernel (BusySegments).
	ChattySegments        float64
	ChattyBytesPerSegment float64
	// CalmSegments: a loop tunnel that left the kernel for being chatty goes back below this many
	// segments (reads) a second (0: never). Well under ChattySegments, so that a tunnel near one threshold
	// does not cross back and forth (hysteresis).
	CalmSegments float64
	// LargeBytesPerSegment: a loop tunnel that did not leave the kernel for demotions goes back when its
	// directions whose reads average at least this many bytes read at least CalmSegments a second together
	// (0: never).
	LargeBytesPerSegment float64
	// BusySegments: a loop tunnel that did not leave the kernel for demotions moves to the kernel once it
	// reads at least this many segments a second, both directions together (0: never), and a kernel tunnel
	// reading at least half as many is never chatty: it stays (holdsBusy).
	BusySegments float64
	// QuietFor: a tunnel not on Idle with no byte either way for this long moves to Idle.
	QuietFor time.Duration
	// MinDwell is the least time a tunnel stays on an engine before it may move again; MaxDwell caps the
	// dwell, which doubles each time a tunnel comes back to an engine it left less than 4 dwells before.
	// A tunnel's first move needs no dwell: one sample's clear evidence moves it off its first engine,
	// and nothing has moved it before, so nothing can oscillate yet.
	MinDwell, MaxDwell time.Duration
	// MovesPerSecond caps the moves the sampler starts, all tunnels together; MaxInFlight caps the moves
	// running at once (a move off the kernel can wait on a reader that stopped).
	MovesPerSecond int
	MaxInFlight    int
	// Flip, for tests only, moves every tunnel to the other engine at every sample, after MinDwell.
	Flip bool
}

// KernelFirst is the first version's policy (configuration `auto.start: sockmap`): every tunnel starts in the
// kernel, leaves it when chatty or demoting, and comes back when calm, quiet or reading large segments
// (docs/datapath.md, "auto per tunnel", says why each value is what it is).
var KernelFirst = Policy{
	Interval:              time.Second,
	Start:                 Kernel,
	Idle:                  Kernel,
	LeaveDemotions:        2,
	ChattySegments:        1000,
	ChattyBytesPerSegment: 4096,
	CalmSegments:          200,
	LargeBytesPerSegment:  32 << 10,
	QuietFor:              10 * time.Second,
	MinDwell:              5 * time.Second,
	MaxDwell:              5 * time.Minute,
	MovesPerSecond:        200,
	MaxInFlight:           4,
}

// DefaultPolicy is KernelFirst: the thresholds tests start from.
var DefaultPolicy = KernelFirst

// LoopFirst is the policy where a message costs no more on the loop than in the kernel, or where that could
// not be measured (configuration `auto.start: copy`, and the fallback of `measured`): every tunnel starts on
// the loop, which also holds an idle tunnel for less (IdleTunnelBytes), and stays there. A tunnel that
// comes to the kernel another way (adopted from an upgrade whose old process ran it there) leaves it at its
// first sample with traffic (10 segments a second: any), or once quiet, or on demotions. Large segments
// do not move to the kernel: its bulk measured slower than the loop's, with demotions, on 6.18 (make bench).
var LoopFirst = Policy{
	Interval:              time.Second,
	Start:                 Loop,
	Idle:                  Loop,
	LeaveDemotions:        2,
	ChattySegments:        10,
	ChattyBytesPerSegment: math.Inf(1),
	QuietFor:              10 * time.Second,
	MinDwell:              5 * time.Second,
	MaxDwell:              5 * time.Minute,
	MovesPerSecond:        200,
	MaxInFlight:           4,
}

// KernelForBusy is the policy where a message measured clearly cheaper in the kernel than on the loop: a
// tunnel starts on the loop (idle, it costs less there), moves to the kernel once it reads BusySegments a
// second, and back once quiet, or on demotions (after which it goes back for being busy only once it has
// been quiet QuietFor on the loop).
var KernelForBusy = Policy{
	Interval:              time.Second,
	Start:                 Loop,
	Idle:                  Loop,
	LeaveDemotions:        2,
	ChattySegments:        math.Inf(1),
	ChattyBytesPerSegment: 4096,
	BusySegments:          200,
	QuietFor:              10 * time.Second,
	MinDwell:              5 * time.Second,
	MaxDwell:              5 * time.Minute,
	MovesPerSecond:        200,
	MaxInFlight:           4,
}

// Validate says which field is out of range.
func (p Policy) Validate() error {
	switch {
	case p.Interval <= 0:
		return fmt.Errorf("auto policy: interval %v: must be positive", p.Interval)
	case p.Start != Kernel && p.Start != Loop || p.Idle != Kernel && p.Idle != Loop:
		return fmt.Errorf("auto policy: start %d or idle %d is not an engine", p.Start, p.Idle)
	case p.ChattySegments <= 0 || p.CalmSegments < 0 || p.BusySegments < 0 || p.LargeBytesPerSegment < 0:
		return fmt.Errorf("auto policy: chatty segments %v/s must be positive, and calm %v/s, busy %v/s and large segment bytes %v not negative",
			p.ChattySegments, p.CalmSegments, p.BusySegments, p.LargeBytesPerSegment)
	case p.QuietFor <= 0:
		return fmt.Errorf("auto policy: quiet %v: must be positive", p.QuietFor)
	case p.CalmSegments >= p.ChattySegments && !p.Flip:
		return fmt.Errorf("auto policy: calm segments %.0f/s must be below chatty segments %.0f/s, or tunnels would oscillate",
			p.CalmSegments, p.ChattySegments)
	case p.MaxDwell < p.MinDwell:
		return fmt.Errorf("auto policy: max dwell %v below min dwell %v", p.MaxDwell, p.MinDwell)
	case p.MovesPerSecond <= 0 || p.MaxInFlight <= 0:
		return fmt.Errorf("auto policy: moves per second (%d) and moves in flight (%d) must be positive",
			p.MovesPerSecond, p.MaxInFlight)
	}
	return nil
}

// Moves says whether some rule of p can move a tunnel off e, whatever its traffic and history, so that
// the relay's sampler watches only the tunnels it may have to move. It errs towards true: a tunnel watched
// for nothing costs a sample a second; one left unwatched that a rule would move stays where it is.
func (p Policy) Moves(e Engine) bool {
	if p.Flip {
		return true
	}
	if e == Kernel {
		// Demotions leave the kernel at any LeaveDemotions, and no threshold turns that rule off.
		return true
	}
	// Off the loop: quiet (when the kernel is where idle tunnels go), calm (for a tunnel that left the
	// kernel for being chatty), large segments, busy. Each is off at 0.
	return p.Idle == Kernel || p.CalmSegments > 0 || p.LargeBytesPerSegment > 0 || p.BusySegments > 0
}

// Sample is what a tunnel's engine counted over Elapsed, each direction apart.
type Sample struct {
	Engine  Engine
	Elapsed time.Duration
	// Dirs are client → upstream, then upstream → client.
	Dirs [2]Flow
}

// Flow is one direction's counts over a sample: Bytes moved (on the kernel: redirected plus passed),
// Segments (the verdict's skbs, or the loop's reads) and Demotions.
type Flow struct {
	Bytes, Segments, Demotions uint64
}

// Total is both directions together.
func (s Sample) Total() Flow {
	a, b := s.Dirs[0], s.Dirs[1]
	return Flow{Bytes: a.Bytes + b.Bytes, Segments: a.Segments + b.Segments, Demotions: a.Demotions + b.Demotions}
}

// perSegment is the flow's bytes per segment, 0 without a segment.
func (f Flow) perSegment() float64 {
	if f.Segments == 0 {
		return 0
	}
	return float64(f.Bytes) / float64(f.Segments)
}

// History is what the policy keeps of a tunnel between samples. Observe and Moved update it.
type History struct {
	// On is how long the tunnel has been on its engine; Quiet, how long it has moved no byte; QuietMost,
	// the longest it went without a byte since it came to its engine.
	On, Quiet, QuietMost time.Duration
	// Dwell is the least time it stays on its engine now (0: Policy.MinDwell).
	Dwell time.Duration
	// Left is why it last left the kernel, "" while it never did.
	Left Reason
	// Moves is how many moves it made.
	Moves int
}

// Decision is Decide's answer.
type Decision struct {
	Move   bool
	To     Engine
	Reason Reason
}

// Observe adds a sample to h, before Decide.
func (h *History) Observe(s Sample) {
	h.On += s.Elapsed
	if s.Total().Bytes == 0 {
		h.Quiet += s.Elapsed
	} else {
		h.Quiet = 0
	}
	h.QuietMost = max(h.QuietMost, h.Quiet)
}

// Moved records that the tunnel moved as d said. A tunnel has two engines, so a move back is to the engine
// it left h.On ago: within four dwells of leaving it, the dwell doubles (up to MaxDwell), so that a tunnel
// whose traffic sits between two classes moves ever more rarely; a move after a longer stay starts from
// MinDwell again.
func (h *History) Moved(p Policy, from Engine, d Decision) {
	dwell := max(h.Dwell, p.MinDwell)
	if h.Moves > 0 && h.On < 4*dwell {
		h.Dwell = min(2*dwell, p.MaxDwell)
	} else {
		h.Dwell = p.MinDwell
	}
	if from == Kernel {
		h.Left = d.Reason
	}
	h.On, h.Quiet, h.QuietMost = 0, 0, 0
	h.Moves++
}

// Decide says whether a tunnel whose latest sample is s, and whose history (s observed) is h, should move,
// where and why.
func Decide(p Policy, s Sample, h History) Decision {
	if s.Elapsed <= 0 || h.Moves > 0 && h.On < max(h.Dwell, p.MinDwell) {
		return Decision{}
	}
	if p.Flip {
		return Decision{Move: true, To: 1 - s.Engine, Reason: ReasonForced}
	}
	secs := s.Elapsed.Seconds()
	total := s.Total()
	segRate := float64(total.Segments) / secs
	switch s.Engine {
	case Kernel:
		switch {
		case total.Demotions >= p.LeaveDemotions:
			return Decision{Move: true, To: Loop, Reason: ReasonDemotions}
		case !p.holdsBusy(segRate) && p.chatty(s, secs):
			return Decision{Move: true, To: Loop, Reason: ReasonChatty}
		case p.Idle == Loop && h.Quiet >= p.QuietFor:
			return Decision{Move: true, To: Loop, Reason: ReasonQuiet}
		}
	case Loop:
		switch {
		case p.Idle == Kernel && h.Quiet >= p.QuietFor:
			return Decision{Move: true, To: Kernel, Reason: ReasonQuiet}
		case h.Left == ReasonDemotions && h.QuietMost < p.QuietFor:
			// Its bulk would demote again: only once it has been quiet QuietFor on the loop may it go back
			// (where Idle is the loop, quiet moves nothing, and the tunnel would stay here for life).
		case h.Left == ReasonChatty && total.Bytes > 0 && segRate < p.CalmSegments:
			return Decision{Move: true, To: Kernel, Reason: ReasonCalm}
		case p.largeSegments(s, secs):
			return Decision{Move: true, To: Kernel, Reason: ReasonLargeSegments}
		case p.BusySegments > 0 && segRate >= p.BusySegments:
			return Decision{Move: true, To: Kernel, Reason: ReasonBusy}
		}
	}
	return Decision{}
}

// holdsBusy says whether a kernel tunnel reads enough segments a second to stay in the kernel under a busy
// rule (BusySegments set): half BusySegments, so that a tunnel near the busy rate does not cross back and
// forth (hysteresis, as calm is to chatty). Such a tunnel is never chatty: the busy rule says busy tunnels
// belong in the kernel, and a chatty rule that sent them to the loop (LoopFirst's at any traffic, or a
// configured chatty_segments) would have the busy rule bring them back one dwell later.
func (p Policy) holdsBusy(segRate float64) bool {
	return p.BusySegments > 0 && segRate >= p.BusySegments/2
}

// chatty says whether a kernel tunnel carries many small segments: its directions whose segments average
// at most ChattyBytesPerSegment carry ChattySegments a second together, and no direction is bulk (larger
// segments, at least CalmSegments of them a second). Each direction is classified apart: a chatty direction
// stays chatty beside a quiet one or one with a few large messages, whose bytes would hide its small
// segments in an average of both; bulk one way with small acks the other is bulk, which the kernel carries
// for less.
func (p Policy) chatty(s Sample, secs float64) bool {
	small := 0.0
	for _, f := range s.Dirs {
		rate := float64(f.Segments) / secs
		switch {
		case f.Segments == 0:
		case f.perSegment() <= p.ChattyBytesPerSegment:
			small += rate
		case rate >= p.CalmSegments:
			return false // a bulk direction
		}
	}
	return small >= p.ChattySegments
}

// largeSegments says whether a loop tunnel's directions whose reads average at least LargeBytesPerSegment
// read at least CalmSegments a second together: bulk of large segments, whatever the other direction
// carries (acks, small messages).
func (p Policy) largeSegments(s Sample, secs float64) bool {
	if p.LargeBytesPerSegment <= 0 {
		return false
	}
	large := 0.0
	for _, f := range s.Dirs {
		if f.Segments > 0 && f.perSegment() >= p.LargeBytesPerSegment {
			large += float64(f.Segments) / secs
		}
	}
	return large >= p.CalmSegments
}
