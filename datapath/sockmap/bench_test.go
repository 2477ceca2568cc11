package sockmap

import (
	"fmt"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/settings"
	"github.com/sockrelay/sockrelay/internal/streamtest"
)

// BenchmarkThroughputKernelSendBuffer is relay's BenchmarkThroughput on sockmap, on the engine alone, with
// the relay sockets' send buffer left to TCP's autotuning (tcp_wmem, 4 MiB at most here) or fixed larger,
// and with the default held limit or one too large to be reached (no demotion, so no userspace relay: the
// kernel path alone). The psock backlog that moves redirected bytes into the destination retries one
// jiffy later when the send buffer is full, so the buffer bounds what it moves per tick (docs/datapath.md,
// "Measured"). It reports how often the direction was demoted, and how many skbs repeating bytes the
// verdict cut (bpf/sockrelay.c).
func BenchmarkThroughputKernelSendBuffer(b *testing.B) {
	for _, limit := range []int{settings.DefaultKernelHeldLimit, 1 << 30} {
		for _, sndbuf := range []int{0, 4 << 20, 16 << 20, 32 << 20} {
			name := "sndbuf-autotuned"
			if sndbuf > 0 {
				name = fmt.Sprintf("sndbuf-%dMiB", sndbuf>>20)
			}
			name += fmt.Sprintf("/held-limit-%dMiB", limit>>20)
			b.Run(name, func(b *testing.B) {
				k, _ := newTestEngine(b)
				k.heldLimit = uint64(limit)
				k.setSendBuffer(sndbuf)
				c, u, _ := carryPair(b, k)
				d := kernelDirOf(b, k, true)
				streamtest.Through(b, c, u)
				st, err := k.maps.Stats(d.src.cookie)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(st.Demotions), "demotions")
				b.ReportMetric(float64(st.Overlaps), "cut-skbs")
			})
		}
	}
}

// BenchmarkSampleIdleCounts is what auto's sampler pays each sample to read the counts of 3000 idle kernel
// tunnels (SOCKRELAY_BENCH_TUNNELS changes it): "lookup" looks each tunnel's two sockets up in the state map
// (two bpf system calls per tunnel), "batched" reads the whole map once (ReadCounts) and then each tunnel's
// counts from it. One op is one sample; cpu-ns/sample is the process's user and system CPU. The bpf system
// calls per sample: run under `perf stat -e syscalls:sys_enter_bpf` with -benchtime 1x and 101x and divide
// the difference by 100.
//
//	go test -run '^$' -bench SampleIdleCounts -benchtime 100x ./datapath/sockmap/
func BenchmarkSampleIdleCounts(b *testing.B) {
	tunnels := 3000
	if n, err := strconv.Atoi(os.Getenv("SOCKRELAY_BENCH_TUNNELS")); err == nil {
		tunnels = n
	}
	k, _ := newTestEngine(b)
	pairs := make([]*datapath.Pair, tunnels)
	for i := range pairs {
		_, _, pairs[i] = carryPair(b, k)
	}
	for _, batched := range []bool{false, true} {
		name := "lookup"
		if batched {
			name = "batched"
		}
		b.Run(name, func(b *testing.B) {
			k.countsMu.Lock()
			k.counted = nil // no ReadCounts yet: each Counts looks its sockets up
			k.countsMu.Unlock()
			cpu0 := processCPU(b)
			b.ResetTimer()
			for range b.N {
				if batched {
					if err := k.ReadCounts(); err != nil {
						b.Fatal(err)
					}
				}
				for _, p := range pairs {
					if _, _, ok := p.Counts(); !ok {
						b.Fatal("an idle kernel pair has no counts")
					}
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/sample")
		})
	}
}

// processCPU is the user and system CPU time the process has used, in ns.
func processCPU(b *testing.B) int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}
