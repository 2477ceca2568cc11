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
}

func parseThroughput(args []string, stderr io.Writer) (*throughputWorkload, string, error) {
	w := &throughputWorkload{}
	err := w.parse("throughput", args, stderr, 1, func(fs *flag.FlagSet) {
		fs.IntVar(&w.size, "size", 64<<10, "message size in `BYTES`")
		fs.StringVar(&w.mode, "mode", "sink", "sink (one way: the upstream discards, the URL ends in /sink) or echo (both ways, the URL ends in /bulk)")
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
	case w.mode == "echo" && !strings.HasSuffix(w.url, "/bulk"):
		return nil, "", fmt.Errorf("-mode echo needs an upstream that echoes whole frames with large buffers: a -url ending in /bulk (wsecho's), not %q", w.url)
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
	Bytes   int64   `json:"bytes"` // payload sent (sink) or received back (echo)
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
		func(ctx context.Context, _ int, c *websocket.Conn) error { return w.stream(ctx, c.NetConn(), &moved) })
	if err != nil {
		return nil, err
	}
	n := moved.Load()
	return &throughputResult{Tunnels: w.tunnels, Size: w.size, Mode: w.mode, Seconds: elapsed.Seconds(), Bytes: n,
		Gbps: float64(n) * 8 / elapsed.Seconds() / 1e9}, nil
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
