package relay

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/upstream"
)

func TestParseDatapath(t *testing.T) {
	for _, s := range []string{"auto", "sockmap", "splice", "copy"} {
		if d, err := ParseDatapath(s); err != nil || string(d) != s {
			t.Errorf("ParseDatapath(%q) = %q, %v", s, d, err)
		}
	}
	for _, s := range []string{"", "Copy", "kernel", "splice "} {
		_, err := ParseDatapath(s)
		if err == nil || !strings.Contains(err.Error(), "accepted values are auto, sockmap, splice, copy") {
			t.Errorf("ParseDatapath(%q) = %v, want an error listing the accepted values", s, err)
		}
	}
}

func TestNewServerResolvesDatapath(t *testing.T) {
	for _, tc := range []struct {
		requested, want Datapath
	}{
		{DatapathCopy, DatapathCopy},
		{DatapathSplice, DatapathSplice},
		{DatapathSockmap, DatapathSockmap},
		{DatapathAuto, testDatapaths[len(testDatapaths)-1]}, // sockmap wherever it can run, else splice
	} {
		t.Run(string(tc.requested), func(t *testing.T) {
			if tc.want == DatapathSockmap {
				requireSockmap(t)
			}
			r := startRelay(t, tc.requested, []string{"127.0.0.1:1"})
			if got := r.Datapath(); got != tc.want {
				t.Fatalf("datapath %s resolved to %s, want %s", tc.requested, got, tc.want)
			}
			if !strings.Contains(r.Log.String(), "datapath chosen") {
				t.Errorf("no 'datapath chosen' line in the log:\n%s", r.Log)
			}
		})
	}
}

func TestNewServerRefusesUnknownDatapath(t *testing.T) {
	if _, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: "bogus"}); !errors.Is(err, ErrDatapathUnavailable) {
		t.Errorf("NewServer with datapath bogus: %v, want ErrDatapathUnavailable", err)
	}
}

// TestSplicePipesUnavailable: when the event loop cannot make a pipe for a splice tunnel's direction (the relay
// is out of descriptors: EMFILE, or its pipe allowance is spent), that direction copies through a buffer
// instead, on the same loop: the tunnel stays a splice tunnel, byte-exact, and ends closed; the failures are
// counted (sockrelay_eventloop_pipe_failures_total), no fallback, reset or peer blamed. On http and tcp
// listeners alike. (That a direction splices again once pipes can be had is datapath/eventloop's
// TestSplicePipeUnavailableReadsIntoBuffers.)
func TestSplicePipesUnavailable(t *testing.T) {
	for _, kind := range []string{"websocket", "tcp"} {
		t.Run(kind, func(t *testing.T) {
			stub := func(size int) (int, int, error) { return -1, -1, fmt.Errorf("pipe2: %w", unix.EMFILE) }
			var upAddr string
			var up *fakeUpstream
			if kind == "tcp" {
				upAddr, _ = rawEcho(t, false)
			} else {
				up = startUpstream(t)
				upAddr = up.Addr
			}
			pool := newPool(t, "p", []string{upAddr}, nil)
			r := startRelay(t, DatapathSplice, nil, func(c *Config) {
				c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool}}, pools: []*upstream.Pool{pool}}
				c.newPipe = stub
			})
			if kind == "tcp" {
				c, err := net.Dial("tcp", serveTCP(t, r, ListenerOptions{Name: "tcp"}, nil))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				want := stream(3, 1<<20)
				go func() {
					c.Write(want)
					c.(*net.TCPConn).CloseWrite()
				}()
				if got, err := readAllWithin(c, c, 20*time.Second); err != nil || !bytes.Equal(got, want) {
					t.Fatalf("echo through the tcp listener: %d bytes, %v; want the 1 MiB sent, then EOF", len(got), err)
				}
			} else {
				runDuplex(t, r, up, duplexCase{toUpstream: 1 << 20, toClient: 1 << 20, pipelined: 100, with101: 100}, 5)
			}
			waitTunnelsGone(t, r)
			if n := metricSum(r.Reg, "sockrelay_eventloop_pipe_failures_total", nil); n == 0 {
				t.Error("sockrelay_eventloop_pipe_failures_total is 0 after pipes failed")
			}
			if n := metricSum(r.Reg, "sockrelay_datapath_fallbacks_total", nil); n != 0 {
				t.Errorf("%v fallbacks counted, want none: the tunnel stays on splice", n)
			}
			if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": ReasonClosed}); n != 1 {
				t.Errorf("sockrelay_tunnels_closed_total{reason=%q} = %v, want 1", ReasonClosed, n)
			}
			if logs := r.Log.String(); !strings.Contains(logs, "datapath=splice") || strings.Contains(logs, "datapath=copy") {
				t.Errorf("the tunnel's log lines do not say datapath=splice only:\n%s", logs)
			}
		})
	}
}

// TestSelfTestFailureRefusesSockmap starts the relay with a kernel datapath whose self-test fails (the
// self-test's own refusal of a broken datapath is datapath/sockmap's TestSelfTestRejectsBrokenDatapath):
// by name, sockmap does not start; under auto the relay falls back to splice and says so in its log and
// metrics.
func TestSelfTestFailureRefusesSockmap(t *testing.T) {
	failing := func(*slog.Logger, func(*datapath.Pair, string), uint64) (*sockmap.Engine, error) {
		return nil, fmt.Errorf("sockmap: %w: half-close client first: the client received a wrong stream", sockmap.ErrSelfTest)
	}
	broken := func(c *Config) { c.startKernel = failing }

	_, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: DatapathSockmap, startKernel: failing})
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
