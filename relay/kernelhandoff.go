package relay

import (
	"fmt"
	"net"
	"os"
	"sync/atomic"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// Kernel tunnels in an upgrade (docs/upgrade.md, "Kernel tunnels"). The old process exports its BPF
// objects with the listeners (ExportKernel); the new one's kernel engine adopts them instead of loading
// its own (Config.KernelObjects) when they are this binary's. Once the new process says so, the old one's
// kernel tunnels can move too (HandKernelTunnels): each leaves the old engine with its sockets left in
// the maps, so that the verdict goes on moving its bytes in the kernel, and the new engine adopts it.

// kernelShares is what the relay knows of the other processes that read its kernel engine's ring buffer,
// so that each one's end is told to the engine (sockmap.Engine.Unshare) once, and only its own: the
// process this one adopted the objects from, and the one they were last exported to.
type kernelShares struct {
	// exported: the objects were exported to a process an upgrade started, which may not have adopted
	// them yet (WithdrawKernelExport).
	exported atomic.Bool
	// adoptedEnded: the process the objects were adopted from reads them no more (UnshareKernel).
	adoptedEnded atomic.Bool
	// eventsStopped: this engine reads the ring buffer no more (StopKernelEvents).
	eventsStopped atomic.Bool
}

// ExportKernel returns descriptors of the kernel engine's BPF objects for the process an upgrade starts,
// which the caller closes; none when this relay runs no kernel engine. Until WithdrawKernelExport, that
// process counts as a reader of the ring buffer.
func (s *Server) ExportKernel() (map[string]*os.File, error) {
	if s.kernel == nil {
		return nil, nil
	}
	files, err := s.kernel.Export()
	if err == nil {
		if s.kernelShares.exported.Swap(true) {
			s.kernel.Unshare() // an earlier export's process, which did not adopt them, is not withdrawn yet
		}
	}
	return files, err
}

// WithdrawKernelExport says that the process the BPF objects were exported to did not adopt them (it
// failed to start, or runs another datapath or BPF build): it reads no mode events. A call without such
// an export does nothing.
func (s *Server) WithdrawKernelExport() {
	if s.kernel != nil && s.kernelShares.exported.Swap(false) {
		s.kernel.Unshare()
	}
}

// HandKernelTunnels makes the kernel tunnels movable: the new process adopted the BPF objects.
func (s *Server) HandKernelTunnels() { s.tunnels.kernelMovable.Store(true) }

// UnshareKernel tells the kernel engine that the process it adopted the BPF objects from reads their
// ring buffer no more: that process stopped reading (KernelEventsStopped there) or is gone. Only then:
// an event it read for a tunnel of this one is found by the engine's sweeps alone. Later calls, or calls
// without adopted objects, do nothing.
func (s *Server) UnshareKernel() {
	if s.kernel != nil && s.kernelAdopted && !s.kernelShares.adoptedEnded.Swap(true) {
		s.kernel.Unshare()
	}
}

// StopKernelEvents stops the kernel engine's reading of the ring buffer once it has handed over its
// objects and holds no kernel tunnel: the new process's engine reads every event from then on.
func (s *Server) StopKernelEvents() {
	if s.kernel == nil || !s.tunnels.kernelMovable.Load() || s.kernel.Tunnels() > 0 || s.kernelShares.eventsStopped.Load() {
		return
	}
	if err := s.kernel.StopEvents(); err != nil {
		s.log.Warn("upgrade: could not stop reading the kernel datapath's mode events", "err", err)
		return
	}
	s.kernelShares.eventsStopped.Store(true)
}

// KernelEventsStopped reports whether this relay reads no mode events of a kernel engine: it runs none,
// or StopKernelEvents stopped them. The process it handed its objects to may then stop its sweeps.
func (s *Server) KernelEventsStopped() bool {
	return s.kernel == nil || s.kernelShares.eventsStopped.Load()
}

// ReadsSharedKernelEvents reports whether this process still reads the mode-change ring buffer it shares
// with the process that adopted its BPF objects: it carries kernel tunnels still, so StopKernelEvents has
// not stopped the reading. That process must go on sweeping its own tunnels' modes (UnshareKernel not yet)
// meanwhile: an event this one reads is lost to it.
func (s *Server) ReadsSharedKernelEvents() bool {
	return s.kernel != nil && s.tunnels.kernelMovable.Load() && s.kernel.Tunnels() > 0
}

// KernelAdopted reports whether the kernel engine runs over the BPF objects of the relay this one
// replaced.
func (s *Server) KernelAdopted() bool { return s.kernelAdopted }

// CanMove reports whether t can be handed to another process now: a plain userspace tunnel (Movable), or
// a kernel tunnel once the other process adopted the BPF objects (HandKernelTunnels).
func (r *Registry) CanMove(t *Tunnel) bool {
	if t.Movable() {
		return true
	}
	return r.kernelMovable.Load() && !t.pair.TLS() && t.pair.Kind() == DatapathSockmap && !t.pair.Ending()
}

// adoptKernel starts the kernel engine over Config.KernelObjects; nil, with the reason logged, when there
// are none or they are refused (another BPF build): the relay then loads its own objects, and the old
// process's kernel tunnels stay there.
func (s *Server) adoptKernel() *sockmap.Engine {
	objs := s.cfg.KernelObjects
	if objs == nil {
		return nil
	}
	s.cfg.KernelObjects = nil
	k, err := sockmap.StartAdopted(s.log, s.kernelFallback, uint64(s.cfg.KernelHeldLimit), objs)
	if err != nil {
		s.log.Warn("upgrade: the old process's BPF objects were not adopted; its kernel tunnels stay there and drain",
			"err", err)
		return nil
	}
	s.kernelAdopted = true
	s.log.Info("upgrade: adopted the old process's BPF objects; its kernel tunnels can move here")
	return k
}

// dropKernelObjects closes Config.KernelObjects that the kernel engine did not take: this relay's
// datapath is not the kernel one.
func (s *Server) dropKernelObjects() {
	if s.cfg.KernelObjects == nil {
		return
	}
	for _, f := range s.cfg.KernelObjects {
		f.Close()
	}
	s.cfg.KernelObjects = nil
	s.log.Warn("upgrade: this process's datapath is not sockmap; the old process's kernel tunnels stay there and drain",
		"datapath", s.cfg.Datapath)
}

// parkKernel lets go of a kernel tunnel with its sockets left in the maps (sockmap.Engine.LetGo): the
// parked tunnel's Kernel is what the new process's engine needs. A tunnel in a transient state (its
// handshake finishing, a give-back under way) gives an error wrapping sockmap.ErrBusy, and is left as it
// was: it may be parked later. (Park refuses one no engine carries yet before it comes here.)
func (s *Server) parkKernel(t *Tunnel) (*ParkedTunnel, error) {
	last, _ := t.pair.LastActive()
	t.parked.Store(true)
	st, err := s.kernel.LetGo(t.pair)
	if err != nil {
		t.parked.Store(false)
		return nil, err
	}
	pt := &ParkedTunnel{T: t, Datapath: DatapathSockmap, State: t.pair.State(), HalfClosedTimeout: t.halfClosedTimeout,
		URI: t.req.uri, Host: t.req.host, UserAgent: t.req.userAgent, ClientIP: t.clientIP, Kernel: &st}
	pt.LastActive = later(t.Started, later(t.activeAt(), later(pt.State.LastActive, last)))
	return pt, nil
}

// resumeKernel carries on here a kernel tunnel the new process did not take: this engine adopts it back.
func (s *Server) resumeKernel(pt *ParkedTunnel) {
	if err := s.kernel.Adopt(pt.T.pair, *pt.Kernel); err != nil {
		s.log.Error("upgrade: a kernel tunnel the new process did not take cannot be carried on here; resetting it",
			"id", pt.T.ID, "err", err)
		s.discardKernel(pt.T, *pt.Kernel)
		pt.T.pair.Fail(datapath.ReasonKernelError, err, true)
	}
}

// discardKernel takes the sockets of a kernel tunnel that no engine carries out of the BPF maps, before
// its pair is ended: closing them would leave their entries in the state map.
func (s *Server) discardKernel(t *Tunnel, st sockmap.TunnelState) {
	if err := s.kernel.Discard(st); err != nil {
		s.log.Warn("upgrade: removing a kernel tunnel that could not be carried from the BPF maps", "id", t.ID, "err", err)
	}
}

// adoptedKind is the datapath a handed-over tunnel runs on here: sockmap for a kernel tunnel, which needs
// this process to have adopted the BPF objects and its sockets to be the ones its state names; splice or
// copy for the others (plain copy tunnels on the event loops).
func (s *Server) adoptedKind(a Adoption, client, upstream *net.TCPConn) (Datapath, error) {
	switch {
	case a.Kernel == nil && a.Datapath == DatapathSplice:
		return DatapathSplice, nil
	case a.Kernel == nil:
		return DatapathCopy, nil
	case !s.kernelAdopted:
		return "", fmt.Errorf("kernel tunnel %d: this process did not adopt the BPF objects that carry it", a.ID)
	}
	if err := s.kernel.CheckAdoptable(*a.Kernel, client, upstream); err != nil {
		return "", err
	}
	return DatapathSockmap, nil
}

// carryAdoptedKernel has the kernel engine adopt an adopted kernel tunnel, whose sockets are in the maps.
func (s *Server) carryAdoptedKernel(t *Tunnel) {
	st := *t.adopted.kernel
	t.adopted.kernel = nil
	if err := s.kernel.Adopt(t.pair, st); err != nil {
		s.log.Error("upgrade: an adopted kernel tunnel cannot be carried here; resetting it", "id", t.ID, "err", err)
		s.discardKernel(t, st) // the old process has let go of it
		t.pair.Fail(datapath.ReasonKernelError, err, true)
	}
}
