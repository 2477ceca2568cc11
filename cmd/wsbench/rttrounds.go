package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// With -direct, rtt measures the target and the upstream reached directly in one run, in alternating rounds:
// each side's tunnels are opened once and kept across the rounds, each side warms up once (-warmup), then
// -rounds pairs of rounds run one side after the other, direct first in the 1st, 3rd, ... pair and the target
// first in the 2nd, 4th, ... (D,T,T,D,D,T,...), so that a machine slowing down or speeding up through the run
// does not always land on the same side. Each percentile of a round is then divided by direct's in the
// same pair, and the ratio's median over the pairs, with its min and max, is what the run says: a minute
// when the whole machine is slower makes both sides of a pair slower, not one target of a run. Measured
// target by target, one after the other, the p99 at 1000 busy tunnels of one relay against the best peer
// swung from 0.76× to 1.46× between runs.

// rttDrain is how long a round trip in flight when a round ends gets to finish: the tunnels run again in
// the next round (see rttWorkload.drain).
const rttDrain = 5 * time.Second

// rttRound is one round of one side.
type rttRound struct {
	Seconds   float64     `json:"seconds"`
	PerSecond float64     `json:"round_trips_per_second"`
	RTT       Percentiles `json:"rtt"`
}

// rttRoundsResult is what rtt with -direct measured. RTT and DirectRTT pool every round trip of a side's
// rounds; the ratios are per pair of rounds, the target's percentile over direct's.
type rttRoundsResult struct {
	Tunnels       int         `json:"tunnels"`
	Size          int         `json:"size"`
	Rate          float64     `json:"rate_per_tunnel"`
	Rounds        int         `json:"rounds"`
	Order         string      `json:"order"`          // the sides in the order they ran, e.g. "D T T D"
	WarmupSeconds float64     `json:"warmup_seconds"` // each side's, once, before the first round
	Seconds       float64     `json:"seconds"`        // the target's measured time, all rounds
	PerSecond     float64     `json:"round_trips_per_second"`
	RTT           Percentiles `json:"rtt"`
	DirectRTT     Percentiles `json:"direct_rtt"`
	TargetRounds  []rttRound  `json:"target_rounds"`
	DirectRounds  []rttRound  `json:"direct_rounds"`
	P50Ratio      spread      `json:"p50_ratio"`
	P99Ratio      spread      `json:"p99_ratio"`
	CPUsAwake     bool        `json:"cpus_awake"`
}

// directFirst says whether direct runs first in pair round (from 0): in every other pair, so that a drift
// through the run favours neither side.
func directFirst(round int) bool { return round%2 == 0 }

// roundOrder is the order the sides run in over rounds pairs, "D" for direct and "T" for the target.
func roundOrder(rounds int) string {
	var b strings.Builder
	for i := range rounds {
		if i > 0 {
			b.WriteByte(' ')
		}
		if directFirst(i) {
			b.WriteString("D T")
		} else {
			b.WriteString("T D")
		}
	}
	return b.String()
}

// roundRatios returns, pair by pair, the target's percentile q over direct's. A pair where either side has
// no round trip is left out: it has no ratio.
func roundRatios(target, direct []rttRound, q func(Percentiles) time.Duration) []float64 {
	var out []float64
	for i := range min(len(target), len(direct)) {
		t, d := target[i].RTT, direct[i].RTT
		if t.Count == 0 || d.Count == 0 || q(d) <= 0 {
			continue
		}
		out = append(out, float64(q(t))/float64(q(d)))
	}
	return out
}

// rttSide is one side of an alternated run: its tunnels, its rounds and every round trip they measured.
type rttSide struct {
	url    string
	conns  []*websocket.Conn
	rounds []rttRound
	all    []time.Duration
}

// runRounds is rtt with -direct (see above).
func (w *rttWorkload) runRounds(ctx context.Context, progress io.Writer) (result, error) {
	w.drain = rttDrain
	w.measureFrom = time.Time{} // every round trip of a round counts; the warm-up is a run of its own
	direct, target := &rttSide{url: w.direct}, &rttSide{url: w.url}
	var err error
	if direct.conns, err = dialAll(ctx, direct.url, w.tunnels, progress); err != nil {
		return nil, fmt.Errorf("direct baseline: %w", err)
	}
	defer closeAll(direct.conns)
	if target.conns, err = dialAll(ctx, target.url, w.tunnels, progress); err != nil {
		return nil, err
	}
	defer closeAll(target.conns)
	if w.warmup > 0 {
		for _, s := range []*rttSide{direct, target} {
			if _, _, err := w.roundTrips(ctx, s.conns, w.warmup, progress); err != nil {
				return nil, fmt.Errorf("warm up %s: %w", s.url, err)
			}
		}
	}
	for i := range w.rounds {
		sides := []*rttSide{direct, target}
		if !directFirst(i) {
			sides = []*rttSide{target, direct}
		}
		for _, s := range sides {
			if err := w.measureRound(ctx, s, progress); err != nil {
				return nil, fmt.Errorf("round %d on %s: %w", i+1, s.url, err)
			}
		}
	}
	return w.roundsResult(target, direct)
}

// measureRound runs one round on s's tunnels and keeps what it measured.
func (w *rttWorkload) measureRound(ctx context.Context, s *rttSide, progress io.Writer) error {
	d, elapsed, err := w.roundTrips(ctx, s.conns, w.duration, progress)
	if err != nil {
		return err
	}
	s.all = append(s.all, d...)
	s.rounds = append(s.rounds, rttRound{Seconds: elapsed.Seconds(), PerSecond: float64(len(d)) / elapsed.Seconds(),
		RTT: summarize(d)})
	return nil
}

// roundsResult sums up both sides' rounds. A run where no pair has round trips on both sides has no ratio
// to give and is an error.
func (w *rttWorkload) roundsResult(target, direct *rttSide) (*rttRoundsResult, error) {
	p50 := roundRatios(target.rounds, direct.rounds, func(p Percentiles) time.Duration { return p.P50 })
	p99 := roundRatios(target.rounds, direct.rounds, func(p Percentiles) time.Duration { return p.P99 })
	if len(p99) == 0 {
		return nil, errors.New("no round with round trips on both sides: no ratio to direct")
	}
	var seconds float64
	for _, r := range target.rounds {
		seconds += r.Seconds
	}
	return &rttRoundsResult{Tunnels: w.tunnels, Size: w.size, Rate: w.rate, Rounds: w.rounds, Order: roundOrder(w.rounds),
		WarmupSeconds: w.warmup.Seconds(), Seconds: seconds, PerSecond: float64(len(target.all)) / seconds,
		RTT: summarize(target.all), DirectRTT: summarize(direct.all), TargetRounds: target.rounds,
		DirectRounds: direct.rounds, P50Ratio: spreadOf(p50), P99Ratio: spreadOf(p99), CPUsAwake: w.cpusAwake}, nil
}

func (r *rttRoundsResult) table(w io.Writer) {
	fmt.Fprintf(w, "%d tunnels, %d bytes, %d rounds of each side in the order %s\n", r.Tunnels, r.Size, r.Rounds, r.Order)
	fmt.Fprintf(w, "%-6s %-7s %-10s %-10s %s\n", "round", "side", "trips", "trips/s", percentileHeads)
	row := func(round, side string, s rttRound) {
		fmt.Fprintf(w, "%-6s %-7s %-10d %-10.0f %s\n", round, side, s.RTT.Count, s.PerSecond, s.RTT.cells())
	}
	for i := range min(len(r.TargetRounds), len(r.DirectRounds)) {
		n := fmt.Sprint(i + 1)
		if directFirst(i) {
			row(n, "direct", r.DirectRounds[i])
			row(n, "target", r.TargetRounds[i])
		} else {
			row(n, "target", r.TargetRounds[i])
			row(n, "direct", r.DirectRounds[i])
		}
	}
	var directSeconds float64
	for _, d := range r.DirectRounds {
		directSeconds += d.Seconds
	}
	row("all", "direct", rttRound{RTT: r.DirectRTT, PerSecond: float64(r.DirectRTT.Count) / directSeconds})
	row("all", "target", rttRound{RTT: r.RTT, PerSecond: r.PerSecond})
	fmt.Fprintf(w, "target ÷ direct in the same pair of rounds, median (min–max) over %d pairs:\n", r.P99Ratio.N)
	fmt.Fprintf(w, "%-6s %s\n", "p50", r.P50Ratio)
	fmt.Fprintf(w, "%-6s %s\n", "p99", r.P99Ratio)
}
