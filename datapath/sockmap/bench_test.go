package sockmap

import (
	"fmt"
	"testing"

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
