package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/auto"
)

// The start measurement of auto's per-tunnel policy (docs/datapath.md, "auto per tunnel"): in the
// background, once the engines are up, the relay sends 64-byte round trips over loopback through a pair on
// the kernel engine, a pair on the event loop and a direct connection with no relay, in rounds that rotate
// their order, and counts the machine's context switches (and busy CPU) per message on each. auto.Measured
// turns the counts into the policy in force. The probe's pairs are the relay's own engines' (the same code
// as a tunnel's), with no Tunnel: no tunnel metric, log line or limit counts them.

const (
	// probeTrips is how many round trips a path makes in a round, over probePairs connections at once
	// (tunnels are many, and an engine's wake-ups may serve several), after probeWarmup on each that are
	// not counted (the first bytes of a kernel pair, the loop's first wake-ups).
	probeTrips  = 200
	probePairs  = 8
	probeWarmup = 5
	// probeTimeout bounds the whole measurement; past it the rounds done so far are all there is.
	probeTimeout = 800 * time.Millisecond
	// probeHostWindow is how long the measurement first watches how busy the host is, sending nothing
	// (auto.MaxHostBusy): /proc/stat counts in 10 ms ticks, 20 of them a CPU over this window.
	probeHostWindow = 200 * time.Millisecond
	// probeRounds is how many rounds the measurement makes (auto.Costs.Verdict needs auto.MinRounds).
	probeRounds = 5
	// probeMessage is the size of a message.
	probeMessage = 64
)

// probePath is one of the measured paths.
type probePath int

const (
	probeKernel probePath = iota
	probeLoop
	probeDirect
)

func (p probePath) String() string {
	return [...]string{"sockmap", "copy", "direct"}[p]
}

// machineCounters are /proc/stat's busy CPU time (all but idle and iowait, in USER_HZ ticks, 10 ms) and
// context switches, machine-wide: the kernel engine's work items run in kworker threads, outside this
// process.
func machineCounters() (busyTicks, ctxt uint64, err error) {
	busyTicks, _, ctxt, err = procStat()
	return busyTicks, ctxt, err
}

// procStat is machineCounters with all CPU time (busy, idle and iowait) too.
func procStat() (busyTicks, allTicks, ctxt uint64, err error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, 0, fmt.Errorf("read machine counters: %w", err)
	}
	found := 0
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 8 && f[0] == "cpu":
			for i, v := range f[1:] {
				n, _ := strconv.ParseUint(v, 10, 64)
				if i < 8 { // guest time is counted in user time already
					allTicks += n
				}
				if i != 3 && i != 4 && i < 8 { // idle, iowait
					busyTicks += n
				}
			}
			found++
		case len(f) == 2 && f[0] == "ctxt":
			ctxt, _ = strconv.ParseUint(f[1], 10, 64)
			found++
		}
	}
	if found != 2 {
		return 0, 0, 0, errors.New("read machine counters: /proc/stat has no cpu or ctxt line")
	}
	return busyTicks, allTicks, ctxt, nil
}

// statReading is /proc/stat at one moment: busy and all CPU time (procStat) and context switches.
type statReading struct {
	busy, all, ctxt uint64
	at              time.Time
}

// readStat reads /proc/stat now.
func readStat() (statReading, error) {
	busy, all, ctxt, err := procStat()
	return statReading{busy: busy, all: all, ctxt: ctxt, at: time.Now()}, err
}

// hostLoad is what other processes did over a window while the relay's probe sent nothing.
type hostLoad struct {
	busy           float64 // the fraction of the machine's CPU time that was busy
	switchesPerSec float64 // the machine's context switches a second
}

// loadBetween is the host's load between two readings. A counter that went backwards counts nothing: the
// kernel's iowait (in all, not in busy) can, and a wrapped difference would read as 2⁶⁴ ticks.
func loadBetween(a, b statReading) (hostLoad, error) {
	if b.all <= a.all {
		return hostLoad{}, errors.New("no CPU time passed in /proc/stat")
	}
	secs := b.at.Sub(a.at).Seconds()
	if secs <= 0 {
		return hostLoad{}, errors.New("no time passed between two readings of /proc/stat")
	}
	busy := float64(b.busy-min(a.busy, b.busy)) / float64(b.all-a.all)
	switches := float64(b.ctxt - min(a.ctxt, b.ctxt))
	return hostLoad{busy: min(busy, 1), switchesPerSec: switches / secs}, nil
}

// watchHost is the host's load over window, while the relay's probe sends nothing.
func watchHost(ctx context.Context, window time.Duration) (hostLoad, error) {
	a, err := readStat()
	if err != nil {
		return hostLoad{}, err
	}
	select {
	case <-time.After(window):
	case <-ctx.Done():
		return hostLoad{}, ctx.Err()
	}
	b, err := readStat()
	if err != nil {
		return hostLoad{}, err
	}
	return loadBetween(a, b)
}

// lessBackground is a path's context switches over a round that took took, less the host's own at
// background a second over that time, and not below 0: the background is a rate measured over another
// window, and a path that switches hardly at all (the direct one, whose goroutines may never sleep) can
// count fewer than it.
func lessBackground(switches uint64, background float64, took time.Duration) float64 {
	return max(0, float64(switches)-background*took.Seconds())
}

// measureCosts watches the host, runs the rounds until they are done, ctx ends, or one fails, and watches
// the host again: a host that got busy meanwhile makes the costs inconclusive (auto.Costs.Verdict).
func (s *Server) measureCosts(ctx context.Context, m *autoMover) auto.Costs {
	c := s.measureRounds(ctx, m)
	if c.Err != nil && len(c.Kernel) < auto.MinRounds {
		return c // inconclusive already
	}
	after, err := watchHost(ctx, probeHostWindow)
	if err != nil {
		c.Err = errors.Join(c.Err, fmt.Errorf("how busy the host is after the rounds: %w", err))
		c.HostBusyAfter = 1 // not known: not conclusive
		return c
	}
	c.HostBusyAfter = after.busy
	return c
}

// measureRounds watches the host before the rounds, then runs them, within probeTimeout.
func (s *Server) measureRounds(ctx context.Context, m *autoMover) auto.Costs {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	var c auto.Costs
	var busy [3]uint64
	before, err := watchHost(ctx, probeHostWindow)
	if err != nil {
		c.Err = fmt.Errorf("how busy the host is: %w", err)
		return c
	}
	c.HostBusy, c.Background = before.busy, before.switchesPerSec
	for round := range probeRounds {
		var perMsg [3]float64
		var ticks [3]uint64
		for i := range 3 {
			path := probePath((i + round) % 3)
			switches, t, took, err := s.probe(ctx, m, path)
			if err != nil {
				c.Err = fmt.Errorf("round %d, %s: %w", round+1, path, err)
				return withBusy(c, busy, round)
			}
			perMsg[path] = lessBackground(switches, c.Background, took) / (2 * probeTrips)
			ticks[path] = t
		}
		for i := range busy {
			busy[i] += ticks[i]
		}
		c.Kernel = append(c.Kernel, perMsg[probeKernel])
		c.Loop = append(c.Loop, perMsg[probeLoop])
		c.Direct = append(c.Direct, perMsg[probeDirect])
	}
	return withBusy(c, busy, probeRounds)
}

// withBusy sets c's busy CPU per message from the ticks of rounds complete rounds (a tick is 10 ms).
func withBusy(c auto.Costs, ticks [3]uint64, rounds int) auto.Costs {
	if rounds == 0 {
		return c
	}
	msgs := float64(rounds * 2 * probeTrips)
	c.BusyKernel = float64(ticks[probeKernel]) * 10_000 / msgs
	c.BusyLoop = float64(ticks[probeLoop]) * 10_000 / msgs
	c.BusyDirect = float64(ticks[probeDirect]) * 10_000 / msgs
	return c
}

// probe makes one path's round trips, on probePairs connections at once, and returns the machine's context
// switches and busy ticks over them, and how long they took.
func (s *Server) probe(ctx context.Context, m *autoMover, path probePath) (switches, busyTicks uint64, took time.Duration, err error) {
	clients := make([]*net.TCPConn, 0, probePairs)
	echoed := make(chan error, probePairs)
	for range probePairs {
		client, upstream, stop, err := s.probeConns(ctx, m, path)
		if err != nil {
			return 0, 0, 0, err
		}
		defer stop()
		if dl, ok := ctx.Deadline(); ok {
			_ = client.SetDeadline(dl)
			_ = upstream.SetDeadline(dl)
		}
		clients = append(clients, client)
		go func() { echoed <- echo(upstream, probeWarmup+probeTrips/probePairs) }()
	}
	trips := func(n int) error {
		errs := make(chan error, len(clients))
		for _, c := range clients {
			go func() { errs <- roundTrips(c, n) }()
		}
		var first error
		for range clients {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		return first
	}
	if err := trips(probeWarmup); err != nil {
		return 0, 0, 0, err
	}
	r0, err := readStat()
	if err != nil {
		return 0, 0, 0, err
	}
	if err := trips(probeTrips / probePairs); err != nil {
		return 0, 0, 0, err
	}
	r1, err := readStat()
	if err != nil {
		return 0, 0, 0, err
	}
	for range clients {
		if err := <-echoed; err != nil {
			return 0, 0, 0, fmt.Errorf("echo: %w", err)
		}
	}
	return r1.ctxt - min(r0.ctxt, r1.ctxt), r1.busy - min(r0.busy, r1.busy), r1.at.Sub(r0.at), nil
}

// probeConns returns the two ends of a path: a direct connection's, or the client's and the upstream's
// of a pair the path's engine carries; stop closes them all.
func (s *Server) probeConns(ctx context.Context, m *autoMover, path probePath) (client, upstream *net.TCPConn, stop func(), err error) {
	if path == probeDirect {
		client, upstream, err = loopbackPair(ctx)
		if err != nil {
			return nil, nil, nil, err
		}
		return client, upstream, func() { client.Close(); upstream.Close() }, nil
	}
	client, relayClient, err := loopbackPair(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	relayUp, upstream, err := loopbackPair(ctx)
	if err != nil {
		client.Close()
		relayClient.Close()
		return nil, nil, nil, err
	}
	kind, engine := DatapathSockmap, datapath.Engine(s.kernel)
	if path == probeLoop {
		kind, engine = DatapathCopy, s.copier
	}
	if s.cfg.probeEngine != nil {
		if e := s.cfg.probeEngine(path); e != nil {
			engine = e
		}
	}
	p := datapath.NewPair(kind, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	m.probing(p, true) // a fallback of it counts no tunnel (kernelFallback, copyEngine.fellBack)
	stop = func() {
		p.End(datapath.ReasonShutdown, true)
		m.probing(p, false)
		client.Close()
		upstream.Close()
	}
	engine.Carry(p)
	// Checked before any trip: a pair the kernel refused runs on the loop, and one the loops could not take
	// on goroutines, whose figures would pass for the engine's.
	if why := m.probeRefused(p); why != "" || p.Kind() != kind || kind == DatapathCopy && !p.OnEventLoop() {
		err := fmt.Errorf("the %s engine did not carry a probe pair (%s), it ran on %s",
			kind, cmp.Or(why, "no reason given"), carrierOf(p))
		stop()
		return nil, nil, nil, err
	}
	return client, upstream, stop, nil
}

// carrierOf names what carries p: its kind, and goroutines for a copy pair off the event loops.
func carrierOf(p *datapath.Pair) string {
	if p.Kind() == DatapathCopy && !p.OnEventLoop() {
		return "goroutines"
	}
	return string(p.Kind())
}

// loopbackPair returns both ends of a fresh TCP connection on 127.0.0.1.
func loopbackPair(ctx context.Context) (dialed, accepted *net.TCPConn, err error) {
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, fmt.Errorf("loopback listener: %w", err)
	}
	defer l.Close()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", l.Addr().String())
	if err != nil {
		return nil, nil, fmt.Errorf("loopback dial: %w", err)
	}
	a, err := l.(*net.TCPListener).AcceptTCP()
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("loopback accept: %w", err)
	}
	return c.(*net.TCPConn), a, nil
}

// roundTrips writes a message on c and reads its echo, n times.
func roundTrips(c *net.TCPConn, n int) error {
	buf := make([]byte, probeMessage)
	for range n {
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("read the echo: %w", err)
		}
	}
	return nil
}

// echo reads n messages on c and writes each back.
func echo(c *net.TCPConn, n int) error {
	buf := make([]byte, probeMessage)
	for range n {
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	return nil
}
