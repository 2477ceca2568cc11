package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// idleWorkload opens tunnels that send nothing and measures what holding them costs: the relay process's
// RSS (when its pid is given) and the kernel's TCP memory, before and after, divided by the tunnel count.
type idleWorkload struct {
	commonFlags
	pids   []int // the relay's processes (nginx has several workers); their RSS is summed
	settle time.Duration
}

func parseIdle(args []string, stderr io.Writer) (*idleWorkload, string, error) {
	w := &idleWorkload{}
	var pids string
	err := w.parse("idle", args, stderr, 1000, func(fs *flag.FlagSet) {
		fs.StringVar(&pids, "pid", "", "`PID[,PID...]` of the relay's processes whose RSS to sum (none: kernel memory only)")
		fs.DurationVar(&w.settle, "settle", 2*time.Second, "wait this long after the last tunnel opened before measuring")
	})
	if err != nil {
		return nil, "", err
	}
	for _, f := range strings.FieldsFunc(pids, func(r rune) bool { return r == ',' || r == ' ' }) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid <= 0 {
			return nil, "", fmt.Errorf("-pid: %q is not a process id; give one or more, comma-separated", f)
		}
		if _, err := procRSS(pid); err != nil {
			return nil, "", fmt.Errorf("-pid: %w", err)
		}
		w.pids = append(w.pids, pid)
	}
	if w.settle < 0 {
		return nil, "", fmt.Errorf("-settle: %v; 0 or more", w.settle)
	}
	return w, w.jsonPath, nil
}

// idleResult is what idle measured. RSS fields are zero without -pid.
type idleResult struct {
	Tunnels           int   `json:"tunnels"`
	RelayRSSBefore    int64 `json:"relay_rss_before_bytes"`
	RelayRSSAfter     int64 `json:"relay_rss_after_bytes"`
	RelayRSSPerTunnel int64 `json:"relay_rss_per_tunnel_bytes"`
	TCPMemBefore      int64 `json:"kernel_tcp_mem_before_bytes"`
	TCPMemAfter       int64 `json:"kernel_tcp_mem_after_bytes"`
	TCPMemPerTunnel   int64 `json:"kernel_tcp_mem_per_tunnel_bytes"`
}

func (r *idleResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-14s %-14s %-16s\n", "tunnels", "relay RSS", "RSS/tunnel", "kernel TCP/tunnel")
	rss, per := "-", "-"
	if r.RelayRSSAfter > 0 {
		rss, per = fmt.Sprintf("%.1f MiB", float64(r.RelayRSSAfter)/(1<<20)), fmt.Sprintf("%d B", r.RelayRSSPerTunnel)
	}
	fmt.Fprintf(w, "%-8d %-14s %-14s %-16s\n", r.Tunnels, rss, per, fmt.Sprintf("%d B", r.TCPMemPerTunnel))
}

func (w *idleWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	res := &idleResult{Tunnels: w.tunnels}
	var err error
	if res.TCPMemBefore, err = tcpMemBytes(); err != nil {
		return nil, err
	}
	if len(w.pids) > 0 {
		if res.RelayRSSBefore, err = sumRSS(w.pids); err != nil {
			return nil, err
		}
	}
	conns, err := dialAll(ctx, w.url, w.tunnels, progress)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(w.settle):
	}
	if res.TCPMemAfter, err = tcpMemBytes(); err != nil {
		return nil, err
	}
	res.TCPMemPerTunnel = (res.TCPMemAfter - res.TCPMemBefore) / int64(w.tunnels)
	if len(w.pids) > 0 {
		if res.RelayRSSAfter, err = sumRSS(w.pids); err != nil {
			return nil, err
		}
		res.RelayRSSPerTunnel = (res.RelayRSSAfter - res.RelayRSSBefore) / int64(w.tunnels)
	}
	return res, nil
}

func sumRSS(pids []int) (int64, error) {
	var sum int64
	for _, pid := range pids {
		rss, err := procRSS(pid)
		if err != nil {
			return 0, err
		}
		sum += rss
	}
	return sum, nil
}
