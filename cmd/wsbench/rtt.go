package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// rttWorkload measures round trips: every tunnel sends a binary message of size bytes and waits for its
// echo, as fast as it can or at rate messages per second.
type rttWorkload struct {
	commonFlags
	size     int
	rate     float64
	duration time.Duration
	// warmup is run before duration and not measured: just after 1000 tunnels open, the first round trips
	// wait on the load generator's and the upstream's start-up (goroutine stacks, the collector), which put
	// direct's p99 above a relay's in one run of two.
	warmup time.Duration
	// measureFrom is when round trips start to count: the end of warmup.
	measureFrom time.Time
	// drain, when positive, lets the round trip in flight when the run ends finish within drain, so that
	// the tunnel can run again (cpu reuses its tunnels round after round; gorilla gives up on a connection
	// whose read was cut by a deadline). At zero that read is cut at once.
	drain time.Duration
	// cpusAwake holds every CPU out of idle states it needs time to leave while the workload runs (see
	// holdCPUsAwake).
	cpusAwake bool
	// direct, when set, is the upstream's own URL: the same load sent there alternates with the target's,
	// rounds times each (see runRounds).
	direct string
	rounds int
}

func parseRTT(args []string, stderr io.Writer) (*rttWorkload, string, error) {
	w := &rttWorkload{}
	roundsSet := false
	err := w.parse("rtt", args, stderr, 100, func(fs *flag.FlagSet) {
		fs.IntVar(&w.size, "size", 32, "message size in `BYTES`")
		fs.Float64Var(&w.rate, "rate", 0, "messages per second per tunnel; 0 sends the next as soon as the echo is back")
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long to measure (with -direct: each round of each side)")
		fs.DurationVar(&w.warmup, "warmup", 0, "how long to run first, unmeasured (with -direct: each side once, before the first round)")
		fs.BoolVar(&w.cpusAwake, "cpus-awake", false, "keep every CPU out of deep idle states while measuring (writes 0 to "+cpuLatencyPath+"; root)")
		fs.StringVar(&w.direct, "direct", "", "the upstream's own `URL`: the same load sent there alternates with the target's, and each percentile is also given as the target's over direct's, round by round")
		fs.Func("rounds", "measurements of each side with -direct (default 3)", func(v string) error {
			n, err := strconv.Atoi(v)
			w.rounds, roundsSet = n, true
			return err
		})
	})
	if err != nil {
		return nil, "", err
	}
	if !roundsSet {
		w.rounds = 3
	}
	switch {
	case roundsSet && w.direct == "":
		return nil, "", fmt.Errorf("-rounds %d: rounds alternate with the direct baseline; give -direct URL too", w.rounds)
	case w.rounds < 1:
		return nil, "", fmt.Errorf("-rounds: %d; at least 1", w.rounds)
	case w.size < 1 || w.size > 16<<20:
		return nil, "", fmt.Errorf("-size: %d; accepted 1 to %d", w.size, 16<<20)
	case w.rate < 0:
		return nil, "", fmt.Errorf("-rate: %v; 0 (closed loop) or a positive rate", w.rate)
	case w.duration <= 0:
		return nil, "", fmt.Errorf("-duration: %v; a positive duration, e.g. 5s", w.duration)
	case w.warmup < 0:
		return nil, "", fmt.Errorf("-warmup: %v; 0 or more", w.warmup)
	}
	return w, w.jsonPath, nil
}

// rttResult is what rtt measured.
type rttResult struct {
	Tunnels   int         `json:"tunnels"`
	Size      int         `json:"size"`
	Rate      float64     `json:"rate_per_tunnel"`
	Seconds   float64     `json:"seconds"`
	PerSecond float64     `json:"round_trips_per_second"`
	RTT       Percentiles `json:"rtt"`
	// CPUsAwake says the CPUs were held out of deep idle states during the run.
	CPUsAwake bool `json:"cpus_awake"`
}

func (r *rttResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-6s %-10s %-10s %s\n", "tunnels", "bytes", "trips", "trips/s", percentileHeads)
	fmt.Fprintf(w, "%-8d %-6d %-10d %-10.0f %s\n", r.Tunnels, r.Size, r.RTT.Count, r.PerSecond, r.RTT.cells())
}

// us formats d in microseconds, the unit round trips through a relay are read in.
func us(d time.Duration) string { return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond)) }

func (w *rttWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	if w.cpusAwake {
		release, err := holdCPUsAwake(cpuLatencyPath)
		if err != nil {
			return nil, err
		}
		defer release()
	}
	if w.direct != "" {
		return w.runRounds(ctx, progress)
	}
	conns, err := dialAll(ctx, w.url, w.tunnels, progress)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	w.measureFrom = time.Now().Add(w.warmup)
	all, elapsed, err := w.roundTrips(ctx, conns, w.warmup+w.duration, progress)
	if err != nil {
		return nil, err
	}
	measured := elapsed - w.warmup
	return &rttResult{Tunnels: w.tunnels, Size: w.size, Rate: w.rate, Seconds: measured.Seconds(),
		PerSecond: float64(len(all)) / measured.Seconds(), RTT: summarize(all), CPUsAwake: w.cpusAwake}, nil
}

// roundTrips runs round trips on every one of conns for duration and returns those measured (sent from
// w.measureFrom on) and how long they ran.
func (w *rttWorkload) roundTrips(ctx context.Context, conns []*websocket.Conn, duration time.Duration,
	progress io.Writer) ([]time.Duration, time.Duration, error) {
	var (
		trips atomic.Int64
		mu    sync.Mutex
		all   []time.Duration
	)
	elapsed, err := runConns(ctx, conns, duration, progress,
		func() string { return fmt.Sprintf("%d round trips", trips.Load()) },
		func(ctx context.Context, i int, c *websocket.Conn) error {
			d, err := w.pingPong(ctx, c, i, &trips)
			mu.Lock()
			all = append(all, d...)
			mu.Unlock()
			return err
		})
	return all, elapsed, err
}

// runConns runs each on every one of conns at once, for duration, showing status as progress once a second.
// It returns how long they ran, or every tunnel's error.
func runConns(ctx context.Context, conns []*websocket.Conn, duration time.Duration, progress io.Writer,
	status func() string, each func(ctx context.Context, i int, c *websocket.Conn) error) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, duration)
	defer cancel()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	start := time.Now()
	stopProgress := reportProgress(ctx, progress, status)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := each(ctx, i, c); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("tunnel %d: %w", i, err))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	stopProgress()
	return time.Since(start), errors.Join(errs...)
}

// pingPong runs one tunnel's round trips until ctx ends and returns their durations. Every echo must be the
// message sent.
func (w *rttWorkload) pingPong(ctx context.Context, c *websocket.Conn, id int, trips *atomic.Int64) ([]time.Duration, error) {
	msg := make([]byte, w.size)
	var out []time.Duration
	var tick *time.Ticker
	if w.rate > 0 {
		// Start each tunnel at a random point of its period, so that many tunnels at a fixed rate send
		// evenly spread messages, not a burst of all of them every period.
		period := time.Duration(float64(time.Second) / w.rate)
		select {
		case <-ctx.Done():
			return nil, nil
		case <-time.After(rand.N(period)):
		}
		tick = time.NewTicker(period)
		defer tick.Stop()
	}
	cut := time.Unix(1, 0)
	if w.drain > 0 {
		if err := c.SetReadDeadline(time.Time{}); err != nil {
			return nil, fmt.Errorf("clear read deadline: %w", err)
		}
	}
	stop := context.AfterFunc(ctx, func() {
		if w.drain > 0 {
			cut = time.Now().Add(w.drain)
		}
		_ = c.SetReadDeadline(cut)
	})
	defer stop()
	for n := 0; ctx.Err() == nil; n++ {
		// The first message goes at the random point itself, not a period later: a short round (rtt -direct)
		// would otherwise spend its first period without load.
		if tick != nil && n > 0 {
			select {
			case <-ctx.Done():
				return out, nil
			case <-tick.C:
			}
		}
		msg[0], msg[len(msg)-1] = byte(id), byte(n)
		t0 := time.Now()
		if err := c.WriteMessage(websocket.BinaryMessage, msg); err != nil {
			return out, fmt.Errorf("send: %w", err)
		}
		_, got, err := c.ReadMessage()
		if err != nil {
			if ctx.Err() != nil && w.drain == 0 {
				return out, nil // the deadline set when the run ended
			}
			return out, fmt.Errorf("read echo %d: %w", n, err)
		}
		d := time.Since(t0)
		if !bytes.Equal(got, msg) {
			return out, fmt.Errorf("echo %d differs from the message sent", n)
		}
		if t0.Before(w.measureFrom) {
			continue // warming up
		}
		out = append(out, d)
		trips.Add(1)
	}
	return out, nil
}

// tunnelDialer opens the workloads' tunnels: small buffers, as the relays' clients have.
var tunnelDialer = websocket.Dialer{HandshakeTimeout: 10 * time.Second, ReadBufferSize: 1024, WriteBufferSize: 1024}

// dialTunnel opens one tunnel to url; a refusal's error says the HTTP status.
func dialTunnel(ctx context.Context, url string) (*websocket.Conn, error) {
	c, resp, err := tunnelDialer.DialContext(ctx, url, nil)
	if err != nil && resp != nil {
		err = fmt.Errorf("%w (HTTP %d)", err, resp.StatusCode)
	}
	return c, err
}

// dialAll opens n WebSocket connections to url, 64 at a time.
func dialAll(ctx context.Context, url string, n int, progress io.Writer) ([]*websocket.Conn, error) {
	conns := make([]*websocket.Conn, n)
	sem := make(chan struct{}, 64)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		first  error
		opened atomic.Int64
	)
	stopProgress := reportProgress(ctx, progress, func() string { return fmt.Sprintf("%d of %d tunnels open", opened.Load(), n) })
	defer stopProgress()
	for i := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			c, err := dialTunnel(ctx, url)
			if err != nil {
				mu.Lock()
				if first == nil {
					first = fmt.Errorf("open tunnel %d to %s: %w", i, url, err)
				}
				mu.Unlock()
				return
			}
			conns[i] = c
			opened.Add(1)
		}()
	}
	wg.Wait()
	if first != nil {
		closeAll(conns)
		return nil, first
	}
	return conns, nil
}

func closeAll(conns []*websocket.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// reportProgress prints what status says once a second until the returned function is called or ctx ends.
// The function returns once the printing has stopped, so that the next report never writes beside it.
func reportProgress(ctx context.Context, w io.Writer, status func() string) (stop func()) {
	done, exited := make(chan struct{}), make(chan struct{})
	var once sync.Once
	go func() {
		defer close(exited)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		start := time.Now()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				fmt.Fprintf(w, "wsbench: %4.0fs %s\n", time.Since(start).Seconds(), status())
			}
		}
	}()
	return func() {
		once.Do(func() { close(done) })
		<-exited
	}
}
