package main

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Percentiles summarizes a set of durations.
type Percentiles struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P90   time.Duration `json:"p90_ns"`
	P99   time.Duration `json:"p99_ns"`
	P999  time.Duration `json:"p999_ns"`
	Max   time.Duration `json:"max_ns"`
}

// summarize sorts d in place and returns its nearest-rank percentiles: the p-th percentile is the smallest
// value with at least p% of the values at or below it. An empty set gives zeros.
func summarize(d []time.Duration) Percentiles {
	if len(d) == 0 {
		return Percentiles{}
	}
	slices.Sort(d)
	rank := func(p float64) time.Duration {
		// ceil(p/100 * n); the epsilon keeps 99.9 % of 1000 at rank 999 despite floating point.
		i := int(math.Ceil(p*float64(len(d))/100 - 1e-9))
		return d[min(max(i, 1), len(d))-1]
	}
	return Percentiles{Count: len(d), P50: rank(50), P90: rank(90), P99: rank(99), P999: rank(99.9), Max: d[len(d)-1]}
}

// procRSS returns the resident set size of process pid in bytes, from /proc/PID/status (VmRSS).
func procRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read RSS of process %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse VmRSS of process %d: %q: %w", pid, line, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("process %d: no VmRSS in /proc/%d/status", pid, pid)
}

// tcpMemBytes returns the kernel's TCP socket memory in bytes, from /proc/net/sockstat ("TCP: ... mem N",
// N in pages). It does not count what the kernel holds in psock queues for sockmap (DATAPATH.md, hazard 5).
func tcpMemBytes() (int64, error) {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return 0, fmt.Errorf("read /proc/net/sockstat: %w", err)
	}
	return parseSockstatTCPMem(string(b), int64(os.Getpagesize()))
}

func parseSockstatTCPMem(sockstat string, pageSize int64) (int64, error) {
	for _, line := range strings.Split(sockstat, "\n") {
		rest, ok := strings.CutPrefix(line, "TCP:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		for i := 0; i+1 < len(f); i += 2 {
			if f[i] == "mem" {
				pages, err := strconv.ParseInt(f[i+1], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("sockstat TCP mem %q: %w", f[i+1], err)
				}
				return pages * pageSize, nil
			}
		}
	}
	return 0, fmt.Errorf("no TCP mem in /proc/net/sockstat")
}
