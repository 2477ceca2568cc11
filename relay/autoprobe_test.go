package relay

import (
	"math"
	"strings"
	"testing"
	"time"
)

// TestLoadBetween: how busy the host was, and its context switches a second, from two readings of
// /proc/stat; CPU time that went backwards (iowait may) or did not pass is an error, not a wrapped uint64.
func TestLoadBetween(t *testing.T) {
	at := time.Unix(1000, 0)
	for _, tc := range []struct {
		name     string
		a, b     statReading
		busy     float64
		switches float64 // a second
		err      string
	}{
		{"a quarter busy", statReading{busy: 100, all: 1000, ctxt: 5000, at: at},
			statReading{busy: 110, all: 1040, ctxt: 6000, at: at.Add(200 * time.Millisecond)}, 0.25, 5000, ""},
		{"idle", statReading{busy: 100, all: 1000, ctxt: 5000, at: at},
			statReading{busy: 100, all: 1040, ctxt: 5000, at: at.Add(200 * time.Millisecond)}, 0, 0, ""},
		{"busy past all (ticks read apart)", statReading{busy: 100, all: 1000, at: at},
			statReading{busy: 150, all: 1040, at: at.Add(200 * time.Millisecond)}, 1, 0, ""},
		{"busy went backwards", statReading{busy: 100, all: 1000, at: at},
			statReading{busy: 90, all: 1040, at: at.Add(200 * time.Millisecond)}, 0, 0, ""},
		{"all went backwards (iowait)", statReading{busy: 100, all: 1000, at: at},
			statReading{busy: 110, all: 990, at: at.Add(200 * time.Millisecond)}, 0, 0, "no CPU time passed"},
		{"no CPU time", statReading{busy: 100, all: 1000, at: at},
			statReading{busy: 100, all: 1000, at: at.Add(200 * time.Millisecond)}, 0, 0, "no CPU time passed"},
		{"no wall time", statReading{busy: 100, all: 1000, at: at},
			statReading{busy: 110, all: 1040, at: at}, 0, 0, "no time passed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := loadBetween(tc.a, tc.b)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one saying %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if math.Abs(got.busy-tc.busy) > 1e-9 || math.Abs(got.switchesPerSec-tc.switches) > 1e-6 {
				t.Errorf("busy %v, %v switches a second; want %v, %v", got.busy, got.switchesPerSec, tc.busy, tc.switches)
			}
		})
	}
}

// TestLessBackground: a path's context switches over a round, less the host's own at the rate measured
// before the rounds over the round's time, so that a slower path is not charged more of other processes'
// switches; never below 0.
func TestLessBackground(t *testing.T) {
	for _, tc := range []struct {
		name       string
		switches   uint64
		background float64 // a second
		took       time.Duration
		want       float64
	}{
		{"no background", 800, 0, 20 * time.Millisecond, 800},
		{"background over the round", 800, 5000, 20 * time.Millisecond, 700},
		{"a slower round is charged more", 800, 5000, 40 * time.Millisecond, 600},
		{"a path that hardly switches (direct)", 1, 1771, 2425 * time.Microsecond, 0},
		{"no switch at all", 0, 5000, 20 * time.Millisecond, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := lessBackground(tc.switches, tc.background, tc.took); math.Abs(got-tc.want) > 1e-9 {
				t.Errorf("lessBackground(%d, %v, %v) = %v, want %v", tc.switches, tc.background, tc.took, got, tc.want)
			}
		})
	}
}
