package relay

import (
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestSelfTestPasses(t *testing.T) {
	requireSockmap(t)
	k, err := newKernelPath(slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	for range 5 {
		if err := k.selfTest(); err != nil {
			t.Fatal(err)
		}
	}
	assertMapsEmpty(t, k)
}

// TestSelfTestRejectsBrokenDatapath breaks the FIN drain on purpose (the naive relay of docs/datapath.md, which
// shuts the peer down as soon as EOF is seen) and checks that the self-test refuses it: by name, sockmap
// does not start; under auto the relay falls back to splice and says so in its log and metrics.
func TestSelfTestRejectsBrokenDatapath(t *testing.T) {
	requireSockmap(t)
	broken := func(c *Config) { c.alterKernelPath = func(k *kernelPath) { k.carryFINEarly = true } }

	_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathSockmap, alterKernelPath: func(k *kernelPath) { k.carryFINEarly = true }})
	if !errors.Is(err, ErrDatapathUnavailable) || !strings.Contains(err.Error(), "self-test failed") {
		t.Fatalf("NewServer(sockmap) with a broken datapath: %v, want ErrDatapathUnavailable saying the self-test failed", err)
	}

	r := startRelay(t, DatapathAuto, []string{"127.0.0.1:1"}, broken)
	if r.Datapath() != DatapathSplice {
		t.Fatalf("auto with a broken kernel datapath chose %s, want splice", r.Datapath())
	}
	if got := testutil.ToFloat64(r.metrics.datapathFallbacks.WithLabelValues("sockmap_selftest_failed")); got != 1 {
		t.Errorf("sockrelay_datapath_fallbacks_total{reason=sockmap_selftest_failed} = %v, want 1", got)
	}
	if log := r.Log.String(); !strings.Contains(log, "kernel datapath unavailable") || !strings.Contains(log, "self-test failed") {
		t.Errorf("the log does not say why sockmap was not used:\n%s", log)
	}
}

// assertMapsEmpty fails t if any BPF map of k still holds an entry.
func assertMapsEmpty(t testing.TB, k *kernelPath) {
	t.Helper()
	n, err := k.maps.Entries()
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range n {
		if c != 0 {
			t.Errorf("BPF map %s holds %d entries after every tunnel ended", name, c)
		}
	}
}
