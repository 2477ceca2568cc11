package relay

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"runtime"
	"testing"
	"time"
)

// TestHandshakeGarbage: a tunnel opened and closed leaves less than 22 KiB of garbage, client and upstream
// of this test included (a socket each, little else). The relay's upstream buffers are those net/http
// hands over with every hijacked connection and never takes back, and a log line that is off builds
// nothing: it was 26.3 KiB a tunnel here when each handshake made its own reader for the upstream's answer
// and buffers for the request and the 101, and is about 18.3 KiB since (Go 1.26). Bytes, not time.
func TestHandshakeGarbage(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's sync.Pool drops buffers at random")
	}
	const warmup, tunnels, bound = 200, 1000, 22 << 10
	upstreamAddr := serveEach(t, nil, answerSwitch)
	r := startRelay(t, DatapathCopy, []string{upstreamAddr}, func(cfg *Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	request := []byte(upgradeRequest("/tunnel"))
	buf := make([]byte, 1024)
	var before, after runtime.MemStats
	for i := range warmup + tunnels {
		if i == warmup {
			runtime.ReadMemStats(&before)
		}
		if err := handshakeOnce(r.Addr, request, buf); err != nil {
			t.Fatalf("tunnel %d: %v", i, err)
		}
	}
	runtime.ReadMemStats(&after)
	perTunnel := (after.TotalAlloc - before.TotalAlloc) / tunnels
	t.Logf("%d bytes allocated per tunnel", perTunnel)
	if perTunnel >= bound {
		t.Errorf("%d bytes allocated per tunnel opened and closed, want less than %d", perTunnel, bound)
	}
}

// BenchmarkHandshake opens and closes tunnels one after the other through a relay on the copy datapath:
// the client connects, sends its upgrade and reads the 101, then closes; the upstream answers every
// request with a 101 and closes once the client's side has. ns/op is one whole tunnel, from connect to
// the client's close; allocs/op and B/op are the relay's garbage per tunnel, plus the little the lean
// client and upstream here make (a socket each side). The relay logs at warn, as `make bench` runs it.
func BenchmarkHandshake(b *testing.B) {
	upstreamAddr := serveEach(b, nil, answerSwitch)
	r := startRelay(b, DatapathCopy, []string{upstreamAddr}, func(cfg *Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	request := []byte(upgradeRequest("/tunnel"))
	buf := make([]byte, 1024)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := handshakeOnce(r.Addr, request, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	// The last tunnels end after their clients closed: wait for them, so that a profile has all of them.
	deadline := time.Now().Add(5 * time.Second)
	for r.Tunnels().Len() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

// handshakeOnce opens one tunnel through the relay at addr and closes it once the 101 has come.
func handshakeOnce(addr string, request, buf []byte) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write(request); err != nil {
		return err
	}
	head, err := readHead(c, buf)
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(head, []byte("HTTP/1.1 101 ")) {
		return &net.OpError{Op: "handshake", Err: io.ErrUnexpectedEOF}
	}
	return nil
}

// benchSwitch is the 101 for testKey, the key of every upgradeRequest.
var benchSwitch = []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
	"Sec-WebSocket-Accept: " + AcceptKey(testKey) + "\r\n\r\n")

// answerSwitch is an upstream that reads one request head, answers it with benchSwitch and waits for the
// tunnel's end.
func answerSwitch(c net.Conn) {
	buf := make([]byte, 512)
	if _, err := readHead(c, buf); err != nil {
		return
	}
	if _, err := c.Write(benchSwitch); err != nil {
		return
	}
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

// readHead reads from c into buf until it holds a whole HTTP head (up to the blank line) and returns what it
// read; no byte follows a head in this benchmark, on either side.
func readHead(c net.Conn, buf []byte) ([]byte, error) {
	n := 0
	for !bytes.Contains(buf[:n], []byte("\r\n\r\n")) {
		if n == len(buf) {
			return nil, io.ErrShortBuffer
		}
		m, err := c.Read(buf[n:])
		if err != nil {
			return nil, err
		}
		n += m
	}
	return buf[:n], nil
}
