package datapath_test

import (
	"fmt"
	"io"
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// BenchmarkSplice compares, in one run, the splice engine on goroutines (datapath.Splicer: a goroutine and a
// pipe per direction for the tunnel's life) with splice on the event loop (EventLoop.Splice: pipes lent while
// bytes are in flight), and the loop's copy engine beside them:
//   - bulk: one stream of 64 KiB writes one way (MB/s);
//   - pingpong: 64-byte round trips to an echo peer over 1 and 50 tunnels.
//
// The peers run in this process, so cpu-ns/op is the whole process's CPU time per op (getrusage), peers
// included; the "direct" rows (the peers connected without a relay) give the peers' share, and a datapath's
// own cost per op is its row less direct's. No figure here is asserted.
func BenchmarkSplice(b *testing.B) {
	loop, err := datapath.StartEventLoop(eventloop.Options{Loops: 1}) // as the relay on 2 CPUs, defaults otherwise
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { loop.Close() })
	engines := []struct {
		name string
		e    datapath.Engine // nil: direct
	}{
		{"direct", nil},
		{"splice-goroutines", &datapath.Splicer{}},
		{"splice-loop", loop.Splice()},
		{"copy-loop", loop},
	}
	for _, e := range engines {
		b.Run("bulk/engine="+e.name, func(b *testing.B) {
			client, upstream := benchTunnel(b, e.e)
			go func() { _, _ = io.Copy(io.Discard, upstream) }()
			chunk := make([]byte, 64<<10)
			b.SetBytes(int64(len(chunk)))
			before := cpuNow(b)
			b.ResetTimer()
			for range b.N {
				if _, err := client.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuNow(b)-before)/float64(b.N), "cpu-ns/op")
		})
	}
	for _, tunnels := range []int{1, 50} {
		for _, e := range engines {
			b.Run(fmt.Sprintf("pingpong/tunnels=%d/engine=%s", tunnels, e.name), func(b *testing.B) {
				clients := make([]*net.TCPConn, tunnels)
				for i := range clients {
					var upstream *net.TCPConn
					clients[i], upstream = benchTunnel(b, e.e)
					go echo(upstream)
				}
				before := cpuNow(b)
				b.ResetTimer()
				done := make(chan error, tunnels)
				for i, c := range clients {
					rounds := b.N / tunnels
					if i < b.N%tunnels {
						rounds++
					}
					go func() { done <- pingPong(c, rounds) }()
				}
				for range clients {
					if err := <-done; err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				b.ReportMetric(float64(cpuNow(b)-before)/float64(b.N), "cpu-ns/op")
			})
		}
	}
}

// benchTunnel returns a client and an upstream joined by engine e through a pair, or directly when e is nil.
func benchTunnel(b *testing.B, e datapath.Engine) (client, upstream *net.TCPConn) {
	b.Helper()
	if e == nil {
		return loopbackPair(b)
	}
	client, relayClient := loopbackPair(b)
	relayUp, upstream := loopbackPair(b)
	p := datapath.NewPair(e.Kind(), datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	b.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	e.Carry(p)
	return client, upstream
}

// echo writes back what it reads until EOF or an error.
func echo(c *net.TCPConn) {
	buf := make([]byte, 4<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// pingPong runs rounds round trips of a 64-byte message on c.
func pingPong(c *net.TCPConn, rounds int) error {
	msg, got := make([]byte, 64), make([]byte, 64)
	for range rounds {
		if _, err := c.Write(msg); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, got); err != nil {
			return err
		}
	}
	return nil
}

// cpuNow is this process's CPU time (user and system, all threads) in nanoseconds.
func cpuNow(b *testing.B) int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}
