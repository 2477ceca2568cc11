package tlsconf

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// firstFlightConn records what the client writes before its first read
// (its ClientHello flight, one write per record) and can re-cut it into
// smaller records, to model clients and middleboxes that fragment the hello.
type firstFlightConn struct {
	net.Conn
	splitAt int // >0: re-frame the flight into records of at most this many body bytes
	flight  []byte
	read    atomic.Bool
}

func (c *firstFlightConn) Write(p []byte) (int, error) {
	if c.read.Load() {
		return c.Conn.Write(p)
	}
	out := p
	if c.splitAt > 0 {
		out = reframe(p, c.splitAt)
	}
	c.flight = append(c.flight, out...)
	if _, err := c.Conn.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *firstFlightConn) Read(p []byte) (int, error) {
	c.read.Store(true)
	return c.Conn.Read(p)
}

// reframe cuts the handshake records in b into records of at most n body
// bytes each (RFC 8446 §5.1 lets handshake messages span records).
func reframe(b []byte, n int) []byte {
	var out []byte
	for len(b) >= recordHeaderLen {
		hdr, body := b[:recordHeaderLen], b[recordHeaderLen:]
		length := min(int(binary.BigEndian.Uint16(hdr[3:])), len(body))
		for chunk := body[:length]; len(chunk) > 0; {
			k := min(n, len(chunk))
			out = append(out, hdr[0], hdr[1], hdr[2], byte(k>>8), byte(k))
			out = append(out, chunk[:k]...)
			chunk = chunk[k:]
		}
		b = body[length:]
	}
	return append(out, b...)
}

// countRecords counts the TLS records in b, which must be whole records.
func countRecords(t *testing.T, b []byte) int {
	t.Helper()
	n := 0
	for len(b) > 0 {
		if len(b) < recordHeaderLen {
			t.Fatalf("replay ends in a partial record header")
		}
		length := int(binary.BigEndian.Uint16(b[3:5]))
		if len(b) < recordHeaderLen+length {
			t.Fatalf("replay ends in a partial record")
		}
		b = b[recordHeaderLen+length:]
		n++
	}
	return n
}

// replayConn reads replay, then the rest of the connection: what a
// passthrough relay sends to its upstream.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// manyProtos pads a ClientHello with n ALPN protocol names of 250 bytes.
func manyProtos(n int) []string {
	protos := []string{"http/1.1"}
	for i := range n {
		protos = append(protos, strings.Repeat(string(rune('a'+i%26)), 250))
	}
	return protos
}

// TestPeekClientHello: real Go clients' hellos give the SNI name and replay
// bytes that, forwarded ahead of the rest of the stream, let a real TLS
// server complete the handshake: the replay is exactly what was read.
func TestPeekClientHello(t *testing.T) {
	ca := tlstest.NewCA(t, "test CA")
	leaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	cert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	serverCfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
	// Padding that brings this Go version's hello just under one full
	// 16 KiB record (key shares, and so the base size, vary by release).
	const protoSize = 1 + 250
	fullRecord := (16384 - (len(captureHello(t, "a.example.com")) - recordHeaderLen)) / protoSize

	tests := []struct {
		name        string
		serverName  string
		maxVersion  uint16
		protos      []string
		splitAt     int
		wantSNI     string
		wantRecords int
	}{
		{name: "TLS 1.3", serverName: "a.example.com", wantSNI: "a.example.com", wantRecords: 1},
		{name: "TLS 1.2 only", serverName: "a.example.com", maxVersion: tls.VersionTLS12, wantSNI: "a.example.com", wantRecords: 1},
		{name: "mixed case name", serverName: "A.Example.COM", wantSNI: "a.example.com", wantRecords: 1},
		{name: "IP address, no SNI", serverName: "127.0.0.1", wantSNI: "", wantRecords: 1},
		{name: "16 KiB in one record", serverName: "a.example.com", protos: manyProtos(fullRecord), wantSNI: "a.example.com", wantRecords: 1},
		{name: "split by the client over two records", serverName: "a.example.com", protos: manyProtos(fullRecord + 20), wantSNI: "a.example.com", wantRecords: 2},
		{name: "cut into 64-byte records", serverName: "a.example.com", splitAt: 64, wantSNI: "a.example.com"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })

			type clientResult struct {
				hello []byte
				reply string
				err   error
			}
			done := make(chan clientResult, 1)
			go func() {
				raw, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					done <- clientResult{err: err}
					return
				}
				defer raw.Close()
				raw.SetDeadline(time.Now().Add(10 * time.Second))
				fw := &firstFlightConn{Conn: raw, splitAt: tt.splitAt}
				protos := tt.protos
				if protos == nil {
					protos = []string{"http/1.1"}
				}
				tc := tls.Client(fw, &tls.Config{ServerName: tt.serverName, RootCAs: ca.Pool(), MaxVersion: tt.maxVersion, NextProtos: protos})
				if _, err := tc.Write([]byte("ping")); err != nil {
					done <- clientResult{hello: fw.flight, err: err}
					return
				}
				reply := make([]byte, 4)
				_, err = io.ReadFull(tc, reply)
				done <- clientResult{hello: fw.flight, reply: string(reply), err: err}
			}()

			conn, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			name, replay, err := PeekClientHello(conn, 5*time.Second)
			if err != nil {
				t.Fatalf("PeekClientHello: %v", err)
			}
			if name != tt.wantSNI {
				t.Errorf("server name %q, want %q", name, tt.wantSNI)
			}
			records := countRecords(t, replay)
			if tt.wantRecords > 0 && records != tt.wantRecords {
				t.Errorf("hello came in %d records, want %d (the test's padding no longer fits its case)", records, tt.wantRecords)
			}
			if tt.splitAt > 0 && records < 2 {
				t.Errorf("hello came in %d records, want several", records)
			}

			// The upstream's side of passthrough: replay, then the stream.
			up := tls.Server(&replayConn{Conn: conn, r: io.MultiReader(bytes.NewReader(replay), conn)}, serverCfg)
			if err := up.Handshake(); err != nil {
				t.Fatalf("upstream handshake after replay: %v", err)
			}
			buf := make([]byte, 4)
			if _, err := io.ReadFull(up, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("upstream read %q, %v", buf, err)
			}
			if _, err := up.Write([]byte("pong")); err != nil {
				t.Fatal(err)
			}
			res := <-done
			if res.err != nil || res.reply != "pong" {
				t.Fatalf("client: reply %q, %v", res.reply, res.err)
			}
			if !bytes.Equal(replay, res.hello) {
				t.Errorf("replay (%d bytes) differs from the client's hello flight (%d bytes)", len(replay), len(res.hello))
			}
		})
	}
}

// bytesConn is a net.Conn that reads from a fixed input.
type bytesConn struct {
	*bytes.Reader
}

func (bytesConn) Write(p []byte) (int, error)        { return len(p), nil }
func (bytesConn) Close() error                       { return nil }
func (bytesConn) LocalAddr() net.Addr                { return &net.TCPAddr{} }
func (bytesConn) RemoteAddr() net.Addr               { return &net.TCPAddr{} }
func (bytesConn) SetDeadline(t time.Time) error      { return nil }
func (bytesConn) SetReadDeadline(t time.Time) error  { return nil }
func (bytesConn) SetWriteDeadline(t time.Time) error { return nil }

// captureHello returns the first flight of a Go TLS client.
func captureHello(t testing.TB, serverName string) []byte {
	t.Helper()
	cli, srv := net.Pipe()
	defer srv.Close()
	go func() {
		defer cli.Close()
		tls.Client(cli, &tls.Config{ServerName: serverName, NextProtos: []string{"http/1.1"}}).Handshake()
	}()
	hdr := make([]byte, recordHeaderLen)
	if _, err := io.ReadFull(srv, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(srv, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

// TestPeekClientHelloInputs: streams that are not, or not entirely, a
// ClientHello give the right error and the bytes read, and nothing past the
// hello is consumed.
func TestPeekClientHelloInputs(t *testing.T) {
	hello := captureHello(t, "a.example.com")
	bodyLen := len(hello) - recordHeaderLen
	notHello := append([]byte{0x16, 0x03, 0x03, 0x00, 0x04}, 0x02, 0x00, 0x00, 0x00) // an empty ServerHello
	garbageBody := append([]byte{0x16, 0x03, 0x01, 0x00, 0x10}, bytes.Repeat([]byte{0x01}, 16)...)
	badLength := append([]byte{}, hello...)
	badLength[recordHeaderLen+3]++ // the handshake message claims one byte more than the record holds
	isEOF := func(err error) bool { return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) }
	isNotTLS := func(err error) bool { return errors.Is(err, ErrNotTLS) }
	isTLSError := func(err error) bool { return err != nil && !isNotTLS(err) && !isEOF(err) }

	tests := []struct {
		name       string
		input      []byte
		wantName   string
		wantReplay []byte // nil: the whole input
		check      func(error) bool
	}{
		{name: "hello followed by more bytes", input: append(append([]byte{}, hello...), "EXTRA"...),
			wantName: "a.example.com", wantReplay: hello, check: func(err error) bool { return err == nil }},
		{name: "plain HTTP", input: []byte("GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"),
			wantReplay: []byte("GET /"), check: isNotTLS},
		{name: "one byte of HTTP", input: []byte("G"), check: isNotTLS},
		{name: "SSLv2 hello", input: []byte{0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15}, wantReplay: []byte{0x80, 0x2e, 0x01, 0x00, 0x02}, check: isNotTLS},
		// crypto/tls reads these records whole before refusing them.
		{name: "alert record", input: []byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28}, check: isNotTLS},
		{name: "record version 4.x", input: []byte{0x16, 0x04, 0x00, 0x00, 0x01, 0x01}, check: isNotTLS},
		{name: "empty stream", input: nil, check: isEOF},
		{name: "truncated in the header", input: hello[:3], check: isEOF},
		{name: "header only", input: hello[:recordHeaderLen], check: isEOF},
		{name: "truncated in the body", input: hello[:recordHeaderLen+bodyLen/2], check: isEOF},
		{name: "last byte missing", input: hello[:len(hello)-1], check: isEOF},
		{name: "oversized record is not read", input: append([]byte{0x16, 0x03, 0x01, 0xff, 0xff}, make([]byte, 100)...),
			wantReplay: []byte{0x16, 0x03, 0x01, 0xff, 0xff}, check: isTLSError},
		{name: "empty handshake record", input: []byte{0x16, 0x03, 0x01, 0x00, 0x00}, check: isTLSError},
		{name: "handshake message is not a ClientHello", input: notHello, check: isTLSError},
		{name: "garbage body", input: garbageBody, check: isTLSError},
		{name: "message longer than its record", input: badLength, check: isEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bytes.NewReader(tt.input)
			name, replay, err := PeekClientHello(bytesConn{r}, time.Second)
			if !tt.check(err) {
				t.Fatalf("error = %v", err)
			}
			if name != tt.wantName {
				t.Errorf("server name %q, want %q", name, tt.wantName)
			}
			want := tt.wantReplay
			if want == nil {
				want = tt.input
			}
			if !bytes.Equal(replay, want) {
				t.Errorf("replay = %q, want %q", replay, want)
			}
			if rest, _ := io.ReadAll(r); !bytes.Equal(append(append([]byte{}, replay...), rest...), tt.input) {
				t.Error("replay followed by the unread input is not the input")
			}
		})
	}
}

// TestPeekClientHelloNotTLSMessage pins the message a user sees.
func TestPeekClientHelloNotTLSMessage(t *testing.T) {
	_, _, err := PeekClientHello(bytesConn{bytes.NewReader([]byte("GET / HTTP/1.1\r\n"))}, 0)
	want := `not a TLS connection: the first bytes are not a TLS handshake record (starts with "GET /")`
	if err == nil || err.Error() != want {
		t.Errorf("error:\n got %v\nwant %s", err, want)
	}
}

// TestPeekClientHelloTimeout: a client that sends nothing, or stops half
// way, is cut off by the timeout, and the read deadline is cleared after.
func TestPeekClientHelloTimeout(t *testing.T) {
	hello := captureHello(t, "a.example.com")
	for _, tt := range []struct {
		name string
		sent []byte
	}{
		{"nothing sent", nil},
		{"half a hello", hello[:len(hello)/2]},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cli, srv := net.Pipe()
			t.Cleanup(func() { cli.Close(); srv.Close() })
			go cli.Write(tt.sent)
			_, replay, err := PeekClientHello(srv, 50*time.Millisecond)
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("error = %v, want a deadline error", err)
			}
			if !bytes.Equal(replay, tt.sent) {
				t.Errorf("replay = %d bytes, want the %d sent", len(replay), len(tt.sent))
			}
			// Were the deadline still set (in the past), this read would fail.
			go cli.Write([]byte("late"))
			buf := make([]byte, 4)
			if _, err := io.ReadFull(srv, buf); err != nil || string(buf) != "late" {
				t.Errorf("read after PeekClientHello: %q, %v; the read deadline was not cleared", buf, err)
			}
		})
	}
}

// FuzzPeekClientHello: no input panics, reads are bounded, and the replay
// is always exactly the prefix of the input that was consumed.
func FuzzPeekClientHello(f *testing.F) {
	hello := captureHello(f, "a.example.com")
	f.Add(hello)
	f.Add(reframe(hello, 7))
	f.Add(hello[:len(hello)/2])
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{0x16, 0x03, 0x01, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		name, replay, err := PeekClientHello(bytesConn{r}, 0)
		if !bytes.HasPrefix(data, replay) {
			t.Fatalf("replay is not a prefix of the input")
		}
		if len(replay) > maxHelloBytes {
			t.Fatalf("read %d bytes, over the %d limit", len(replay), maxHelloBytes)
		}
		if err == nil {
			if len(replay) < recordHeaderLen || replay[0] != recordTypeHandshk {
				t.Fatalf("success on a stream not starting with a handshake record: %q", replay)
			}
			if name != strings.ToLower(name) {
				t.Fatalf("server name %q is not lower-case", name)
			}
		} else if name != "" {
			t.Fatalf("a name (%q) with an error (%v)", name, err)
		}
	})
}
