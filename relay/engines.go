package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// setUpDatapath resolves and prepares the configured datapath. The kernel datapath is trusted only after
// the probe and the self-test pass on this kernel; asked for by name it is refused otherwise, and under auto
// the relay steps down to splice (or copy) and says so in the log and in the fallback counter.
func (s *Server) setUpDatapath() error {
	requested := s.cfg.Datapath
	if requested == DatapathSockmap || requested == DatapathAuto {
		k, err := s.startKernelPath()
		if err == nil {
			s.kernel, s.cfg.Datapath = k, DatapathSockmap
			// A pair the kernel refuses (or a move to it gives up on) runs on the event loops, whose
			// counters auto's policy reads, rather than on goroutines for good.
			k.SetFallback(s.copier)
			s.log.Info("datapath chosen", "datapath", DatapathSockmap, "requested", requested,
				"why", "the kernel passed the probe and the self-test")
			if requested == DatapathAuto {
				return s.startAutoMoves()
			}
			return nil
		}
		if requested == DatapathSockmap {
			return fmt.Errorf("%w: %v", ErrDatapathUnavailable, err)
		}
		var reason string
		switch {
		case errors.Is(err, sockmap.ErrSelfTest):
			reason = "sockmap_selftest_failed"
		default:
			reason = "sockmap_unavailable"
		}
		s.kernelSkipped = err
		s.metrics.datapathFallbacks.WithLabelValues(reason).Inc()
		s.log.Warn("kernel datapath unavailable, using a userspace one", "reason", reason, "err", err)
		return s.chooseUserspace(requested, []string{err.Error()})
	}
	if err := DatapathAvailable(requested); err != nil {
		return err
	}
	s.log.Info("datapath chosen", "datapath", requested, "requested", requested, "why", "requested by name")
	s.startCopyLoops()
	return nil
}

// startCopyLoops starts the copy datapath's event loops now when they carry the relay's datapath (copy, or
// splice, which runs on the same loops), so that their threads and metrics are there before the first tunnel;
// a failure is counted and logged, and tunnels run on goroutines until the loops can start.
func (s *Server) startCopyLoops() {
	if s.cfg.Datapath == DatapathCopy || s.cfg.Datapath == DatapathSplice {
		s.copier.eventLoop()
	}
}

// chooseUserspace picks the first of splice and copy that can run, logging why.
func (s *Server) chooseUserspace(requested Datapath, skipped []string) error {
	for _, d := range []Datapath{DatapathSplice, DatapathCopy} {
		err := DatapathAvailable(d)
		if err == nil {
			s.cfg.Datapath = d
			s.log.Info("datapath chosen", "datapath", d, "requested", requested,
				"why", "best available; skipped "+strings.Join(skipped, "; "))
			s.startCopyLoops()
			return nil
		}
		skipped = append(skipped, err.Error())
	}
	return fmt.Errorf("%w: no datapath can run: %s", ErrDatapathUnavailable, strings.Join(skipped, "; "))
}

// startKernelPath probes the kernel, loads the BPF objects and runs the self-test on them (sockmap.Start).
func (s *Server) startKernelPath() (*sockmap.Engine, error) {
	if k := s.adoptKernel(); k != nil {
		return k, nil
	}
	start := s.cfg.startKernel
	if start == nil {
		start = sockmap.Start
	}
	return start(s.log, s.kernelFallback, uint64(s.cfg.KernelHeldLimit))
}

// kernelStats are the kernel engine's counts, zero when the server runs no kernel engine. The engine is
// set up in NewServer, before anything can scrape the metrics that read it.
func (s *Server) kernelStats() sockmap.Stats {
	if s.kernel == nil {
		return sockmap.Stats{}
	}
	return s.kernel.Stats()
}

// Datapath is the datapath this server's tunnels use, auto resolved.
func (s *Server) Datapath() Datapath { return s.cfg.Datapath }

// kernelFallback counts a tunnel the kernel datapath handed to the copy datapath, once the fallback engine
// has taken it: a pair that ended first keeps its kind, and its end is counted off that.
func (s *Server) kernelFallback(p *datapath.Pair, reason string) {
	if s.auto.probeFellBack(p, reason) {
		return // the start measurement's: no tunnel, and the measurement says it stopped
	}
	s.log.Info("tunnel falls back to the copy datapath", "id", p.ID, "reason", reason)
	if now := p.Kind(); now != DatapathSockmap && !s.auto.movingPair(p) { // a move counts its tunnel itself (automove.go)
		s.metrics.tunnelsActive.WithLabelValues(string(DatapathSockmap)).Dec()
		s.metrics.tunnelsActive.WithLabelValues(string(now)).Inc()
	}
	s.metrics.datapathFallbacks.WithLabelValues(reason).Inc()
}

// copyEngine is the copy datapath: event loops (datapath.EventLoop) carry plain tunnels, and the goroutine
// Copier carries TLS ones (crypto/tls runs on a goroutine) and any the loops cannot take: the loops could
// not start (out of descriptors for epoll_create), or could not duplicate a tunnel's sockets. Each of those
// is counted in sockrelay_datapath_fallbacks_total and logged; no peer is blamed. The loops start with the
// first plain tunnel (or at start when the relay's datapath is copy), so that a relay whose tunnels all run
// on sockmap or splice runs no loop thread.
type copyEngine struct {
	log     *slog.Logger
	metrics *Metrics
	opts    eventloop.Options
	start   func(eventloop.Options) (*datapath.EventLoop, error) // datapath.StartEventLoop unless a test's
	// loopsSet: opts.Loops was configured (Config.EventLoops), not the default; the start log says which.
	loopsSet bool
	// probeFellBack says whether a pair is the start measurement's, which counts and logs no fallback
	// (autoMover.probeFellBack).
	probeFellBack func(p *datapath.Pair, why string) bool

	mu     sync.Mutex
	loops  *datapath.EventLoop // nil until started
	closed bool
}

var _ datapath.Engine = (*copyEngine)(nil)

func (c *copyEngine) Kind() Datapath { return DatapathCopy }

// Accepts takes every pair: TLS ones run on the Copier.
func (c *copyEngine) Accepts(a, b datapath.Endpoint) bool { return true }

// Carry hands a plain pair to the loops, a TLS one to the Copier.
func (c *copyEngine) Carry(p *datapath.Pair) {
	if p.TLS() {
		datapath.Copier{}.Carry(p)
		return
	}
	if e := c.eventLoop(); e != nil {
		e.Carry(p)
		return
	}
	datapath.Copier{}.Carry(p)
}

// copyLoops is how many event loops the copy datapath runs: configured (Config.EventLoops) when not 0, else
// one per two CPUs, at least one. The relay's peers share its host's CPUs more often than not, and fewer
// loops each find more ready sockets per epoll_wait: on a 2-CPU host one loop cost the relay fewer context
// switches and less CPU per message than two (docs/datapath.md, "Measured in the relay").
func copyLoops(configured int) int {
	if configured > 0 {
		return configured
	}
	return max(1, runtime.NumCPU()/2)
}

// eventLoop returns the running loops, starting them the first time; nil when they cannot start (then the
// next tunnel tries again: descriptors may have been freed) or the engine is closed.
func (c *copyEngine) eventLoop() *datapath.EventLoop {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loops != nil || c.closed {
		return c.loops
	}
	start := c.start
	if start == nil {
		start = datapath.StartEventLoop
	}
	e, err := start(c.opts)
	if err != nil {
		c.metrics.datapathFallbacks.WithLabelValues(fallbackLoopStart).Inc()
		c.log.Warn("event loops cannot start, the tunnel runs on goroutines", "err", err)
		return nil
	}
	e.OnFallback = c.fellBack
	c.loops = e
	c.logStarted()
	return e
}

// logStarted says how many loops run and why, and warns when there are more loops than CPUs: they then
// take turns on the CPUs, each turn a context switch, with no more CPU to run on.
func (c *copyEngine) logStarted() {
	why := "the default, one per two CPUs"
	if c.loopsSet {
		why = "set by event_loops (--event-loops)"
	}
	cpus := runtime.NumCPU()
	c.log.Info("event loops started", "loops", c.opts.Loops, "cpus", cpus, "why", why)
	if c.opts.Loops > cpus {
		c.log.Warn("more event loops than CPUs: they take turns on the CPUs, which costs context switches and "+
			"adds no CPU", "loops", c.opts.Loops, "cpus", cpus)
	}
}

// fellBack counts and logs a plain pair the loops could not take, which the Copier carries.
func (c *copyEngine) fellBack(p *datapath.Pair, err error) {
	if c.probeFellBack != nil && c.probeFellBack(p, err.Error()) {
		return
	}
	c.metrics.datapathFallbacks.WithLabelValues(fallbackLoopCarry).Inc()
	c.log.Warn("event loop could not take the tunnel, it runs on goroutines", "id", p.ID, "err", err)
}

// Close stops the loops (resetting any tunnel still on them: the relay drains and closes tunnels first).
func (c *copyEngine) Close() error {
	c.mu.Lock()
	loops := c.loops
	c.loops, c.closed = nil, true
	c.mu.Unlock()
	if loops != nil {
		return loops.Close()
	}
	return nil
}

// spliceEngine is the splice datapath: the copy datapath's event loops carry its tunnels spliced
// (datapath.EventLoop.Splice), each direction borrowing a pipe only while bytes sit in it, so an idle splice
// tunnel holds its two sockets and nothing else. A tunnel the loops cannot take (they cannot start, or cannot
// duplicate its sockets) runs on copy goroutines instead, counted and logged as the copy engine's are, and
// counted as a copy tunnel from then on; no peer is blamed.
type spliceEngine struct {
	copy *copyEngine // whose loops carry the splice tunnels too
}

var _ datapath.Engine = (*spliceEngine)(nil)

func (e *spliceEngine) Kind() Datapath { return DatapathSplice }

// Accepts refuses TLS endpoints: without kernel TLS the bytes must be decrypted in userspace.
func (e *spliceEngine) Accepts(a, b datapath.Endpoint) bool { return a.TLS == nil && b.TLS == nil }

// Close does nothing: the loops are the copy engine's, which closes them.
func (e *spliceEngine) Close() error { return nil }

// Carry hands the pair to the loops, spliced; on copy goroutines when they cannot take it.
func (e *spliceEngine) Carry(p *datapath.Pair) {
	defer e.onCopy(p)
	loops := e.copy.eventLoop()
	if loops == nil {
		datapath.Copier{}.Carry(p)
		return
	}
	spliced := loops.Splice()
	spliced.OnFallback = e.copy.fellBack
	spliced.Carry(p)
}

// onCopy moves a splice tunnel that runs on copy instead to copy's count of live tunnels, where its end
// will be counted. It runs once the Copier has taken the pair, from the kind the pair has then: one that
// ended first stays splice, and its end is counted off splice.
func (e *spliceEngine) onCopy(p *datapath.Pair) {
	if p.Kind() != DatapathCopy {
		return
	}
	e.copy.metrics.tunnelsActive.WithLabelValues(string(DatapathSplice)).Dec()
	e.copy.metrics.tunnelsActive.WithLabelValues(string(DatapathCopy)).Inc()
}

// Stats returns the loops' counters: one zero entry per loop the engine will start before they run, so that
// each loop's series starts at 0.
func (c *copyEngine) Stats() datapath.EventLoopStats {
	c.mu.Lock()
	loops := c.loops
	c.mu.Unlock()
	if loops != nil {
		return loops.Stats()
	}
	return datapath.EventLoopStats{Loops: make([]eventloop.LoopStats, max(c.opts.Loops, 1))}
}
