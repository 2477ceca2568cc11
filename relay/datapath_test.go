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

// TestSplicePipesUnavailable: when a splice tunnel cannot have its pipes (the relay is out of
// descriptors: EMFILE), it runs on copy instead, byte-exact, with the cause in the log and a fallback
// counted (pipe_unavailable), on http and tcp listeners alike; a pipe made before the failing one is
// closed. Before, such a tunnel was reset right after its 101 and blamed on a peer (client_error), the
// cause logged nowhere.
func TestSplicePipesUnavailable(t *testing.T) {
	for _, kind := range []string{"websocket", "tcp"} {
		for _, failAt := range []int{1, 2} { // which pipe of the tunnel's two cannot be had
			t.Run(fmt.Sprintf("%s/pipe%d", kind, failAt), func(t *testing.T) {
				var made []*datapath.Pipe
				stub := func(size int) (*datapath.Pipe, error) {
					if len(made)+1 == failAt {
						return nil, fmt.Errorf("pipe2: %w", unix.EMFILE)
					}
					p, err := datapath.NewPipe(size)
					if err == nil {
						made = append(made, p)
					}
					return p, err
				}
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
				for i, p := range made {
					if !p.Closed() {
						t.Errorf("pipe %d, made before the one that failed, is still open", i+1)
					}
				}
				if m := scrape(t, r); !strings.Contains(m, `sockrelay_datapath_fallbacks_total{reason="pipe_unavailable"} 1`) {
					t.Errorf("metrics lack the pipe_unavailable fallback:\n%s", grepLines(m, "sockrelay_datapath_fallbacks"))
				}
				if n := metricSum(r.Reg, "sockrelay_tunnels_closed_total", map[string]string{"reason": ReasonClosed}); n != 1 {
					t.Errorf("sockrelay_tunnels_closed_total{reason=%q} = %v, want 1", ReasonClosed, n)
				}
				logs := r.Log.String()
				for _, w := range []string{"splice pipes unavailable, the tunnel runs on the copy datapath",
					"pipe2: too many open files", "datapath=copy"} {
					if !strings.Contains(logs, w) {
						t.Errorf("log lacks %q:\n%s", w, logs)
					}
				}
			})
		}
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
