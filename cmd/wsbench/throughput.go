package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// throughputWorkload streams binary messages, each one whole frame, over a few tunnels for a while. In sink
// mode the upstream discards them (the URL's path must be wsecho's /sink) and the rate is the payload the
// client got to send, one way; in echo mode they come back (wsecho's /bulk), and the rate is the payload
// that came back while the same flowed out.
type throughputWorkload struct {
	commonFlags
	size     int
	mode     string
	duration time.Duration
	// warmup is streamed before duration and not counted: a per-tunnel policy (--datapath auto) moves a
	// tunnel only after a sample of its traffic and a dwell, so a row that starts counting at once
	// measures where a new tunnel starts, not where its traffic takes it.
	warmup time.Duration
}

func parseThroughput(args []string, stderr io.Writer) (*throughputWorkload, string, error) {
	w := &throughputWorkload{}
	err := w.parse("throughput", args, stderr, 1, func(fs *flag.FlagSet) {
		fs.IntVar(&w.size, "size", 64<<10, "message size in `BYTES`")
		fs.StringVar(&w.mode, "mode", "sink", "sink (one way: the upstream discards, the URL ends in /sink) or echo (both ways, the URL ends in /bulk)")
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long to stream, counted")
		fs.DurationVar(&w.warmup, "warmup", 0, "how long to stream first, not counted")
	})
	if err != nil {
		return nil, "", err
	}
	switch {
	case w.size < 1 || w.size > 16<<20:
		return nil, "", fmt.Errorf("-size: %d; accepted 1 to %d", w.size, 16<<20)
	case w.mode != "sink" && w.mode != "echo":
		return nil, "", fmt.Errorf("-mode: %q; accepted sink or echo", w.mode)
	case w.mode == "sink" && !strings.HasSuffix(w.url, "/sink"):
		return nil, "", fmt.Errorf("-mode sink needs an upstream that discards: a -url ending in /sink (wsecho's), not %q", w.url)
	case w.mode == "echo" && !strings.HasSuffix(w.url, "/bulk"):
		return nil, "", fmt.Errorf("-mode echo needs an upstream that echoes whole frames with large buffers: a -url ending in /bulk (wsecho's), not %q", w.url)
	case w.duration <= 0:
		return nil, "", fmt.Errorf("-duration: %v; a positive duration, e.g. 5s", w.duration)
	case w.warmup < 0:
		return nil, "", fmt.Errorf("-warmup: %v; 0 or more", w.warmup)
	}
	return w, w.jsonPath, nil
}

// throughputResult is what throughput measured.
type throughputResult struct {
	Tunnels int     `json:"tunnels"`
	Size    int     `json:"size"`
	Mode    string  `json:"mode"`
	Seconds float64 `json:"seconds"` // counted, after the warm-up
	Bytes   int64   `json:"bytes"`   // payload sent (sink) or received back (echo) while counted
	// WarmupSeconds were streamed before, not counted.
	WarmupSeconds float64 `json:"warmup_seconds"`
	Gbps          float64 `json:"gbit_per_second"`
}

func (r *throughputResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-6s %-9s %-12s %-10s\n", "tunnels", "mode", "msg", "MiB", "Gbit/s")
	fmt.Fprintf(w, "%-8d %-6s %-9d %-12.0f %-10.2f\n", r.Tunnels, r.Mode, r.Size, float64(r.Bytes)/(1<<20), r.Gbps)
}

func (w *throughputWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	var moved atomic.Int64
	conns, err := dialAll(ctx, w.url, w.tunnels, progress)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	// The count starts when the warm-up ends: what was moved by then is taken off, and the time from then on
	// is the time counted.
	counted := newCountFrom(&moved, w.warmup)
	defer counted.stop()
	elapsed, err := runConns(ctx, conns, w.warmup+w.duration, progress,
		func() string { return fmt.Sprintf("%d MiB", moved.Load()>>20) },
		func(ctx context.Context, _ int, c *websocket.Conn) error { return w.stream(ctx, c.NetConn(), &moved) })
	if err != nil {
		return nil, err
	}
	n, seconds := counted.since(moved.Load(), elapsed)
	return &throughputResult{Tunnels: w.tunnels, Size: w.size, Mode: w.mode, Seconds: seconds, Bytes: n,
		Gbps: float64(n) * 8 / seconds / 1e9, WarmupSeconds: w.warmup.Seconds()}, nil
}

// countFrom is where a count starts after a warm-up: the count and the time when the warm-up ended.
type countFrom struct {
	warmup time.Duration
	timer  *time.Timer
	done   chan struct{}
	base   int64
	at     time.Duration // since the start
}

// newCountFrom reads count when warmup has passed; at 0 it counts from the start.
func newCountFrom(count *atomic.Int64, warmup time.Duration) *countFrom {
	c := &countFrom{warmup: warmup, done: make(chan struct{})}
	if warmup <= 0 {
		close(c.done)
		return c
	}
	start := time.Now()
	c.timer = time.AfterFunc(warmup, func() {
		c.base, c.at = count.Load(), time.Since(start)
		close(c.done)
	})
	return c
}

// since returns what was counted after the warm-up, given the count at the end and the time the run took
// in all, and for how many seconds. A run that ended before its warm-up did (it failed) counts it all.
func (c *countFrom) since(end int64, elapsed time.Duration) (int64, float64) {
	select {
	case <-c.done:
		return end - c.base, (elapsed - c.at).Seconds()
	default:
		return end, elapsed.Seconds()
	}
}

func (c *countFrom) stop() {
	if c.timer != nil {
		c.timer.Stop()
	}
}

// stream writes pre-built frames on conn, the tunnel's socket after the handshake, until ctx ends, counting
// in moved the payload sent (sink) or the payload that came back (echo, read beside the writes). Neither
// side parses a frame: the writes are batches built before the run, the reads land in a large buffer and
// are counted, so the load generator costs little per byte whatever the frame size.
func (w *throughputWorkload) stream(ctx context.Context, conn net.Conn, moved *atomic.Int64) error {
	// The end of the run closes the connection: that unblocks a write stuck on a full socket and the reader.
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	readErr := make(chan error, 1)
	if w.mode == "echo" {
		go func() { readErr <- countEchoes(ctx, conn, w.size, moved) }()
	} else {
		readErr <- nil
	}
	count := framesPerBatch(w.size)
	batch := frameBatch(w.size, count)
	var sendErr error
	for ctx.Err() == nil {
		if _, err := conn.Write(batch); err != nil {
			if ctx.Err() == nil {
				sendErr = fmt.Errorf("send: %w", err)
			}
			break
		}
		if w.mode == "sink" {
			moved.Add(int64(count * w.size))
		}
	}
	if ctx.Err() == nil {
		// The writer failed before the end: unblock the reader.
		_ = conn.Close()
	}
	return errors.Join(sendErr, <-readErr)
}

// countEchoes reads what comes back on conn into a large buffer until ctx ends and adds the payload it
// carries to moved. It checks only that the first byte is a final binary frame's, so that an upstream that
// answers something else (an HTTP error, a close) is not counted as an echo.
func countEchoes(ctx context.Context, conn net.Conn, size int, moved *atomic.Int64) error {
	buf := make([]byte, 1<<20)
	var wire, counted int64
	for first := true; ; first = false {
		n, err := conn.Read(buf)
		if first && n > 0 && buf[0] != finBit|opBinary {
			return fmt.Errorf("read: the echo starts with byte %#x, not a final binary frame's %#x", buf[0], finBit|opBinary)
		}
		wire += int64(n)
		share := payloadShare(wire, size)
		moved.Add(share - counted)
		counted = share
		if err != nil {
			if ctx.Err() != nil {
				return nil // the close that ended the run
			}
			return fmt.Errorf("read: %w", err)
		}
	}
}
