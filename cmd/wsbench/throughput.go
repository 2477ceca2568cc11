package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// throughputWorkload streams large binary messages over a few tunnels for a while. In sink mode the
// upstream discards them (the URL's path must be wsecho's /sink) and the rate is what the client got to
// send, one way; in echo mode they come back, and the rate is what came back while the same flowed out.
type throughputWorkload struct {
	commonFlags
	size     int
	mode     string
	duration time.Duration
}

func parseThroughput(args []string, stderr io.Writer) (*throughputWorkload, string, error) {
	w := &throughputWorkload{}
	err := w.parse("throughput", args, stderr, 1, func(fs *flag.FlagSet) {
		fs.IntVar(&w.size, "size", 64<<10, "message size in `BYTES`")
		fs.StringVar(&w.mode, "mode", "sink", "sink (one way: the upstream discards, the URL ends in /sink) or echo (both ways)")
		fs.DurationVar(&w.duration, "duration", 5*time.Second, "how long to stream")
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
	case w.duration <= 0:
		return nil, "", fmt.Errorf("-duration: %v; a positive duration, e.g. 5s", w.duration)
	}
	return w, w.jsonPath, nil
}

// throughputResult is what throughput measured.
type throughputResult struct {
	Tunnels int     `json:"tunnels"`
	Size    int     `json:"size"`
	Mode    string  `json:"mode"`
	Seconds float64 `json:"seconds"`
	Bytes   int64   `json:"bytes"` // sent (sink) or received back (echo)
	Gbps    float64 `json:"gbit_per_second"`
}

func (r *throughputResult) table(w io.Writer) {
	fmt.Fprintf(w, "%-8s %-6s %-9s %-12s %-10s\n", "tunnels", "mode", "msg", "MiB", "Gbit/s")
	fmt.Fprintf(w, "%-8d %-6s %-9d %-12.0f %-10.2f\n", r.Tunnels, r.Mode, r.Size, float64(r.Bytes)/(1<<20), r.Gbps)
}

func (w *throughputWorkload) run(ctx context.Context, progress io.Writer) (result, error) {
	var moved atomic.Int64
	elapsed, err := runTunnels(ctx, w.url, w.tunnels, w.duration, progress,
		func() string { return fmt.Sprintf("%d MiB", moved.Load()>>20) },
		func(ctx context.Context, _ int, c *websocket.Conn) error { return w.stream(ctx, c, &moved) })
	if err != nil {
		return nil, err
	}
	n := moved.Load()
	return &throughputResult{Tunnels: w.tunnels, Size: w.size, Mode: w.mode, Seconds: elapsed.Seconds(), Bytes: n,
		Gbps: float64(n) * 8 / elapsed.Seconds() / 1e9}, nil
}

// stream sends messages on c until ctx ends, counting in moved what was sent (sink) or what came back
// (echo, read beside the writes).
func (w *throughputWorkload) stream(ctx context.Context, c *websocket.Conn, moved *atomic.Int64) error {
	// The end of the run closes the connection: that unblocks a write stuck on a full socket and the reader.
	// gorilla's SetWriteDeadline cannot be used here: it sets a field the writer reads without a lock, and
	// every frame resets the socket's deadline from it.
	stop := context.AfterFunc(ctx, func() { _ = c.NetConn().Close() })
	defer stop()
	readErr := make(chan error, 1)
	if w.mode == "echo" {
		go func() {
			for ctx.Err() == nil {
				_, r, err := c.NextReader()
				if err == nil {
					var n int64
					n, err = io.Copy(io.Discard, r)
					moved.Add(n)
				}
				if err != nil {
					if ctx.Err() != nil {
						err = nil // the deadline that ended the run
					} else {
						err = fmt.Errorf("read: %w", err)
					}
					readErr <- err
					return
				}
			}
			readErr <- nil
		}()
	} else {
		readErr <- nil
	}
	var sendErr error
	msg := make([]byte, w.size)
	for ctx.Err() == nil {
		if err := c.WriteMessage(websocket.BinaryMessage, msg); err != nil {
			if ctx.Err() == nil {
				sendErr = fmt.Errorf("send: %w", err)
			}
			break
		}
		if w.mode == "sink" {
			moved.Add(int64(w.size))
		}
	}
	if ctx.Err() == nil {
		// The writer failed before the end: unblock the reader.
		_ = c.SetReadDeadline(time.Unix(1, 0))
	}
	return errors.Join(sendErr, <-readErr)
}
