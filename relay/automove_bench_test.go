package relay

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// benchCounters are machineCounters, failing b if they cannot be read.
func benchCounters(b *testing.B) (busyTicks, ctxt uint64) {
	busyTicks, ctxt, err := machineCounters()
	if err != nil {
		b.Fatal(err)
	}
	return busyTicks, ctxt
}

// BenchmarkChattyCost is what auto's chatty threshold is chosen from: tunnels each doing 64-byte round trips
// at a fixed rate, through sockmap, the event loop (copy) and no relay (direct), for 2 s each, in rounds that
// alternate them. It reports machine-wide CPU µs and context switches per round trip (client, relay and
// upstream share this process; the relay's share is a datapath's figure minus direct's). Run alone:
//
//	go test -run '^$' -bench BenchmarkChattyCost -benchtime 1x ./relay/
func BenchmarkChattyCost(b *testing.B) {
	const tunnels, dur = 10, 2 * time.Second
	paths := []string{"direct", string(DatapathSockmap), string(DatapathCopy)}
	for _, rate := range []int{300, 1000, 4000} {
		for round := range 3 {
			for _, dp := range paths {
				b.Run(fmt.Sprintf("rate=%d/%s/round=%d", rate, dp, round), func(b *testing.B) {
					if dp == string(DatapathSockmap) {
						requireSockmap(b)
					}
					clients, ups, crs, urs := benchPathsN(b, dp, tunnels)
					time.Sleep(100 * time.Millisecond) // into the kernel
					busy0, ctxt0 := benchCounters(b)
					trips := chattyRun(b, clients, ups, crs, urs, rate, dur)
					busy1, ctxt1 := benchCounters(b)
					// USER_HZ is 100 on Linux: a tick is 10 ms.
					b.ReportMetric(float64(busy1-busy0)*10_000/float64(trips), "cpu-µs/rt")
					b.ReportMetric(float64(ctxt1-ctxt0)/float64(trips), "ctxsw/rt")
					b.ReportMetric(float64(trips)/dur.Seconds(), "rt/s")
				})
			}
		}
	}
}

// chattyRun runs the round trips on every tunnel at rate a second each for dur, and returns how many completed.
func chattyRun(b *testing.B, clients, ups []net.Conn, crs, urs []io.Reader, rate int, dur time.Duration) int {
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	stop := time.Now().Add(dur)
	gap := time.Second / time.Duration(rate)
	for i := range clients {
		wg.Add(2)
		go func() { // echo
			defer wg.Done()
			buf := make([]byte, 64)
			for {
				if _, err := io.ReadFull(urs[i], buf); err != nil {
					return
				}
				if _, err := ups[i].Write(buf); err != nil {
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			defer ups[i].Close()
			buf := make([]byte, 64)
			n := 0
			next := time.Now()
			for time.Now().Before(stop) {
				if _, err := clients[i].Write(buf); err != nil {
					b.Error(err)
					return
				}
				if _, err := io.ReadFull(crs[i], buf); err != nil {
					b.Error(err)
					return
				}
				n++
				next = next.Add(gap)
				if d := time.Until(next); d > 0 {
					time.Sleep(d)
				}
			}
			mu.Lock()
			total += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	return total
}
