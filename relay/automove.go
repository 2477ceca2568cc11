package relay

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/auto"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// Per-tunnel auto (docs/datapath.md, "auto per tunnel"): where `auto` resolved to the kernel engine, each
// plain tunnel of a listener on auto starts on the policy's start engine (by default the event loop, until
// and unless the start measurement, autoprobe.go, says otherwise), and one goroutine, the sampler, reads the
// counters of every such tunnel that the policy in force can move off the engine it is on (auto.Policy.Moves;
// under LoopFirst, none on the loop) each Policy.Interval (the verdict's, or the event loop's: no work on the
// data path), asks auto.Decide whether it should move, and moves it with datapath.Move on a goroutine of its
// own. A tunnel the policy cannot move costs the sampler nothing: it is not tracked until a policy that can
// move it is put in force (apply). At most
// Policy.MaxInFlight moves run at once and at most Policy.MovesPerSecond start a second: a move off the
// kernel waits, with no time limit, while a reader has stopped and the kernel holds bytes for it, so the
// sampler never waits for a move, and a stuck move holds one slot, not the sampler.

// autoMover is the sampler and the moves it starts.
type autoMover struct {
	s *Server
	// policy is the policy in force: the measured one replaces the default once the start measurement
	// is done (Interval, MovesPerSecond and MaxInFlight are the same in both).
	policy atomic.Pointer[auto.Policy]
	// decide is auto.Decide unless a test's (Config.autoDecide).
	decide func(auto.Policy, auto.Sample, auto.History) auto.Decision
	slots  chan struct{} // one per move in flight

	// began is when the sampler started: autoTrack.lastAt counts from it.
	began time.Time

	mu sync.Mutex
	// tracked are the tunnels the policy in force can move off their engine, and, marked released, those
	// an upgrade took out of the policy.
	tracked map[*Tunnel]*autoTrack
	// pairs are the pairs being moved: a move counts its tunnel in sockrelay_tunnels_active itself, the
	// kernel engine's fallback to copy included (Server.kernelFallback asks movingPair).
	pairs   map[*datapath.Pair]bool
	moving  sync.WaitGroup // moves, and the start measurement
	measure context.CancelFunc
	stop    chan struct{}
	done    chan struct{}
	stopped bool
	// probes are the start measurement's pairs, each with why its engine did not carry it ("" while it
	// does): their fallbacks count and log nothing (probeFellBack), and stop the measurement.
	probes map[*datapath.Pair]string
}

// autoTrack is what the sampler keeps of one tunnel; guarded by autoMover.mu.
type autoTrack struct {
	hist auto.History
	// last are the counts of carrier at lastAt (since autoMover.began, monotonic): a sample is the
	// difference to the next ones while the same carrier holds the pair (each engine counts from 0).
	last    datapath.Counts
	carrier datapath.Carrier
	lastAt  time.Duration
	moving  bool // a move of it runs; the sampler leaves it alone
}

// released marks in autoMover.tracked a tunnel an upgrade took out of the policy (release): the sampler
// leaves it alone, and no policy put in force tracks it again, until it ends or is carried here again.
var released = &autoTrack{}

// startAutoMoves starts the sampler on a server whose auto datapath loaded the kernel engine, and, unless
// the configuration names the start engine (or a test its policy), the start measurement in the
// background. The log says once the policy in force: at once, or with what was measured once the
// measurement is done.
func (s *Server) startAutoMoves() error {
	p, measure, err := s.cfg.Auto.policy()
	if err != nil {
		return err
	}
	chosen := "no: auto.start is " + s.cfg.Auto.Start
	if s.cfg.autoPolicy != nil {
		p, measure, chosen = *s.cfg.autoPolicy, false, "no: a test's policy"
		if err := p.Validate(); err != nil {
			return err
		}
	}
	decide := s.cfg.autoDecide
	if decide == nil {
		decide = auto.Decide
	}
	m := &autoMover{s: s, decide: decide, slots: make(chan struct{}, p.MaxInFlight), began: time.Now(),
		tracked: map[*Tunnel]*autoTrack{}, pairs: map[*datapath.Pair]bool{}, stop: make(chan struct{}), done: make(chan struct{})}
	m.policy.Store(&p)
	s.auto = m
	if measure {
		ctx, cancel := context.WithCancel(context.Background())
		m.measure = cancel
		m.moving.Add(1)
		go m.measureAndApply(ctx)
	} else {
		s.log.Info("datapath policy: per tunnel", append([]any{"measured", chosen}, policyAttrs(p)...)...)
	}
	go m.run()
	return nil
}

// measureAndApply runs the start measurement and puts the policy it calls for in force, with the
// configuration's thresholds over it.
func (m *autoMover) measureAndApply(ctx context.Context) {
	defer m.moving.Done()
	began := time.Now()
	c := m.s.measureCosts(ctx, m)
	took := time.Since(began)
	p, why := auto.Measured(c)
	p = m.s.cfg.Auto.over(p)
	if err := p.Validate(); err != nil { // AutoOptions.policy checked every policy Measured returns
		m.s.log.Error("auto policy: the measured policy is invalid; the default stays in force", "err", err)
		return
	}
	if ctx.Err() != nil {
		return // closed meanwhile
	}
	m.apply(p)
	kernel, loop := c.Medians()
	attrs := []any{"measured", c.Verdict(), "why", why, "measure_ms", took.Milliseconds(), "host_busy", round2(c.HostBusy), "host_busy_after", round2(c.HostBusyAfter),
		"background_ctxsw_per_s", math.Round(c.Background), "rounds", len(c.Kernel),
		"kernel_ctxsw_per_msg", round2(kernel), "loop_ctxsw_per_msg", round2(loop),
		"direct_ctxsw_per_msg", c.Direct, "busy_us_per_msg_kernel_loop_direct",
		[]float64{round2(c.BusyKernel), round2(c.BusyLoop), round2(c.BusyDirect)},
		"kernel_idle_bytes", auto.KernelIdleBytes, "loop_idle_bytes", auto.LoopIdleBytes}
	if c.Err != nil {
		attrs = append(attrs, "err", c.Err)
	}
	m.s.log.Info("datapath policy: per tunnel", append(attrs, policyAttrs(p)...)...)
}

// apply puts p in force. Where p can move tunnels off an engine that the policy before could not, every
// open tunnel that p can move is tracked now, so that none stays pinned by the change; the tunnels p can
// no longer move are dropped at the next sample.
func (m *autoMover) apply(p auto.Policy) {
	old := m.policy.Swap(&p)
	if p.Moves(auto.Kernel) && !old.Moves(auto.Kernel) || p.Moves(auto.Loop) && !old.Moves(auto.Loop) {
		m.trackOpen()
	}
}

// trackOpen tracks every open tunnel of a listener on auto, with no TLS, neither ending nor parked nor
// released, that the policy in force can move and is not tracked yet. A tunnel opening meanwhile is
// registered before its track reads the policy: it is in the registry here, or its track reads p.
func (m *autoMover) trackOpen() {
	for _, t := range m.s.tunnels.Tunnels() {
		if t.pair.TLS() || t.pair.Ending() || t.Parked() || !m.s.onAuto(t.Listener) {
			continue
		}
		e := engineOfKind(t.pair.Kind())
		m.mu.Lock()
		if _, known := m.tracked[t]; !known {
			m.watch(t, e)
		}
		m.mu.Unlock()
	}
}

// onAuto says whether the listener of this name is prepared here on auto.
func (s *Server) onAuto(listener string) bool {
	s.listenersMu.Lock()
	defer s.listenersMu.Unlock()
	return s.autoListeners[listener]
}

// watch tracks t from a fresh history when the policy in force can move it off e, the engine it is on,
// and forgets it otherwise; m.mu held.
func (m *autoMover) watch(t *Tunnel, e auto.Engine) {
	switch {
	case m.stopped:
	case m.policy.Load().Moves(e):
		m.tracked[t] = &autoTrack{}
	default:
		delete(m.tracked, t)
	}
}

// round2 rounds v to two decimals, for the log.
func round2(v float64) float64 { return math.Round(v*100) / 100 }

// policyAttrs are the policy's settings, for the log.
func policyAttrs(p auto.Policy) []any {
	return []any{"start", p.Start, "idle_on", p.Idle, "interval", p.Interval,
		"to_loop_demotions_per_sample", p.LeaveDemotions, "to_loop_segments_per_s", p.ChattySegments,
		"to_loop_max_bytes_per_segment", p.ChattyBytesPerSegment, "to_kernel_below_segments_per_s", p.CalmSegments,
		"to_kernel_bytes_per_segment", p.LargeBytesPerSegment, "to_kernel_busy_segments_per_s", p.BusySegments,
		"to_idle_quiet", p.QuietFor, "min_dwell", p.MinDwell, "max_dwell", p.MaxDwell, "moves_per_s", p.MovesPerSecond,
		"moves_in_flight", p.MaxInFlight}
}

// startKind is the datapath a new tunnel of a listener on auto starts on.
func (m *autoMover) startKind() Datapath { return kindOf(m.policy.Load().Start) }

// probing marks p as a pair of the start measurement (on), or no longer (off): a fallback of it counts no
// tunnel and logs nothing.
func (m *autoMover) probing(p *datapath.Pair, on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.probes == nil {
		m.probes = map[*datapath.Pair]string{}
	}
	if on {
		m.probes[p] = ""
	} else {
		delete(m.probes, p)
	}
}

// probeFellBack records why p's engine did not carry it, and says whether p is a pair of the start
// measurement: then its fallback is no tunnel's.
func (m *autoMover) probeFellBack(p *datapath.Pair, why string) bool {
	if m == nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.probes[p]; !ok {
		return false
	}
	m.probes[p] = why
	return true
}

// probeRefused is why p's engine did not carry it, "" when it did.
func (m *autoMover) probeRefused(p *datapath.Pair) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.probes[p]
}

// track puts a tunnel that has just opened, or is carried here again, under the policy, when its listener
// is on auto and it has no TLS (TLS stays on copy: the kernel engine refuses it), and the policy in force
// can move it off its engine (watch).
func (m *autoMover) track(t *Tunnel, l listenerInfo) {
	if m == nil || !l.perTunnel || t.pair.TLS() {
		return
	}
	e := engineOfKind(t.pair.Kind())
	m.mu.Lock()
	defer m.mu.Unlock()
	m.watch(t, e)
}

// trackCarried puts a tunnel this process carries again, adopted in an upgrade or resumed after a failed
// park, under the policy when its listener here is on auto, with a fresh history: a tunnel's engine changes
// in an upgrade, and its counts start from 0 there. A tunnel whose listener is not prepared here yet waits
// for it (listenerSetup tracks it then, if the listener is on auto), rather than stay pinned for good.
func (s *Server) trackCarried(t *Tunnel) {
	if s.auto == nil {
		return
	}
	s.listenersMu.Lock()
	perTunnel, known := s.autoListeners[t.Listener]
	// Ending is asked after waitingEarly is set: a tunnel that ends meanwhile is either seen ending here, or
	// seen waiting by forgetWaiting, which tunnelEnded calls once the pair is ending.
	s.waitingEarly.Store(true)
	if !known && !t.pair.Ending() {
		if s.adoptedEarly == nil {
			s.adoptedEarly = map[string][]*Tunnel{}
		}
		s.adoptedEarly[t.Listener] = append(s.adoptedEarly[t.Listener], t)
	}
	s.waitingEarly.Store(len(s.adoptedEarly) > 0)
	s.listenersMu.Unlock()
	s.auto.track(t, listenerInfo{name: t.Listener, perTunnel: perTunnel})
}

// forgetWaiting lets go of an ended tunnel that waited for its listener (trackCarried), and of the listener's
// list once empty, so that a listener never prepared here (an upgrade whose new configuration dropped it)
// keeps no tunnel past its end. The list of one that may yet come keeps its live tunnels (the registry holds
// them anyway): a reload that prepares it puts them under the policy. Most tunnels never waited: they cost
// one atomic load here.
func (s *Server) forgetWaiting(t *Tunnel) {
	if !s.waitingEarly.Load() {
		return
	}
	s.listenersMu.Lock()
	defer s.listenersMu.Unlock()
	waiting := slices.DeleteFunc(s.adoptedEarly[t.Listener], func(w *Tunnel) bool { return w == t })
	if len(waiting) == 0 {
		delete(s.adoptedEarly, t.Listener)
	} else {
		s.adoptedEarly[t.Listener] = waiting
	}
	s.waitingEarly.Store(len(s.adoptedEarly) > 0)
}

// movesOf is how many moves t made in this process, and whether the policy in force can move it now (the
// sampler tracks it).
func (m *autoMover) movesOf(t *Tunnel) (moves int, tracked bool) {
	if m == nil {
		return 0, false
	}
	m.mu.Lock()
	tr, ok := m.tracked[t]
	m.mu.Unlock()
	return int(t.moves.Load()), ok && tr != released
}

// run samples every Policy.Interval until close.
func (m *autoMover) run() {
	defer close(m.done)
	tick := time.NewTicker(m.policy.Load().Interval)
	defer tick.Stop()
	for {
		select {
		case <-m.stop:
			return
		case now := <-tick.C:
			m.sample(now)
		}
	}
}

// autoMove is a move the sampler decided on.
type autoMove struct {
	t    *Tunnel
	tr   *autoTrack
	from auto.Engine
	d    auto.Decision
}

// sample reads every tracked tunnel's counts, forgets the tunnels that ended, and starts the moves the policy
// asks for, within the caps.
func (m *autoMover) sample(now time.Time) {
	m.mu.Lock()
	tunnels := make([]*Tunnel, 0, len(m.tracked))
	for t := range m.tracked {
		tunnels = append(tunnels, t)
	}
	m.mu.Unlock()
	if len(tunnels) == 0 {
		return
	}
	p := *m.policy.Load()
	budget := max(1, int(float64(p.MovesPerSecond)*p.Interval.Seconds()))
	m.readKernelCounts()
	var moves []autoMove
	for _, t := range tunnels {
		// Ending, not Done: Done makes the pair's channel, which an idle tunnel would then keep for its life.
		if t.pair.Ending() {
			m.mu.Lock()
			delete(m.tracked, t)
			m.mu.Unlock()
			continue
		}
		if t.Parked() {
			continue // an upgrade is handing it over
		}
		// Read outside m.mu: a kernel tunnel's counts can be a map lookup per socket (one inserted since
		// readKernelCounts).
		counts, carrier, ok := t.pair.Counts()
		kind := t.pair.Kind()
		from := engineOfKind(kind)
		at := now.Sub(m.began)
		m.mu.Lock()
		tr := m.tracked[t]
		if !ok || tr == nil || tr == released || tr.moving {
			m.mu.Unlock()
			continue
		}
		if !m.policy.Load().Moves(from) {
			// The policy in force cannot move it off its engine (changed, or the kernel engine fell back
			// to copy): no work for it until one can (apply). Read again under the lock, not p: a policy
			// put in force since this sample began has had apply's trackOpen skip this tunnel as tracked,
			// so dropping it under the old policy would pin it.
			delete(m.tracked, t)
			m.mu.Unlock()
			continue
		}
		if carrier != tr.carrier {
			tr.carrier, tr.last, tr.lastAt = carrier, counts, at // a new engine counts from 0
			m.mu.Unlock()
			continue
		}
		s := sampleOf(from, at-tr.lastAt, tr.last, counts)
		tr.last, tr.lastAt = counts, at
		tr.hist.Observe(s)
		d := m.decide(p, s, tr.hist)
		if _, half := t.pair.HalfClosedSince(); half && d.To == auto.Kernel {
			// A socket that got its FIN cannot enter a sockhash: the kernel engine would hand the pair to
			// the goroutine copier, where it would stay.
			d.Move = false
		}
		if d.Move && len(moves) < budget {
			tr.moving, m.pairs[t.pair] = true, true
			moves = append(moves, autoMove{t: t, tr: tr, from: from, d: d})
		}
		m.mu.Unlock()
	}
	for i, mv := range moves {
		select {
		case m.slots <- struct{}{}:
		default:
			// Every slot holds a move still running (a reader that stopped, most likely): the rest wait
			// for a later sample.
			m.mu.Lock()
			for _, left := range moves[i:] {
				left.tr.moving = false
				delete(m.pairs, left.t.pair)
			}
			m.mu.Unlock()
			return
		}
		m.moving.Add(1)
		go m.move(mv)
	}
}

// sampleOf is what an engine counted of a tunnel between two readings, each direction apart. Segments are
// counted modulo 2³² on the loop (datapath.DirCounts), so their difference is taken modulo 2³²: exact, since
// no direction reads 2³² times between two samples.
func sampleOf(e auto.Engine, elapsed time.Duration, last, now datapath.Counts) auto.Sample {
	s := auto.Sample{Engine: e, Elapsed: elapsed}
	for i, d := range now.Dirs {
		l := last.Dirs[i]
		s.Dirs[i] = auto.Flow{Bytes: d.Bytes - l.Bytes, Segments: uint64(uint32(d.Segments - l.Segments)),
			Demotions: d.Demotions - l.Demotions}
	}
	return s
}

// readKernelCounts reads every kernel tunnel's counters at once, so that each one's Counts in this sample
// costs no system call: one batched read, not two map lookups per tunnel, idle ones included. On failure
// each tunnel's Counts looks its sockets up, as before.
func (m *autoMover) readKernelCounts() {
	if m.s.kernel == nil {
		return
	}
	if err := m.s.kernel.ReadCounts(); err != nil {
		m.s.log.Warn("auto sampler: batched read of kernel counts failed; reading each tunnel's", "err", err)
	}
}

// engineOf is the server's engine for a policy's engine.
func (m *autoMover) engineOf(e auto.Engine) datapath.Engine {
	if e == auto.Kernel {
		return m.s.kernel
	}
	return m.s.copier
}

// engineOfKind is the policy's engine for a datapath kind: every kind but sockmap is userspace.
func engineOfKind(k Datapath) auto.Engine {
	if k == DatapathSockmap {
		return auto.Kernel
	}
	return auto.Loop
}

// kindOf is the datapath kind of a policy's engine.
func kindOf(e auto.Engine) Datapath {
	if e == auto.Kernel {
		return DatapathSockmap
	}
	return DatapathCopy
}

// release takes t out of the policy for good, before an upgrade parks it, so that no move carries it onto
// an engine while it is handed over. false when a move of it runs now: it cannot be parked then (it stays
// here and drains), and stays where that move leaves it.
func (m *autoMover) release(t *Tunnel) bool {
	if m == nil {
		return true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	tr, ok := m.tracked[t]
	if !m.stopped {
		m.tracked[t] = released // not tracked again by a policy put in force meanwhile (trackOpen)
	}
	return !ok || !tr.moving
}

// movingPair reports whether a move of p runs now.
func (m *autoMover) movingPair(p *datapath.Pair) bool {
	if m == nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pairs[p]
}

// move runs one move on its own goroutine and records how it went. The tunnel's count in
// sockrelay_tunnels_active moves to the datapath it is on after the move, whatever happened: moved, failed,
// ended first (its kind then stays, and tunnelEnded counts it off there), or fell back from the kernel to
// copy (kernelFallback leaves the count to this).
func (m *autoMover) move(mv autoMove) {
	defer m.moving.Done()
	defer func() { <-m.slots }()
	from, to := kindOf(mv.from), kindOf(mv.d.To)
	err := datapath.Move(mv.t.pair, m.engineOf(mv.d.To))
	now := mv.t.pair.Kind()
	if now != from {
		active := m.s.metrics.tunnelsActive
		active.WithLabelValues(string(from)).Dec()
		active.WithLabelValues(string(now)).Inc()
	}
	if err == nil {
		mv.t.moves.Add(1)
	}
	m.mu.Lock()
	mv.tr.moving = false
	// The next sample takes a baseline: a sample that read the tunnel's counts and kind before this move
	// returned, and locks after it, holds the engine it left, and would move it again from there.
	mv.tr.carrier = nil
	delete(m.pairs, mv.t.pair)
	p := *m.policy.Load()
	switch {
	case err == nil:
		mv.tr.hist.Moved(p, mv.from, mv.d)
	case !errors.Is(err, datapath.ErrPairEnded):
		mv.tr.hist.On = 0 // not again before a dwell
	}
	if m.tracked[mv.t] == mv.tr && !p.Moves(engineOfKind(now)) {
		delete(m.tracked, mv.t) // where it is now, no rule moves it (a kernel tunnel on the loop under LoopFirst)
	}
	m.mu.Unlock()
	switch {
	case err == nil:
		m.s.metrics.tunnelMoves.WithLabelValues(string(from), string(to), string(mv.d.Reason)).Inc()
		m.s.log.Debug("tunnel moved", "id", mv.t.ID, "from", from, "to", to, "reason", mv.d.Reason)
	case errors.Is(err, datapath.ErrPairEnded):
	case errors.Is(err, sockmap.ErrBusy):
		// The kernel engine declined to give the pair back now (its sender outran the give-back's bound,
		// or a half-closed source): the tunnel stays on sockmap as it was, and is tried again after a dwell.
		m.s.metrics.tunnelMovesDeferred.WithLabelValues(string(from), string(to)).Inc()
		m.s.log.Debug("tunnel move deferred", "id", mv.t.ID, "from", from, "to", to, "reason", mv.d.Reason, "err", err)
	default:
		// Move leaves the pair where it was, or ended (the kernel engine resets a pair it could not give
		// back): never without an engine.
		m.s.metrics.tunnelMoveFailures.WithLabelValues(string(from), string(to)).Inc()
		m.s.log.Warn("tunnel move failed", "id", mv.t.ID, "from", from, "to", to, "reason", mv.d.Reason,
			"ended", mv.t.pair.Ending(), "err", err)
	}
}

// close stops the sampler and the start measurement, and waits for them and for the moves in flight,
// which end once their pairs do: the caller
// has closed every tunnel first, so that none waits on a reader, and no move carries a pair onto an engine
// being closed.
func (m *autoMover) close() {
	if m == nil {
		return
	}
	m.mu.Lock()
	if m.stopped {
		m.mu.Unlock()
		return
	}
	m.stopped = true
	m.tracked = map[*Tunnel]*autoTrack{}
	m.mu.Unlock()
	if m.measure != nil {
		m.measure()
	}
	close(m.stop)
	<-m.done
	m.moving.Wait()
}

// AutoOptions are the settings of auto's per-tunnel policy (configuration `auto`, docs/datapath.md, "auto
// per tunnel"). The zero value measures at start and keeps the thresholds of the policy it chooses.
type AutoOptions struct {
	// Start is AutoStartMeasured (or ""), AutoStartCopy or AutoStartSockmap.
	Start string
	// ChattySegments, BusySegments, QuietFor, MinDwell and MaxDwell, when not 0, replace the policy's
	// (auto.Policy's fields of the same names).
	ChattySegments, BusySegments float64
	QuietFor, MinDwell, MaxDwell time.Duration
}

// The values of AutoOptions.Start.
const (
	// AutoStartMeasured: measure what a message costs on each engine at start, and follow auto.Measured.
	AutoStartMeasured = "measured"
	// AutoStartCopy: auto.LoopFirst, with no measurement.
	AutoStartCopy = "copy"
	// AutoStartSockmap: auto.KernelFirst, with no measurement (the first version's policy).
	AutoStartSockmap = "sockmap"
)

// policy is the policy in force from the start, and whether the start measurement is to replace it. Every
// policy it may be replaced with is checked now, with the options over it, so that a threshold out of range
// fails the start, naming the option.
func (o AutoOptions) policy() (p auto.Policy, measure bool, err error) {
	start := o.Start
	switch start {
	case "", AutoStartMeasured:
		p, measure, start = o.over(auto.LoopFirst), true, AutoStartMeasured
	case AutoStartCopy:
		p = o.over(auto.LoopFirst)
	case AutoStartSockmap:
		p = o.over(auto.KernelFirst)
	default:
		return p, false, fmt.Errorf("auto.start %q: accepted %s, %s or %s", o.Start, AutoStartMeasured, AutoStartCopy, AutoStartSockmap)
	}
	for _, c := range auto.StartPolicies(start) {
		if err := o.settings().Check(c); err != nil {
			return p, false, fmt.Errorf("auto.start %s: %w", start, err)
		}
	}
	return p, measure, nil
}

// settings are the options' thresholds, as datapath/auto takes them.
func (o AutoOptions) settings() auto.Settings {
	return auto.Settings{ChattySegments: o.ChattySegments, BusySegments: o.BusySegments, QuietFor: o.QuietFor,
		MinDwell: o.MinDwell, MaxDwell: o.MaxDwell}
}

// over is p with the options' thresholds that are set.
func (o AutoOptions) over(p auto.Policy) auto.Policy { return o.settings().Over(p) }

// moveMetrics are sockrelay_tunnel_moves_total, sockrelay_tunnel_move_failures_total and
// sockrelay_tunnel_moves_deferred_total, every series at 0 from the start.
func moveMetrics() (moves, failures, deferred *prometheus.CounterVec) {
	moves = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sockrelay_tunnel_moves_total",
		Help: "Live tunnels moved between datapaths by auto's per-tunnel policy, by from, to and reason.",
	}, []string{"from", "to", "reason"})
	failures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sockrelay_tunnel_move_failures_total",
		Help: "Moves of live tunnels that failed, by from and to: the tunnel stayed where it was, or was reset if the kernel engine could not give it back.",
	}, []string{"from", "to"})
	deferred = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sockrelay_tunnel_moves_deferred_total",
		Help: "Moves of live tunnels the engine declined for now (busy), by from and to: the tunnel stayed where it was, to be tried again after a dwell.",
	}, []string{"from", "to"})
	for _, e := range []auto.Engine{auto.Kernel, auto.Loop} {
		from, to := kindOf(e), kindOf(1-e)
		failures.WithLabelValues(string(from), string(to))
		deferred.WithLabelValues(string(from), string(to))
		for _, r := range auto.Reasons {
			moves.WithLabelValues(string(from), string(to), string(r))
		}
	}
	return moves, failures, deferred
}
