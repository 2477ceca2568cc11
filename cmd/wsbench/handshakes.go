package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// handshakesWorkload measures how fast new tunnels open: -tunnels workers each open a WebSocket (TCP
// connect, upgrade request, 101), record how long that took, close it and open the next, for duration.
type handshakesWorkload struct {
	commonFlags
	duration time.Duration
}

func parseHandshakes(args []string, stderr io.Writer) (*handshakesWorkload, string, error) {
	w := &handshakesWorkload{}
	err := w.parse("handshakes", args, stderr, 8, func(fs *flag.FlagSet) {
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long to measure")
	})
	if err != nil {
		return nil, "", err
	}
	if w.duration <= 0 {
		return nil, "", fmt.Errorf("-duration: %v; a positive duration, e.g. 5s", w.duration)
	}
	return w, w.jsonPath, nil
}

// handshakesResult is what handshakes measured. Failed handshakes are counted, not fatal: a relay that
// refuses some under load shows it here; the run fails only when none succeeded.
type handshakesResult struct {
	Concurrency int         `json:"concurrency"`
	Seconds     float64     `json:"seconds"`
	PerSecond   float64     `json:"handshakes_per_second"`
	Failed      int64       `json:"failed"`
	FirstError  string      `json:"first_error,omitempty"`
	Latency     Percentiles `json:"latency"`
}

func (r *handshakesResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-10s %-12s %-8s %s\n", "workers", "opened", "opened/s", "failed", percentileHeads)
	fmt.Fprintf(w, "%-8d %-10d %-12.0f %-8d %s\n", r.Concurrency, r.Latency.Count, r.PerSecond, r.Failed,
		r.Latency.cells())
	if r.FirstError != "" {
		fmt.Fprintf(w, "first failure: %s\n", r.FirstError)
	}
}

func (w *handshakesWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	ctx, cancel := context.WithTimeout(ctx, w.duration)
	defer cancel()
	deadline, _ := ctx.Deadline()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		all      []time.Duration
		failed   atomic.Int64
		opened   atomic.Int64
		firstErr error
	)
	stopProgress := reportProgress(ctx, progress, func() string { return fmt.Sprintf("%d tunnels opened", opened.Load()) })
	start := time.Now()
	for range w.tunnels {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for ctx.Err() == nil {
				t0 := time.Now()
				c, err := dialTunnel(ctx, w.url)
				if err != nil {
					// The run ended during this handshake: neither a success nor a failure. The dialer
					// times out at ctx's deadline by itself, a moment before ctx reports it.
					if ctx.Err() != nil || !time.Now().Before(deadline) {
						break
					}
					failed.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				mine = append(mine, time.Since(t0))
				opened.Add(1)
				c.Close()
			}
			mu.Lock()
			all = append(all, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	stopProgress()
	if len(all) == 0 {
		if firstErr == nil {
			firstErr = errors.New("the run ended before any handshake completed")
		}
		return nil, fmt.Errorf("no tunnel opened to %s: %w", w.url, firstErr)
	}
	res := &handshakesResult{Concurrency: w.tunnels, Seconds: elapsed.Seconds(),
		PerSecond: float64(len(all)) / elapsed.Seconds(), Failed: failed.Load(), Latency: summarize(all)}
	if firstErr != nil {
		res.FirstError = firstErr.Error()
	}
	return res, nil
}
