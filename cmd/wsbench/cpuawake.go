package main

import (
	"encoding/binary"
	"fmt"
	"os"
)

// cpuLatencyPath is the kernel's CPU wake-up latency request (PM QoS): while a process holds it open with
// a value written, no CPU enters an idle state that takes longer than that value (µs) to leave.
const cpuLatencyPath = "/dev/cpu_dma_latency"

// holdCPUsAwake asks, through path, that no CPU sleep in an idle state it needs time to leave, until release
// is called. Round-trip latency is otherwise dominated by how long an idle CPU takes to wake: on a virtual
// machine whose idle state is a halt (cpuidle-haltpoll with polling off), every wake-up is an exit to the
// host, and a run with more processes busy (a relay's) keeps the CPUs awake more and looked faster than the
// same load sent directly — a relay beat direct on one-tunnel p50 by 15–25 %. With the CPUs held awake the
// round trip measures the software on the path, and direct bounds every relay. It is what cyclictest and
// tuned's latency-performance profile do. The CPUs then poll when idle: time that /proc/stat counts as
// idle, so the CPU rows are not changed by it, but it is held only around the latency workloads anyway.
func holdCPUsAwake(path string) (release func(), err error) {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("hold the CPUs awake: %w (needs root; run without -cpus-awake to measure with the machine's own idle states)", err)
	}
	// The kernel reads a 4-byte binary value (or text); 0 µs: no idle state but polling.
	var zero [4]byte
	binary.NativeEndian.PutUint32(zero[:], 0)
	if _, err := f.Write(zero[:]); err != nil {
		f.Close()
		return nil, fmt.Errorf("hold the CPUs awake: write %s: %w", path, err)
	}
	// The request lasts as long as the file is open.
	return func() { f.Close() }, nil
}
