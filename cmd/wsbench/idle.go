package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// idleWorkload opens tunnels that send nothing and measures what holding them costs: the relay process's
// RSS (when its pids are given) and the kernel's TCP memory, per tunnel (see idleResult).
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
	if w.pids, err = parsePIDs(pids); err != nil {
		return nil, "", fmt.Errorf("-pid: %w", err)
	}
	if w.settle < 0 {
		return nil, "", fmt.Errorf("-settle: %v; 0 or more", w.settle)
	}
	return w, w.jsonPath, nil
}

// parsePIDs parses a -pid flag: process ids, comma-separated, of processes that exist.
func parsePIDs(v string) ([]int, error) {
	var pids []int
	for _, f := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid <= 0 {
			return nil, fmt.Errorf("%q is not a process id; give one or more, comma-separated", f)
		}
		if _, err := procRSS(pid); err != nil {
			return nil, err
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// idleResult is what idle measured. The per-tunnel figures are the growth over the second half of the
// tunnels: a relay first reuses memory it freed before (its start-up self-test, earlier connections), so
// growth from the very start understates what each tunnel costs (seen: 379 against 2318 bytes for the
// same relay in two runs at 3000 tunnels). RSS fields are zero without -pid.
type idleResult struct {
	Tunnels           int   `json:"tunnels"`
	RelayRSSBefore    int64 `json:"relay_rss_before_bytes"`
	RelayRSSHalf      int64 `json:"relay_rss_half_bytes"` // with the first half of the tunnels open
	RelayRSSAfter     int64 `json:"relay_rss_after_bytes"`
	RelayRSSPerTunnel int64 `json:"relay_rss_per_tunnel_bytes"`
	TCPMemHalf        int64 `json:"kernel_tcp_mem_half_bytes"`
	TCPMemAfter       int64 `json:"kernel_tcp_mem_after_bytes"`
	TCPMemPerTunnel   int64 `json:"kernel_tcp_mem_per_tunnel_bytes"`
	// Slab is the kernel's slab memory (/proc/meminfo): socket structures, sk_buffs, BPF map entries.
	// It is the whole machine's, so the load generator's and the upstream's sockets are in it too; the
	// direct run is the baseline to compare with.
	SlabHalf      int64 `json:"kernel_slab_half_bytes"`
	SlabAfter     int64 `json:"kernel_slab_after_bytes"`
	SlabPerTunnel int64 `json:"kernel_slab_per_tunnel_bytes"`
}

func (r *idleResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-14s %-14s %-18s %-16s\n", "tunnels", "relay RSS", "RSS/tunnel", "kernel TCP/tunnel", "kernel slab/tunnel")
	rss, per := "-", "-"
	if r.RelayRSSAfter > 0 {
		rss, per = fmt.Sprintf("%.1f MiB", float64(r.RelayRSSAfter)/(1<<20)), fmt.Sprintf("%d B", r.RelayRSSPerTunnel)
	}
	fmt.Fprintf(w, "%-8d %-14s %-14s %-18s %-16s\n", r.Tunnels, rss, per, fmt.Sprintf("%d B", r.TCPMemPerTunnel),
		fmt.Sprintf("%d B", r.SlabPerTunnel))
}

// sample reads the relay's RSS (when pids are given) and the kernel's TCP and slab memory.
func (w *idleWorkload) sample() (rss, tcp, slab int64, err error) {
	if len(w.pids) > 0 {
		if rss, err = sumRSS(w.pids); err != nil {
			return 0, 0, 0, err
		}
	}
	if tcp, err = tcpMemBytes(); err != nil {
		return 0, 0, 0, err
	}
	slab, err = slabBytes()
	return rss, tcp, slab, err
}

func (w *idleWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	res := &idleResult{Tunnels: w.tunnels}
	var err error
	if res.RelayRSSBefore, _, _, err = w.sample(); err != nil {
		return nil, err
	}
	half := w.tunnels / 2
	var all []*websocket.Conn
	defer func() { closeAll(all) }()
	for i, n := range []int{half, w.tunnels - half} {
		conns, err := dialAll(ctx, w.url, n, progress)
		if err != nil {
			return nil, err
		}
		all = append(all, conns...)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(w.settle):
		}
		rss, tcp, slab, err := w.sample()
		if err != nil {
			return nil, err
		}
		if i == 0 {
			res.RelayRSSHalf, res.TCPMemHalf, res.SlabHalf = rss, tcp, slab
		} else {
			res.RelayRSSAfter, res.TCPMemAfter, res.SlabAfter = rss, tcp, slab
		}
	}
	second := int64(w.tunnels - half)
	res.TCPMemPerTunnel = (res.TCPMemAfter - res.TCPMemHalf) / second
	res.SlabPerTunnel = (res.SlabAfter - res.SlabHalf) / second
	if len(w.pids) > 0 {
		res.RelayRSSPerTunnel = (res.RelayRSSAfter - res.RelayRSSHalf) / second
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
