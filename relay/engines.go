package relay

import (
	"errors"
	"fmt"
	"strings"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
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
			s.log.Info("datapath chosen", "datapath", DatapathSockmap, "requested", requested,
				"why", "the kernel passed the probe and the self-test")
			return nil
		}
		if requested == DatapathSockmap {
			return fmt.Errorf("%w: %v", ErrDatapathUnavailable, err)
		}
		var reason string
		switch {
		case errors.Is(err, errSelfTest):
			reason = "sockmap_selftest_failed"
		default:
			reason = "sockmap_unavailable"
		}
		s.metrics.datapathFallbacks.WithLabelValues(reason).Inc()
		s.log.Warn("kernel datapath unavailable, using a userspace one", "reason", reason, "err", err)
		return s.chooseUserspace(requested, []string{err.Error()})
	}
	if err := DatapathAvailable(requested); err != nil {
		return err
	}
	s.log.Info("datapath chosen", "datapath", requested, "requested", requested, "why", "requested by name")
	return nil
}

// chooseUserspace picks the first of splice and copy that can run, logging why.
func (s *Server) chooseUserspace(requested Datapath, skipped []string) error {
	for _, d := range []Datapath{DatapathSplice, DatapathCopy} {
		err := DatapathAvailable(d)
		if err == nil {
			s.cfg.Datapath = d
			s.log.Info("datapath chosen", "datapath", d, "requested", requested,
				"why", "best available; skipped "+strings.Join(skipped, "; "))
			return nil
		}
		skipped = append(skipped, err.Error())
	}
	return fmt.Errorf("%w: no datapath can run: %s", ErrDatapathUnavailable, strings.Join(skipped, "; "))
}

// startKernelPath probes the kernel, loads the BPF objects and runs the self-test on them.
func (s *Server) startKernelPath() (*kernelPath, error) {
	if err := loader.Probe().Err(); err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k, err := newKernelPath(s.log, s.kernelFallback)
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	if s.cfg.alterKernelPath != nil {
		s.cfg.alterKernelPath(k)
	}
	if err := k.selfTest(); err != nil {
		k.Close()
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k.resetStats() // after the self-test: its demotions are not the users'
	k.heldLimit = uint64(s.cfg.KernelHeldLimit)
	return k, nil
}

// kernelStats are the kernel engine's counts, zero when the server runs no kernel engine. The engine is
// set up in NewServer, before anything can scrape the metrics that read it.
func (s *Server) kernelStats() kernelStats {
	if s.kernel == nil {
		return kernelStats{}
	}
	return s.kernel.Stats()
}

// Datapath is the datapath this server's tunnels use, auto resolved.
func (s *Server) Datapath() Datapath { return s.cfg.Datapath }

// kernelFallback counts a tunnel the kernel datapath handed to the copy datapath.
func (s *Server) kernelFallback(_ *datapath.Pair, reason string) {
	s.metrics.tunnelsActive.WithLabelValues(string(DatapathSockmap)).Dec()
	s.metrics.tunnelsActive.WithLabelValues(string(DatapathCopy)).Inc()
	s.metrics.datapathFallbacks.WithLabelValues(reason).Inc()
}
