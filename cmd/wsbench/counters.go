package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The cpu workload's counts beside CPU time: what a datapath does per message, which contention on a shared
// machine barely changes (it stretches time, not the number of context switches or work items).

// procCounts is a reading of the relay's processes: their CPU time (user plus system, in clock ticks, all
// threads, the dead ones included) and their context switches, voluntary (a thread slept: the relay waited
// for the next message, so each is a wake-up) and involuntary, summed over the threads alive.
type procCounts struct {
	Ticks       int64
	Voluntary   int64
	Involuntary int64
}

// readProcCounts sums procCounts over pids.
func readProcCounts(pids []int) (procCounts, error) {
	var c procCounts
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return c, fmt.Errorf("read CPU time of process %d: %w", pid, err)
		}
		ticks, err := parseProcPidStat(string(b))
		if err != nil {
			return c, fmt.Errorf("process %d: %w", pid, err)
		}
		c.Ticks += ticks
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
		for _, task := range tasks {
			b, err := os.ReadFile(task)
			if err != nil {
				continue // the thread exited since the glob
			}
			vol, invol, err := parseCtxtSwitches(string(b))
			if err != nil {
				return c, fmt.Errorf("%s: %w", task, err)
			}
			c.Voluntary += vol
			c.Involuntary += invol
		}
	}
	return c, nil
}

// parseProcPidStat returns utime + stime from the text of /proc/PID/stat. The command name (field 2) is in
// parentheses and may hold spaces and parentheses itself, so fields are counted after its last ')'.
func parseProcPidStat(stat string) (int64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/PID/stat %.40q: no command name in parentheses", stat)
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/PID/stat: %d fields after the command name; want at least 13", len(f))
	}
	var sum int64
	for _, v := range f[11:13] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("/proc/PID/stat: utime or stime %q is not a tick count", v)
		}
		sum += n
	}
	return sum, nil
}

// parseCtxtSwitches returns the voluntary and involuntary context switches of a /proc/PID/task/TID/status.
func parseCtxtSwitches(status string) (voluntary, involuntary int64, err error) {
	n, err := parseKeyCounts(status, "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
	if err != nil {
		return 0, 0, err
	}
	return n[0], n[1], nil
}

// parseKeyCounts reads the counts of "key: count" lines (as /proc status files and tracefs stats write
// them) for each of keys, in keys' order; a key missing or a count that is not one is an error.
func parseKeyCounts(text string, keys ...string) ([]int64, error) {
	counts, found := make([]int64, len(keys)), make([]bool, len(keys))
	for _, line := range strings.Split(text, "\n") {
		key, v, ok := strings.Cut(line, ":")
		i := slices.Index(keys, key)
		if !ok || i < 0 {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%s %q is not a count", key, strings.TrimSpace(v))
		}
		counts[i], found[i] = n, true
	}
	if slices.Contains(found, false) {
		return nil, fmt.Errorf("no %s lines", strings.Join(keys, " and "))
	}
	return counts, nil
}

// tracefsRoot is where tracefs is mounted on current kernels.
const tracefsRoot = "/sys/kernel/tracing"

// workqueueCounter counts the kernel's work-queue executions (the workqueue_execute_start trace event) in
// a trace instance of its own, so that it neither reads nor disturbs anyone else's tracing. Nothing reads
// the events while they are recorded: the count is what each CPU's ring buffer holds plus what it
// overwrote (its stats file), so counting costs the measured load no reader waking up.
type workqueueCounter struct {
	dir string
}

// openWorkqueueCounter creates the trace instance and enables the event. The error says why counting is
// unavailable (no tracefs, not root, an old kernel); the workload then reports the count as left out.
func openWorkqueueCounter() (*workqueueCounter, error) {
	if _, err := os.Stat(filepath.Join(tracefsRoot, "instances")); err != nil {
		return nil, fmt.Errorf("tracefs is not mounted at %s (mount -t tracefs nodev %s): %w", tracefsRoot, tracefsRoot, err)
	}
	w := &workqueueCounter{dir: filepath.Join(tracefsRoot, "instances", fmt.Sprintf("wsbench-%d", os.Getpid()))}
	if err := os.Mkdir(w.dir, 0o755); err != nil {
		return nil, fmt.Errorf("create trace instance: %w", err)
	}
	enable := filepath.Join(w.dir, "events", "workqueue", "workqueue_execute_start", "enable")
	if err := os.WriteFile(enable, []byte("1"), 0); err != nil {
		w.close()
		return nil, fmt.Errorf("enable workqueue:workqueue_execute_start: %w", err)
	}
	return w, nil
}

// read returns how many events were recorded since the instance was created.
func (w *workqueueCounter) read() (int64, error) {
	stats, err := filepath.Glob(filepath.Join(w.dir, "per_cpu", "cpu*", "stats"))
	if err != nil || len(stats) == 0 {
		return 0, fmt.Errorf("trace instance %s: no per-CPU stats", w.dir)
	}
	var total int64
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0, fmt.Errorf("read %s: %w", path, err)
		}
		n, err := parseTraceStats(string(b))
		if err != nil {
			return 0, fmt.Errorf("%s: %w", path, err)
		}
		total += n
	}
	return total, nil
}

// parseTraceStats returns entries + overrun of a tracefs per_cpu/cpuN/stats: the events a CPU recorded,
// those still in its buffer and those overwritten.
func parseTraceStats(stats string) (int64, error) {
	n, err := parseKeyCounts(stats, "entries", "overrun")
	if err != nil {
		return 0, err
	}
	return n[0] + n[1], nil
}

// close disables the event and removes the instance.
func (w *workqueueCounter) close() {
	_ = os.WriteFile(filepath.Join(w.dir, "events", "workqueue", "workqueue_execute_start", "enable"), []byte("0"), 0)
	_ = os.Remove(w.dir)
}
