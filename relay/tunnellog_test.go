package relay

import (
	"io"
	"strings"
	"testing"
	"time"
)

// TestLongLivedTunnelLogged: a tunnel that lives past the interval gets "tunnel alive" records with its
// bytes so far, on every datapath (kernel tunnels' bytes come from the BPF counters).
func TestLongLivedTunnelLogged(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, u := openTunnel(t, r.Addr, up, []byte("12345"), []byte("abc"))
			io.ReadFull(u.R, make([]byte, 5))
			io.ReadFull(c.R, make([]byte, 3))

			stop := make(chan struct{})
			defer close(stop)
			go r.logLongLivedTunnels(20*time.Millisecond, stop)
			want := []string{`msg="tunnel alive"`, "datapath=" + string(dp), "bytes_to_upstream=5", "bytes_to_client=3",
				"upstream=" + up.Addr}
			for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				log := r.Log.String()
				if strings.Count(log, `msg="tunnel alive"`) >= 2 && containsAll(log, want) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no two \"tunnel alive\" records with %q in 2 s:\n%s", want, log)
				}
			}
		})
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

func TestTunnelLogIntervalChecked(t *testing.T) {
	_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathCopy, TunnelLogInterval: 10 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "tunnel log interval 10ms: 0 (off) or at least 1s") {
		t.Errorf("NewServer with a 10 ms tunnel log interval: %v; want the accepted range", err)
	}
}
