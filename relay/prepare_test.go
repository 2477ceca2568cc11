package relay

import (
	"errors"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// TestPrepareListenerRefuses: a listener the server refuses (a datapath it cannot give, limits out of
// range) is refused by PrepareListener and PrepareTCP themselves, before anything serves, with an error
// that names the listener; its socket is closed.
func TestPrepareListenerRefuses(t *testing.T) {
	copyRelay := startRelay(t, DatapathCopy, []string{"127.0.0.1:9"})
	// Under auto, a kernel datapath that did not load (here its start fails): the relay runs on splice.
	autoRelay := startRelay(t, DatapathAuto, []string{"127.0.0.1:9"}, func(c *Config) {
		c.startKernel = func(*slog.Logger, func(*datapath.Pair, string), uint64) (*sockmap.Engine, error) {
			return nil, errors.New("sockmap: kernel: capabilities: missing CAP_BPF")
		}
	})
	for _, tc := range []struct {
		name string
		r    *testRelay
		opts ListenerOptions
		want string
	}{
		{"sockmap on a copy relay", copyRelay, ListenerOptions{Name: "kernel", Datapath: DatapathSockmap},
			`listener "kernel": datapath sockmap: datapath unavailable: the relay's datapath is copy, and only sockmap or auto load the kernel datapath; accepted here: copy, splice or auto`},
		{"unknown datapath", copyRelay, ListenerOptions{Name: "edge", Datapath: "turbo"},
			`listener "edge": datapath "turbo": datapath unavailable; accepted here: copy, splice or auto`},
		{"sockmap on an auto relay without its kernel datapath", autoRelay, ListenerOptions{Name: "kernel", Datapath: DatapathSockmap},
			`listener "kernel": datapath sockmap: datapath unavailable: the relay's datapath is auto, and its kernel datapath did not load ` +
				`(sockmap: kernel: capabilities: missing CAP_BPF), so it runs on splice; accepted here: copy, splice or auto`},
		{"negative limit", copyRelay, ListenerOptions{Name: "edge", Limits: Limits{MaxTunnels: -1}},
			`listener "edge": limit max_tunnels: -1; accepted 0 (unlimited) or more`},
	} {
		prepare := map[string]func(net.Listener, ListenerOptions) (*PreparedListener, error){
			"websocket": tc.r.PrepareListener,
			"tcp":       func(l net.Listener, o ListenerOptions) (*PreparedListener, error) { return tc.r.PrepareTCP(l, o, nil) },
		}
		for kind, prep := range prepare {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				p, err := prep(ln, tc.opts)
				if p != nil || err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("prepared %v, %v; want no listener and an error with %q", p, err, tc.want)
				}
				if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
					t.Errorf("the refused listener's socket: Accept: %v, want it closed", err)
				}
			})
		}
	}
}

// TestPrepareListenerSetsUpBeforeServing: a prepared listener has its datapath resolved and its metric
// series started before it serves; Serve then relays.
func TestPrepareListenerSetsUpBeforeServing(t *testing.T) {
	up := startUpstream(t)
	r := startRelay(t, DatapathCopy, []string{up.Addr})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.PrepareListener(ln, ListenerOptions{Name: "web", Datapath: DatapathSplice})
	if err != nil {
		t.Fatal(err)
	}
	if p.Datapath() != DatapathSplice {
		t.Errorf("prepared datapath %s, want splice", p.Datapath())
	}
	if n := seriesOf(t, r, "sockrelay_handshakes_failed_total", "web"); n == 0 {
		t.Error("no sockrelay_handshakes_failed_total series of the prepared listener before it serves")
	}
	go p.Serve()
	c, _ := openTunnel(t, ln.Addr().String(), up, nil, nil)
	defer c.Close()
	if ts := r.Tunnels().Tunnels(); len(ts) != 1 || ts[0].Listener != "web" || ts[0].Datapath() != DatapathSplice {
		t.Errorf("tunnels %v; want one on listener web, on splice", ts)
	}
}

// seriesOf counts the series of the metric name labelled with listener.
func seriesOf(t *testing.T, r *testRelay, name, listener string) int {
	t.Helper()
	families, err := r.Reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "listener" && l.GetValue() == listener {
					n++
				}
			}
		}
	}
	return n
}
