package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// mixedWorkload is what an edge node carries, all at once: many idle tunnels, a hundred chatty ones at a
// fixed rate, and a few bulk streams of whole 64 KiB frames into wsecho's /sink. It reports the machine's
// and the relay's CPU, the relay's RSS and the kernel's slab with all of it open, the chatty tunnels' round
// trips and the bulk rate: whether a datapath good at one kind of tunnel costs the others.
type mixedWorkload struct {
	commonFlags // tunnels: the idle ones
	chatty      int
	rate        float64
	bulk        int
	size        int
	duration    time.Duration
	warmup      time.Duration
	pids        []int
}

func parseMixed(args []string, stderr io.Writer) (*mixedWorkload, string, error) {
	w := &mixedWorkload{}
	err := w.parse("mixed", args, stderr, 1000, func(fs *flag.FlagSet) {
		fs.IntVar(&w.chatty, "chatty", 100, "tunnels sending 32-byte messages at -rate each and waiting for the echo")
		fs.Float64Var(&w.rate, "rate", 10, "messages per second per chatty tunnel")
		fs.IntVar(&w.bulk, "bulk", 2, "tunnels streaming whole frames of -size bytes into the upstream's /sink")
		fs.IntVar(&w.size, "size", 64<<10, "bulk frame size in `BYTES`")
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long to measure")
		fs.DurationVar(&w.warmup, "warmup", time.Second, "how long everything runs before it is measured")
		fs.Func("pid", "`PID[,PID...]` of the relay's processes, whose CPU time and RSS to count", func(v string) error {
			pids, err := parsePIDs(v)
			w.pids = pids
			return err
		})
	})
	if err != nil {
		return nil, "", err
	}
	switch {
	case !strings.HasSuffix(w.url, "/"):
		return nil, "", fmt.Errorf("-url %q: give the upstream's root, ending in /: the bulk streams go to its /sink", w.url)
	case w.chatty < 1 || w.bulk < 0:
		return nil, "", fmt.Errorf("-chatty %d, -bulk %d; at least 1 chatty tunnel and 0 or more bulk ones", w.chatty, w.bulk)
	case w.rate <= 0:
		return nil, "", fmt.Errorf("-rate: %v; a positive number of messages per second", w.rate)
	case w.size < 1 || w.size > 16<<20:
		return nil, "", fmt.Errorf("-size: %d; accepted 1 to %d", w.size, 16<<20)
	case w.duration < time.Second:
		return nil, "", fmt.Errorf("-duration: %v; at least 1s (/proc/stat counts in 10 ms ticks)", w.duration)
	case w.warmup < 0:
		return nil, "", fmt.Errorf("-warmup: %v; 0 or more", w.warmup)
	}
	return w, w.jsonPath, nil
}

// mixedResult is what mixed measured. CPU figures are over the measured time; RSS and slab are read with
// every tunnel open, at the end, and the growth is from before the first opened.
type mixedResult struct {
	Idle             int         `json:"idle_tunnels"`
	Chatty           int         `json:"chatty_tunnels"`
	Bulk             int         `json:"bulk_tunnels"`
	Seconds          float64     `json:"seconds"`
	MachineCPU       float64     `json:"machine_cpu_utilization"` // busy share of all CPUs, 0 to 1
	RelayCPUSeconds  *float64    `json:"relay_cpu_seconds_per_second,omitempty"`
	RelayRSS         int64       `json:"relay_rss_bytes,omitempty"`
	RelayRSSGrowth   int64       `json:"relay_rss_growth_bytes,omitempty"`
	SlabGrowth       int64       `json:"kernel_slab_growth_bytes"`
	ChattyRTT        Percentiles `json:"chatty_rtt"`
	ChattyPerSecond  float64     `json:"chatty_round_trips_per_second"`
	BulkGbps         float64     `json:"bulk_gbit_per_second"`
	ChattyRateWanted float64     `json:"chatty_rate"` // in all
}

func (r *mixedResult) table(w io.Writer) {
	relayCPU, rss := "-", "-"
	if r.RelayCPUSeconds != nil {
		relayCPU = fmt.Sprintf("%.1f", *r.RelayCPUSeconds*100)
		rss = fmt.Sprintf("%.1f MiB", float64(r.RelayRSS)/(1<<20))
	}
	fmt.Fprintf(w, "%-6s %-7s %-5s %-8s %-11s %-11s %-11s %-10s %-10s %-9s\n", "idle", "chatty", "bulk",
		"cpu %", "relay cpu %", "relay RSS", "slab +MiB", "chatty p50", "chatty p99", "bulk Gbit/s")
	fmt.Fprintf(w, "%-6d %-7d %-5d %-8.1f %-11s %-11s %-11.1f %-10s %-10s %-9.2f\n", r.Idle, r.Chatty, r.Bulk,
		r.MachineCPU*100, relayCPU, rss, float64(r.SlabGrowth)/(1<<20), us(r.ChattyRTT.P50), us(r.ChattyRTT.P99), r.BulkGbps)
}

// mixedReading is what mixed reads before and after: memory, CPU counters and the bulk bytes so far.
type mixedReading struct {
	rss, slab int64
	counters  counters
	bulk      int64
}

func (w *mixedWorkload) read(bulk *atomic.Int64) (mixedReading, error) {
	var m mixedReading
	var err error
	if w.pids != nil {
		if m.rss, err = sumRSS(w.pids); err != nil {
			return m, err
		}
	}
	if m.slab, err = slabBytes(); err != nil {
		return m, err
	}
	if m.counters, err = readCounters(w.pids, nil); err != nil {
		return m, err
	}
	m.bulk = bulk.Load()
	return m, nil
}

func (w *mixedWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	var bulkBytes atomic.Int64
	before, err := w.read(&bulkBytes)
	if err != nil {
		return nil, err
	}
	idle, err := dialAll(ctx, w.url, w.tunnels, progress)
	if err != nil {
		return nil, fmt.Errorf("idle tunnels: %w", err)
	}
	defer closeAll(idle)
	chatty, err := dialAll(ctx, w.url, w.chatty, progress)
	if err != nil {
		return nil, fmt.Errorf("chatty tunnels: %w", err)
	}
	defer closeAll(chatty)
	var bulk []*websocket.Conn
	if w.bulk > 0 {
		if bulk, err = dialAll(ctx, w.url+"sink", w.bulk, progress); err != nil {
			return nil, fmt.Errorf("bulk tunnels: %w", err)
		}
		defer closeAll(bulk)
	}

	runCtx, cancel := context.WithTimeout(ctx, w.warmup+w.duration)
	defer cancel()
	pinger := &rttWorkload{size: 32, rate: w.rate, measureFrom: time.Now().Add(w.warmup)}
	streamer := &throughputWorkload{size: w.size, mode: "sink"}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		trips atomic.Int64
		rtts  []time.Duration
		errs  []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	for i, c := range chatty {
		wg.Go(func() {
			d, err := pinger.pingPong(runCtx, c, i, &trips)
			mu.Lock()
			rtts = append(rtts, d...)
			mu.Unlock()
			if err != nil {
				fail(fmt.Errorf("chatty tunnel %d: %w", i, err))
			}
		})
	}
	for i, c := range bulk {
		wg.Go(func() {
			if err := streamer.stream(runCtx, c.NetConn(), &bulkBytes); err != nil {
				fail(fmt.Errorf("bulk tunnel %d: %w", i, err))
			}
		})
	}
	stopProgress := reportProgress(runCtx, progress, func() string {
		return fmt.Sprintf("%d chatty round trips, %d MiB of bulk", trips.Load(), bulkBytes.Load()>>20)
	})
	defer stopProgress()

	select {
	case <-runCtx.Done():
	case <-time.After(w.warmup):
	}
	start, startErr := w.read(&bulkBytes)
	<-runCtx.Done()
	end, endErr := w.read(&bulkBytes)
	wg.Wait()
	if err := errors.Join(append(errs, startErr, endErr)...); err != nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return w.result(before, start, end, rtts)
}

// result computes mixedResult from the readings before any tunnel opened, at the end of the warm-up and at
// the end of the run, and the chatty tunnels' round trips.
func (w *mixedWorkload) result(before, start, end mixedReading, rtts []time.Duration) (*mixedResult, error) {
	cost, err := costOf(start.counters.cpu, end.counters.cpu, max(int64(len(rtts)), 1), 0)
	if err != nil {
		return nil, err
	}
	secs := end.counters.cpu.At.Sub(start.counters.cpu.At).Seconds()
	res := &mixedResult{Idle: w.tunnels, Chatty: w.chatty, Bulk: w.bulk, Seconds: secs,
		MachineCPU: cost.Utilization, SlabGrowth: end.slab - before.slab, ChattyRTT: summarize(rtts),
		ChattyPerSecond: float64(len(rtts)) / secs, ChattyRateWanted: w.rate * float64(w.chatty),
		BulkGbps: float64(end.bulk-start.bulk) * 8 / secs / 1e9}
	if w.pids != nil {
		cpu := float64(end.counters.proc.Ticks-start.counters.proc.Ticks) / clockTicksPerSecond / secs
		res.RelayCPUSeconds = &cpu
		res.RelayRSS, res.RelayRSSGrowth = end.rss, end.rss-before.rss
	}
	return res, nil
}
