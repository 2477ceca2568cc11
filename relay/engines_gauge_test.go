package relay

import (
	"errors"
	"log/slog"
	"net"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// sockrelay_tunnels_active does not drift when a splice tunnel that falls back to copy has ended before the
// Copier could take it: its kind stays splice, and its end is counted off splice, so the fallback must not
// move it to copy.
func TestSpliceFallbackOfEndedPairKeepsGauge(t *testing.T) {
	m := newMetrics(prometheus.NewRegistry(), NewRegistry(), func() Router { return nil },
		func() sockmap.Stats { return sockmap.Stats{} }, func() datapath.EventLoopStats { return datapath.EventLoopStats{} })
	e := &spliceEngine{copy: &copyEngine{log: slog.New(slog.DiscardHandler), metrics: m,
		start: func(eventloop.Options) (*datapath.EventLoop, error) { return nil, errors.New("no loops") }}}
	a, b := tcpLoopback(t)
	p := datapath.NewPair(datapath.Splice, datapath.Endpoint{Conn: a}, datapath.Endpoint{Conn: b}, nil)
	active := m.tunnelsActive
	active.WithLabelValues(string(DatapathSplice)).Inc() // opened as splice (tunnelOpened)
	p.End(datapath.ReasonShutdown, true)                 // ends first ...
	active.WithLabelValues(string(p.Kind())).Dec()       // ... and is counted off its kind (tunnelEnded)
	e.Carry(p)
	for _, dp := range []Datapath{DatapathSplice, DatapathCopy} {
		if got := testutil.ToFloat64(active.WithLabelValues(string(dp))); got != 0 {
			t.Errorf("sockrelay_tunnels_active{datapath=%q} = %v after the tunnel ended, want 0", dp, got)
		}
	}
}

// tcpLoopback returns both ends of a fresh loopback TCP connection, closed when t ends.
func tcpLoopback(t *testing.T) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	a, err := ln.AcceptTCP()
	if err != nil {
		d.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(); a.Close() })
	return d, a
}

// The same for a kernel tunnel that falls back to copy after it ended: it ended as sockmap, so the
// fallback's count must not move it to copy.
func TestKernelFallbackOfEndedPairKeepsGauge(t *testing.T) {
	m := newMetrics(prometheus.NewRegistry(), NewRegistry(), func() Router { return nil },
		func() sockmap.Stats { return sockmap.Stats{} }, func() datapath.EventLoopStats { return datapath.EventLoopStats{} })
	s := &Server{metrics: m, log: slog.New(slog.DiscardHandler)} // kernelFallback logs the fallback
	a, b := tcpLoopback(t)
	p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: a}, datapath.Endpoint{Conn: b}, nil)
	active := m.tunnelsActive
	active.WithLabelValues(string(DatapathSockmap)).Inc()
	p.End(datapath.ReasonShutdown, true)
	active.WithLabelValues(string(p.Kind())).Dec()
	datapath.Copier{}.Carry(p) // the fallback engine, which does not take an ended pair
	s.kernelFallback(p, "socket_closing")
	for _, dp := range []Datapath{DatapathSockmap, DatapathCopy} {
		if got := testutil.ToFloat64(active.WithLabelValues(string(dp))); got != 0 {
			t.Errorf("sockrelay_tunnels_active{datapath=%q} = %v after the tunnel ended, want 0", dp, got)
		}
	}
}
