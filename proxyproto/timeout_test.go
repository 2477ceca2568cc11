package proxyproto

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// pipe returns the server end of a connection and a bufio.Reader on it; the
// test writes as the client on the other end.
func pipe(t *testing.T) (server net.Conn, br *bufio.Reader, client net.Conn) {
	t.Helper()
	server, client = net.Pipe()
	t.Cleanup(func() {
		server.Close()
		client.Close()
	})
	return server, bufio.NewReader(server), client
}

// write sends s from the client in the background (net.Pipe writes block
// until read) and returns where its error arrives.
func write(client net.Conn, s string) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := io.WriteString(client, s)
		done <- err
	}()
	return done
}

// deadlineConn records the read deadlines set on it.
type deadlineConn struct {
	net.Conn
	deadlines []time.Time
}

func (c *deadlineConn) SetReadDeadline(t time.Time) error {
	c.deadlines = append(c.deadlines, t)
	return c.Conn.SetReadDeadline(t)
}

func TestReadTimeout(t *testing.T) {
	server, br, client := pipe(t)
	conn := &deadlineConn{Conn: server}
	wrote := write(client, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"+trailer)
	before := time.Now()
	h, err := ReadTimeout(conn, br, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if h.Source != mustAddrPort("1.2.3.4:1") {
		t.Fatalf("source %v, want 1.2.3.4:1", h.Source)
	}
	// A deadline a minute away, then none: the relay's later reads are not
	// cut off by the header's deadline.
	if len(conn.deadlines) != 2 || conn.deadlines[0].Before(before.Add(time.Minute)) || !conn.deadlines[1].IsZero() {
		t.Fatalf("read deadlines set: %v, want now+1m then zero", conn.deadlines)
	}
	rest, err := io.ReadAll(io.LimitReader(br, int64(len(trailer))))
	if err != nil || string(rest) != trailer {
		t.Fatalf("after the header: %q, %v; want %q", rest, err, trailer)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}

	// After a timeout too.
	conn.deadlines = nil
	if _, err := ReadTimeout(conn, br, time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadTimeout with nothing sent: %v, want os.ErrDeadlineExceeded", err)
	}
	if len(conn.deadlines) != 2 || !conn.deadlines[1].IsZero() {
		t.Fatalf("read deadlines set: %v, want the last one zero", conn.deadlines)
	}
}

func TestReadTimeoutStalledHeader(t *testing.T) {
	// A client that sends part of a header and stops (slowloris) is cut off
	// by the deadline. The error is the connection's, not ErrInvalid.
	for _, partial := range []string{"", "PRO", "PROXY TCP4 1.2.3.4", v2hdr(0x21, 0x11, v2block4)[:20]} {
		server, br, client := pipe(t)
		write(client, partial)
		_, err := ReadTimeout(server, br, 50*time.Millisecond)
		if !errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, ErrInvalid) || errors.Is(err, ErrNoHeader) {
			t.Fatalf("ReadTimeout after %q: %v, want os.ErrDeadlineExceeded only", partial, err)
		}
		if !strings.HasPrefix(err.Error(), "proxyproto: ") {
			t.Fatalf("error %q does not say where it comes from", err)
		}
	}
}

func TestReadTimeoutNotPositive(t *testing.T) {
	server, br, _ := pipe(t)
	for _, d := range []time.Duration{0, -time.Second} {
		if _, err := ReadTimeout(server, br, d); err == nil || !strings.Contains(err.Error(), "must be positive") {
			t.Fatalf("ReadTimeout(%v): %v, want an error", d, err)
		}
	}
}
