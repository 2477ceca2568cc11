package main

import (
	"errors"
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

// percentileHeads are the column heads of Percentiles.cells.
const percentileHeads = "p50       p90       p99       p99.9     max"

// cells formats p's percentiles in microseconds, in columns under percentileHeads.
func (p Percentiles) cells() string {
	return fmt.Sprintf("%-9s %-9s %-9s %-9s %-9s", us(p.P50), us(p.P90), us(p.P99), us(p.P999), us(p.Max))
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
// N in pages). It does not count what the kernel holds in psock queues for sockmap (docs/datapath.md, "Backpressure").
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

// slabBytes returns the kernel's slab memory in bytes, from /proc/meminfo ("Slab: N kB").
func slabBytes() (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("read /proc/meminfo: %w", err)
	}
	return parseMeminfoSlab(string(b))
}

func parseMeminfoSlab(meminfo string) (int64, error) {
	for _, line := range strings.Split(meminfo, "\n") {
		if v, ok := strings.CutPrefix(line, "Slab:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo: %q: %w", line, err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("/proc/meminfo: no Slab line")
}

// clockTicksPerSecond is USER_HZ, the unit of /proc/stat: 100 on every Linux architecture Go supports
// (the kernel keeps it fixed for userspace whatever its internal HZ).
const clockTicksPerSecond = 100

// cpuTimes is a reading of /proc/stat: the idle time of all CPUs together (idle plus iowait, in clock
// ticks), their softirq time (ticks), the context switches since boot, how many CPUs it covers, and when it
// was read.
//
// Busy time is derived as wall time × CPUs − idle, not summed from the user, system and softirq fields:
// on a tickless kernel with tick-based accounting (this project's VMs: NO_HZ_IDLE, TICK_CPU_ACCOUNTING)
// those are sampled at the tick, and a CPU that wakes for a packet and sleeps again before the next tick is
// never sampled busy, so they undercount exactly the short bursts of a relay (measured here: 0.5% busy for
// a load that was not). Idle time is measured precisely at each idle entry and exit. Either way the
// figure is the whole machine's, so it includes the softirq work a sockmap relay does for no process.
// Softirq is kept anyway, sampled as it is: it says where the time went, not how much there was.
type cpuTimes struct {
	Idle    int64
	Softirq int64
	Ctxt    int64
	CPUs    int
	At      time.Time
}

func readCPUTimes() (cpuTimes, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read /proc/stat: %w", err)
	}
	t, err := parseProcStat(string(b))
	t.At = time.Now()
	return t, err
}

// parseProcStat reads the total idle, iowait and softirq ticks from the "cpu" line, the "ctxt" line, and
// counts the "cpuN" lines.
func parseProcStat(stat string) (cpuTimes, error) {
	var t cpuTimes
	for i, line := range strings.Split(stat, "\n") {
		f := strings.Fields(line)
		if i == 0 {
			if len(f) < 8 || f[0] != "cpu" {
				return cpuTimes{}, fmt.Errorf("/proc/stat: first line %q is not \"cpu user nice system idle iowait irq softirq ...\"", line)
			}
			var ticks [3]int64
			for j, v := range []string{f[4], f[5], f[7]} {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil || n < 0 {
					return cpuTimes{}, fmt.Errorf("/proc/stat: idle, iowait or softirq %q in %q is not a tick count", v, line)
				}
				ticks[j] = n
			}
			t.Idle, t.Softirq = ticks[0]+ticks[1], ticks[2]
			continue
		}
		if len(f) == 2 && f[0] == "ctxt" {
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil || n < 0 {
				return cpuTimes{}, fmt.Errorf("/proc/stat: ctxt %q is not a count", f[1])
			}
			t.Ctxt = n
		}
		if len(f) > 0 && strings.HasPrefix(f[0], "cpu") {
			t.CPUs++
		}
	}
	if t.CPUs == 0 {
		return cpuTimes{}, errors.New("/proc/stat: no cpuN line")
	}
	return t, nil
}

// cpuCost is the CPU a load used between two readings of /proc/stat.
type cpuCost struct {
	Messages     int64   `json:"messages"`
	Seconds      float64 `json:"seconds"`
	CPUSeconds   float64 `json:"cpu_seconds"`        // busy time of all CPUs together
	Utilization  float64 `json:"cpu_utilization"`    // busy share of all CPUs, 0 to 1
	USPerMessage float64 `json:"cpu_us_per_message"` // CPUSeconds per message, in microseconds
}

// costOf accounts the CPU between before and after to messages sent over elapsed. It fails when the
// readings cannot be compared or no message was sent, which would make a per-message figure meaningless.
func costOf(before, after cpuTimes, messages int64, elapsed time.Duration) (cpuCost, error) {
	wall := after.At.Sub(before.At).Seconds()
	idle := float64(after.Idle-before.Idle) / clockTicksPerSecond
	switch {
	case before.CPUs != after.CPUs:
		return cpuCost{}, fmt.Errorf("/proc/stat: %d CPUs before, %d after; a CPU went on- or offline", before.CPUs, after.CPUs)
	case wall <= 0 || idle < 0:
		return cpuCost{}, fmt.Errorf("/proc/stat: %v of wall time and %.2f s of idle time between readings; no time passed", wall, idle)
	case messages <= 0:
		return cpuCost{}, errors.New("no message was echoed, so there is no cost per message")
	}
	capacity := wall * float64(after.CPUs)
	// Idle is counted in 10 ms ticks and read at slightly different instants per CPU: clamp.
	busy := min(max(capacity-idle, 0), capacity)
	return cpuCost{Messages: messages, Seconds: elapsed.Seconds(), CPUSeconds: busy, Utilization: busy / capacity,
		USPerMessage: busy / float64(messages) * 1e6}, nil
}
