package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
)

// A relay cannot be faster than no relay: when the upstream reached directly loses to a relay, the load
// generator or the upstream was the bottleneck of that row, or the machine was busy with something else,
// and the run's comparisons mean nothing. `wsbench bounds FILE` checks that on the rows of a whole run, which
// scripts/bench_report.py writes as JSON:
//
//	{"rows": [{"name": "bulk 64 KiB one way, Gbit/s", "better": "higher",
//	           "values": {"direct": 20.3, "sockrelay-copy": 4.1, "nginx": 3.2}}, ...]}
//
// It prints one line per row where direct does not bound a relay and exits 3, or says the run is valid.

// boundsRow is one row of a run: a figure per target, and which way is better.
type boundsRow struct {
	Name   string             `json:"name"`
	Better string             `json:"better"` // "higher" (throughput) or "lower" (latency)
	Values map[string]float64 `json:"values"`
}

// boundsViolation is a relay that beat direct in a row.
type boundsViolation struct {
	Row, Target   string
	Direct, Value float64
	Better        string
}

func (v boundsViolation) String() string {
	way := "below"
	if v.Better == "higher" {
		way = "above"
	}
	return fmt.Sprintf("%s: %s %s is %s direct %s", v.Row, v.Target, figure(v.Value), way, figure(v.Direct))
}

// figure formats a figure of a row: whole numbers from 100 up (µs, handshakes/s), three significant digits
// below (Gbit/s).
func figure(v float64) string {
	if math.Abs(v) >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.3g", v)
}

// checkBounds returns every (row, relay) where the relay did better than direct, in row order and, within a
// row, by target name. Equal counts as bounded. A row without a direct figure is an error: it cannot be
// checked, and a check that skips rows would call an invalid run valid.
func checkBounds(rows []boundsRow) ([]boundsViolation, error) {
	var out []boundsViolation
	for _, r := range rows {
		if r.Better != "higher" && r.Better != "lower" {
			return nil, fmt.Errorf("row %q: better %q; accepted higher or lower", r.Name, r.Better)
		}
		direct, ok := r.Values["direct"]
		if !ok {
			return nil, fmt.Errorf("row %q has no direct figure to bound the relays with", r.Name)
		}
		targets := make([]string, 0, len(r.Values))
		for t := range r.Values {
			if t != "direct" {
				targets = append(targets, t)
			}
		}
		slices.Sort(targets)
		for _, t := range targets {
			v := r.Values[t]
			if (r.Better == "higher" && v > direct) || (r.Better == "lower" && v < direct) {
				out = append(out, boundsViolation{Row: r.Name, Target: t, Direct: direct, Value: v, Better: r.Better})
			}
		}
	}
	return out, nil
}

// runBounds is `wsbench bounds FILE`. It returns the exit status: 0 valid, 3 invalid, 2 bad usage or input.
func runBounds(args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 {
		fmt.Fprintln(stderr, "usage: wsbench bounds FILE   (the rows of a run as JSON: see scripts/bench_report.py)")
		return 2
	}
	var in struct {
		Rows []boundsRow `json:"rows"`
	}
	b, err := os.ReadFile(args[0])
	if err == nil {
		err = json.Unmarshal(b, &in)
	}
	if err == nil && len(in.Rows) == 0 {
		err = errors.New("no rows")
	}
	if err != nil {
		fmt.Fprintf(stderr, "wsbench bounds: %s: %v\n", args[0], err)
		return 2
	}
	violations, err := checkBounds(in.Rows)
	if err != nil {
		fmt.Fprintf(stderr, "wsbench bounds: %s: %v\n", args[0], err)
		return 2
	}
	if len(violations) == 0 {
		fmt.Fprintf(stdout, "valid: direct bounds every relay in all %d rows\n", len(in.Rows))
		return 0
	}
	fmt.Fprintf(stdout, "INVALID: in %d place(s) a relay did better than no relay, so the load generator, the upstream or another load on the machine was the bottleneck there:\n", len(violations))
	for _, v := range violations {
		fmt.Fprintf(stdout, "- %s\n", v)
	}
	return 3
}
