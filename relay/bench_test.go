package relay

import (
	"io"
	"net"
	"testing"

	"github.com/sockrelay/sockrelay/internal/streamtest"
)

// benchPath opens one connection pair for a benchmark: through a relay on dp, or, for "direct", a plain
// loopback connection with no relay, as the baseline. Client, relay and upstream share this process, so
// the figures compare datapaths side by side on one machine; they are not what a relay in its own process
// costs (`make bench` measures that: docs/bench/RESULTS.md).
func benchPath(b *testing.B, dp string) (client, upstream net.Conn, clientR, upstreamR io.Reader) {
	b.Helper()
	up := startUpstream(b)
	if dp == "direct" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		u, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close(); u.Close() })
		return c, u, c, u
	}
	r := startRelay(b, Datapath(dp), []string{up.Addr})
	c, u := openTunnel(b, r.Addr, up, nil, nil)
	return c, u, c.R, u.R
}

// benchPaths are "direct" and every datapath this host runs (TestMain adds sockmap where it can).
func benchPaths() []string {
	out := []string{"direct"}
	for _, d := range testDatapaths {
		out = append(out, string(d))
	}
	return out
}

// BenchmarkThroughput streams 64 KiB writes one way; MB/s is the datapath's bulk rate.
func BenchmarkThroughput(b *testing.B) {
	for _, dp := range benchPaths() {
		b.Run(dp, func(b *testing.B) {
			c, _, _, ur := benchPath(b, dp)
			streamtest.Through(b, c.(streamtest.HalfCloser), ur)
		})
	}
}

// BenchmarkRoundTrip is 32-byte ping-pong over one tunnel: ns/op is one round trip.
func BenchmarkRoundTrip(b *testing.B) {
	for _, dp := range benchPaths() {
		b.Run(dp, func(b *testing.B) {
			c, u, cr, ur := benchPath(b, dp)
			go func() {
				buf := make([]byte, 32)
				for {
					if _, err := io.ReadFull(ur, buf); err != nil {
						return
					}
					if _, err := u.Write(buf); err != nil {
						return
					}
				}
			}()
			msg := make([]byte, 32)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(cr, msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
