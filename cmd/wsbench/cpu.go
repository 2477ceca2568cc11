package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// cpuWorkload measures what relaying costs in CPU at a fixed message rate: the whole machine's busy time
// (/proc/stat) per message while tunnels echo small messages at rate messages per second in all. The whole
// machine, not the relay's process, because a sockmap relay's work happens in softirq, charged to no
// process. With -direct, the same load is first sent straight to the upstream and its cost per message (load
// generator, upstream, loopback TCP) is subtracted, leaving what the relay adds.
type cpuWorkload struct {
	commonFlags
	direct   string
	size     int
	rate     float64
	duration time.Duration
}

func parseCPU(args []string, stderr io.Writer) (*cpuWorkload, string, error) {
	w := &cpuWorkload{}
	err := w.parse("cpu", args, stderr, 100, func(fs *flag.FlagSet) {
		fs.StringVar(&w.direct, "direct", "", "the upstream's own `URL`: the same load sent there first is the baseline subtracted")
		fs.IntVar(&w.size, "size", 32, "message size in `BYTES`")
		fs.Float64Var(&w.rate, "rate", 10000, "messages per second, all tunnels together")
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long to measure each target")
	})
	if err != nil {
		return nil, "", err
	}
	switch {
	case w.size < 1 || w.size > 16<<20:
		return nil, "", fmt.Errorf("-size: %d; accepted 1 to %d", w.size, 16<<20)
	case w.rate <= 0:
		return nil, "", fmt.Errorf("-rate: %v; a positive number of messages per second", w.rate)
	case w.duration < time.Second:
		// /proc/stat counts in 10 ms ticks: a shorter run would measure mostly rounding.
		return nil, "", fmt.Errorf("-duration: %v; at least 1s", w.duration)
	}
	return w, w.jsonPath, nil
}

// cpuResult is what cpu measured. A message is one round trip: the message and its echo both cross the
// relay. Relay is Target minus Direct per message, present only with -direct.
type cpuResult struct {
	Tunnels       int      `json:"tunnels"`
	Size          int      `json:"size"`
	Rate          float64  `json:"rate"`
	Target        cpuCost  `json:"target"`
	Direct        *cpuCost `json:"direct,omitempty"`
	RelayUSPerMsg *float64 `json:"relay_cpu_us_per_message,omitempty"`
	Achieved      float64  `json:"achieved_rate"`
}

func (r *cpuResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-10s %-10s %-10s %-8s %-12s %-12s\n",
		"tunnels", "rate", "achieved", "messages", "cpu %", "µs/msg", "relay µs/msg")
	relay := "–"
	if r.RelayUSPerMsg != nil {
		relay = fmt.Sprintf("%.1f", *r.RelayUSPerMsg)
	}
	fmt.Fprintf(w, "%-8d %-10.0f %-10.0f %-10d %-8.1f %-12.1f %-12s\n", r.Tunnels, r.Rate, r.Achieved,
		r.Target.Messages, r.Target.Utilization*100, r.Target.USPerMessage, relay)
	if r.Direct != nil {
		fmt.Fprintf(w, "direct: %.1f µs/msg at %.0f messages/s (cpu %.1f%%)\n", r.Direct.USPerMessage,
			float64(r.Direct.Messages)/r.Direct.Seconds, r.Direct.Utilization*100)
	}
}

func (w *cpuWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	res := &cpuResult{Tunnels: w.tunnels, Size: w.size, Rate: w.rate}
	if w.direct != "" {
		direct, err := w.measure(ctx, w.direct, progress)
		if err != nil {
			return nil, fmt.Errorf("direct baseline: %w", err)
		}
		res.Direct = &direct
	}
	target, err := w.measure(ctx, w.url, progress)
	if err != nil {
		return nil, err
	}
	res.Target = target
	res.Achieved = float64(target.Messages) / target.Seconds
	if res.Direct != nil {
		d := target.USPerMessage - res.Direct.USPerMessage
		res.RelayUSPerMsg = &d
	}
	return res, nil
}

// measure sends the load to url for duration and accounts the machine's CPU to it. Dialing is not measured.
func (w *cpuWorkload) measure(ctx context.Context, url string, progress io.Writer) (cpuCost, error) {
	conns, err := dialAll(ctx, url, w.tunnels, progress)
	if err != nil {
		return cpuCost{}, err
	}
	defer closeAll(conns)
	pinger := &rttWorkload{size: w.size, rate: w.rate / float64(w.tunnels)}
	var trips atomic.Int64
	before, err := readCPUTimes()
	if err != nil {
		return cpuCost{}, err
	}
	elapsed, err := runConns(ctx, conns, w.duration, progress,
		func() string { return fmt.Sprintf("%s: %d messages", url, trips.Load()) },
		func(ctx context.Context, i int, c *websocket.Conn) error {
			_, err := pinger.pingPong(ctx, c, i, &trips)
			return err
		})
	if err != nil {
		return cpuCost{}, err
	}
	after, err := readCPUTimes()
	if err != nil {
		return cpuCost{}, err
	}
	return costOf(before, after, trips.Load(), elapsed)
}
