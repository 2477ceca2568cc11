package relay

import (
	"bytes"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestNoStallPingPong keeps many tunnels doing 32-byte round trips at once for a few seconds; every round
// trip must complete (a naive kernel datapath stalled tens of tunnels in a thousand: docs/datapath.md,
// "What a naive sockmap relay gets wrong").
func TestNoStallPingPong(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			tunnels, run := 200, time.Second
			if dp == DatapathSockmap {
				tunnels, run = 1000, 3*time.Second
			}
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			cs := make([]*clientConn, tunnels)
			for i := range tunnels {
				var u *upstreamConn
				cs[i], u = openTunnel(t, r.Addr, up, nil, nil)
				go func() { // the upstream echoes until EOF, then half-closes
					io.Copy(u, u.R)
					u.CloseWrite()
				}()
			}
			if dp == DatapathSockmap {
				assertNoFallback(t, r, tunnels)
			}
			var (
				wg    sync.WaitGroup
				trips atomic.Int64
				errs  = make(chan error, tunnels)
			)
			deadline := time.Now().Add(run)
			for i, c := range cs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					msg, got := make([]byte, 32), make([]byte, 32)
					for n := 0; time.Now().Before(deadline); n++ {
						msg[0], msg[1], msg[2] = byte(i), byte(i>>8), byte(n)
						if _, err := c.Write(msg); err != nil {
							errs <- fmt.Errorf("tunnel %d round trip %d: write: %v", i, n, err)
							return
						}
						c.SetReadDeadline(time.Now().Add(5 * time.Second))
						if _, err := io.ReadFull(c.R, got); err != nil {
							errs <- fmt.Errorf("tunnel %d stalled at round trip %d: %v", i, n, err)
							return
						}
						if !bytes.Equal(got, msg) {
							errs <- fmt.Errorf("tunnel %d round trip %d: got %x, want %x", i, n, got, msg)
							return
						}
						trips.Add(1)
					}
				}()
			}
			wg.Wait()
			close(errs)
			failed := 0
			for err := range errs {
				if failed++; failed <= 10 {
					t.Error(err)
				}
			}
			if failed > 0 {
				t.Errorf("%d of %d tunnels failed", failed, tunnels)
			}
			t.Logf("%d tunnels, %d round trips in %v", tunnels, trips.Load(), run)
			for _, c := range cs {
				c.CloseWrite()
			}
			waitTunnelsGone(t, r)
		})
	}
}

// assertNoFallback checks that n tunnels were opened on the kernel datapath and none of them had to fall
// back to userspace, so a test of the kernel path really tested it.
func assertNoFallback(t testing.TB, r *testRelay, n int) {
	t.Helper()
	if got := testutil.ToFloat64(r.metrics.tunnelsActive.WithLabelValues(string(DatapathSockmap))); got != float64(n) {
		t.Errorf("%v tunnels live on sockmap, want %d", got, n)
	}
	if got := metricSum(r.Reg, "sockrelay_datapath_fallbacks_total", nil); got != 0 {
		t.Errorf("%v tunnels fell back to userspace, want 0", got)
	}
}
