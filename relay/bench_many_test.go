package relay

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// benchPathsN opens n connection pairs like benchPath, sharing one upstream and one relay.
func benchPathsN(b *testing.B, dp string, n int) (clients, upstreams []net.Conn, clientRs, upstreamRs []io.Reader) {
	b.Helper()
	if dp == "direct" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		for range n {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			u, err := ln.Accept()
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close(); u.Close() })
			clients, upstreams = append(clients, c), append(upstreams, u)
			clientRs, upstreamRs = append(clientRs, c), append(upstreamRs, u)
		}
		return
	}
	up := startUpstream(b)
	r := startRelay(b, Datapath(dp), []string{up.Addr})
	for range n {
		c, u := openTunnel(b, r.Addr, up, nil, nil)
		clients, upstreams = append(clients, c), append(upstreams, u)
		clientRs, upstreamRs = append(clientRs, c.R), append(upstreamRs, u.R)
	}
	return
}

// BenchmarkRoundTripLatency runs 32-byte ping-pong on 1 and on 1000 tunnels at once and reports the p50
// and p99 round trip; ns/op is wall time per round trip over all tunnels.
func BenchmarkRoundTripLatency(b *testing.B) {
	raiseFDLimit(b, 20000)
	for _, n := range []int{1, 1000} {
		for _, dp := range benchPaths() {
			b.Run(strconv.Itoa(n)+"/"+dp, func(b *testing.B) {
				cs, us, crs, urs := benchPathsN(b, dp, n)
				for i := range us {
					go func() {
						buf := make([]byte, 32)
						for {
							if _, err := io.ReadFull(urs[i], buf); err != nil {
								return
							}
							if _, err := us[i].Write(buf); err != nil {
								return
							}
						}
					}()
				}
				var left atomic.Int64
				left.Store(int64(b.N))
				rtts := make([][]time.Duration, n)
				var wg sync.WaitGroup
				b.ResetTimer()
				for i := range cs {
					wg.Add(1)
					go func() {
						defer wg.Done()
						msg := make([]byte, 32)
						for left.Add(-1) >= 0 {
							start := time.Now()
							if _, err := cs[i].Write(msg); err != nil {
								b.Error(err)
								return
							}
							if _, err := io.ReadFull(crs[i], msg); err != nil {
								b.Error(err)
								return
							}
							rtts[i] = append(rtts[i], time.Since(start))
						}
					}()
				}
				wg.Wait()
				b.StopTimer()
				all := slices.Concat(rtts...)
				slices.Sort(all)
				if len(all) > 0 {
					b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
					b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
				}
			})
		}
	}
}

// BenchmarkIdleTunnelMemory opens SOCKRELAY_BENCH_IDLE (default 10000) idle tunnels and reports the
// Go memory (heap and stacks, and each apart) and the goroutines they add to this process per tunnel.
// Client, relay and upstream share the process, and the test's ends keep their handshake's buffers (a
// bufio.Reader each), so the relay's own cost per tunnel is not a datapath's figure minus direct's: with
// SOCKRELAY_BENCH_IDLE_PROFILE=DIR set, each datapath writes a heap profile, DIR/idle-DATAPATH.heap,
// while its tunnels are open, whose allocations under the relay's own code are what it retains (run with
// -test.memprofilerate=1 for exact figures; `go tool pprof -sample_index=inuse_space
// -ignore='openTunnelWith|dialRelay|startUpstreamOn|benchPathsN'` leaves the relay's).
func BenchmarkIdleTunnelMemory(b *testing.B) {
	n := 10000
	if v, err := strconv.Atoi(os.Getenv("SOCKRELAY_BENCH_IDLE")); err == nil {
		n = v
	}
	limit := raiseFDLimit(b, uint64(4*n+1000))
	paths := benchPaths()
	if slices.Contains(testDatapaths, DatapathSockmap) {
		paths = append(paths, string(DatapathAuto)) // per tunnel: its sampler's share shows against copy's
	}
	for _, dp := range paths {
		b.Run(dp, func(b *testing.B) {
			// An idle tunnel holds four descriptors in this process (client, relay ×2, upstream), on every
			// datapath: splice's pipes are lent by its event loop only while bytes are in flight.
			const perTunnel = 4
			n := n
			if uint64(perTunnel*n+1000) > limit {
				n = int(limit-1000) / perTunnel
				b.Logf("RLIMIT_NOFILE is %d here: measuring %d tunnels", limit, n)
			}
			for range b.N {
				before, fdsBefore := goMemNow(), openFDs(b)
				benchPathsN(b, dp, n)
				time.Sleep(200 * time.Millisecond) // let handshake goroutines finish
				after := goMemNow()
				b.ReportMetric(float64(after.heap+after.stack-before.heap-before.stack)/float64(n), "go-B/tunnel")
				b.ReportMetric(float64(after.heap-before.heap)/float64(n), "heap-B/tunnel")
				b.ReportMetric(float64(after.stack-before.stack)/float64(n), "stack-B/tunnel")
				b.ReportMetric(float64(after.goroutines-before.goroutines)/float64(n), "goroutines/tunnel")
				// Client and upstream sockets live in this process too: 2 of these are the peers'.
				b.ReportMetric(float64(openFDs(b)-fdsBefore)/float64(n), "fds/tunnel")
				writeIdleHeapProfile(b, dp)
			}
		})
	}
}

// goMem is what goMemNow reads.
type goMem struct{ heap, stack, goroutines int64 }

// goMemNow is the Go heap and stacks in use after a collection, and the goroutines alive. (RSS is not
// used: the sub-benchmarks run in sequence in one process, and pages the previous one freed are reused
// without moving RSS.)
func goMemNow() goMem {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return goMem{heap: int64(ms.HeapInuse), stack: int64(ms.StackInuse), goroutines: int64(runtime.NumGoroutine())}
}

// writeIdleHeapProfile writes the heap profile of the tunnels open now to
// $SOCKRELAY_BENCH_IDLE_PROFILE/idle-DATAPATH.heap, when that variable names a folder.
func writeIdleHeapProfile(b *testing.B, dp string) {
	dir := os.Getenv("SOCKRELAY_BENCH_IDLE_PROFILE")
	if dir == "" {
		return
	}
	runtime.GC() // the profile shows the heap as of the last collection
	f, err := os.Create(filepath.Join(dir, "idle-"+dp+".heap"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.WriteHeapProfile(f); err != nil {
		b.Fatalf("write heap profile: %v", err)
	}
}

// raiseFDLimit lifts RLIMIT_NOFILE towards n as far as the process may, and returns the soft limit.
func raiseFDLimit(b *testing.B, n uint64) uint64 {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil || l.Cur >= n {
		return l.Cur
	}
	want := l
	want.Cur, want.Max = n, max(n, l.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
		return n
	}
	l.Cur = min(n, l.Max)
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l)
	return l.Cur
}
