package main

import (
	"bytes"
	"io"
	"slices"
	"testing"
	"time"
)

func TestRoundRatios(t *testing.T) {
	round := func(count int, p50, p99 time.Duration) rttRound {
		return rttRound{RTT: Percentiles{Count: count, P50: p50, P99: p99}}
	}
	us := time.Microsecond
	p99 := func(p Percentiles) time.Duration { return p.P99 }
	p50 := func(p Percentiles) time.Duration { return p.P50 }
	for _, tc := range []struct {
		name           string
		target, direct []rttRound
		q              func(Percentiles) time.Duration
		want           []float64
	}{
		// Each target round over the direct round of its own pair, not over the other rounds' direct.
		{"pairs", []rttRound{round(10, 50*us, 300*us), round(10, 60*us, 900*us)},
			[]rttRound{round(10, 40*us, 200*us), round(10, 50*us, 600*us)}, p99, []float64{1.5, 1.5}},
		{"p50", []rttRound{round(10, 50*us, 300*us), round(10, 60*us, 900*us)},
			[]rttRound{round(10, 40*us, 200*us), round(10, 50*us, 600*us)}, p50, []float64{1.25, 1.2}},
		// A whole slow pair (both sides ×2) gives the same ratio as a fast one.
		{"a slow minute moves both sides", []rttRound{round(10, 0, 100*us), round(10, 0, 200*us)},
			[]rttRound{round(10, 0, 80*us), round(10, 0, 160*us)}, p99, []float64{1.25, 1.25}},
		{"a relay faster than direct gives a ratio below 1", []rttRound{round(10, 0, 90*us)},
			[]rttRound{round(10, 0, 100*us)}, p99, []float64{0.9}},
		{"a pair without round trips on one side is left out", []rttRound{round(0, 0, 0), round(10, 0, 300*us)},
			[]rttRound{round(10, 0, 100*us), round(10, 0, 100*us)}, p99, []float64{3}},
		{"a direct round without round trips is left out", []rttRound{round(10, 0, 300*us)},
			[]rttRound{round(0, 0, 0)}, p99, nil},
		{"only whole pairs", []rttRound{round(10, 0, 200*us), round(10, 0, 200*us)},
			[]rttRound{round(10, 0, 100*us)}, p99, []float64{2}},
		{"no rounds", nil, nil, p99, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := roundRatios(tc.target, tc.direct, tc.q); !slices.Equal(got, tc.want) {
				t.Errorf("roundRatios = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestRoundOrder: direct first in every other pair, so that a drift through the run favours neither side.
func TestRoundOrder(t *testing.T) {
	for rounds, want := range map[int]string{1: "D T", 2: "D T T D", 5: "D T T D D T T D D T"} {
		if got := roundOrder(rounds); got != want {
			t.Errorf("roundOrder(%d) = %q, want %q", rounds, got, want)
		}
	}
}

func TestRoundsResult(t *testing.T) {
	w := &rttWorkload{commonFlags: commonFlags{tunnels: 2}, size: 32, rate: 10, rounds: 3, warmup: time.Second}
	ms := time.Millisecond
	side := func(p99s ...time.Duration) *rttSide {
		s := &rttSide{}
		for _, d := range p99s {
			s.all = append(s.all, d)
			s.rounds = append(s.rounds, rttRound{Seconds: 1, PerSecond: 1, RTT: summarize([]time.Duration{d})})
		}
		return s
	}
	// The second pair ran on a machine twice as slow: both sides doubled, the ratio did not.
	got, err := w.roundsResult(side(3*ms, 6*ms, 4*ms), side(2*ms, 4*ms, 2*ms))
	if err != nil {
		t.Fatal(err)
	}
	if want := (spread{Median: 1.5, Min: 1.5, Max: 2, N: 3}); got.P99Ratio != want || got.P50Ratio != want {
		t.Errorf("ratios p50 %+v, p99 %+v; want both %+v", got.P50Ratio, got.P99Ratio, want)
	}
	if got.Order != "D T T D D T" || got.Seconds != 3 || got.RTT.Count != 3 || got.DirectRTT.Max != 4*ms ||
		got.WarmupSeconds != 1 {
		t.Errorf("roundsResult = %+v", got)
	}
	if _, err := w.roundsResult(side(), side()); err == nil {
		t.Error("roundsResult without a round: no error")
	}
}

func TestParseRTTRounds(t *testing.T) {
	for _, tc := range []struct {
		name       string
		args       []string
		wantDirect string
		wantRounds int
	}{
		{"without -direct", nil, "", 3},
		{"-direct: 3 rounds unless told", []string{"-direct", "ws://d/"}, "ws://d/", 3},
		{"-direct -rounds", []string{"-direct", "ws://d/", "-rounds", "5"}, "ws://d/", 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, _, err := parseRTT(append([]string{"-url", "ws://t/"}, tc.args...), &bytes.Buffer{})
			if err != nil {
				t.Fatal(err)
			}
			if w.direct != tc.wantDirect || w.rounds != tc.wantRounds {
				t.Errorf("direct %q, rounds %d; want %q, %d", w.direct, w.rounds, tc.wantDirect, tc.wantRounds)
			}
		})
	}
}

// TestRateSendsFromTheFirstPeriod: at a fixed rate, each tunnel sends its first message at a random point
// of its first period, not a period later; at 1 message a second for 1 s, that is one round trip a tunnel,
// where a first send a period late would make none.
func TestRateSendsFromTheFirstPeriod(t *testing.T) {
	w, _, err := parseRTT([]string{"-url", echoServer(t), "-tunnels", "8", "-rate", "1", "-duration", "1s"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := w.run(t.Context(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// A round trip sent in the last moments can be cut by the end of the run: about one a tunnel, at least 4.
	if n := res.(*rttResult).RTT.Count; n < 4 || n > 8 {
		t.Errorf("%d round trips from 8 tunnels at 1/s for 1s; want about 8", n)
	}
}
