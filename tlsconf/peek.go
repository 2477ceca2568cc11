package tlsconf

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// ErrNotTLS is returned by PeekClientHello when the stream does not begin
// with a TLS handshake record: a plain HTTP request on a TLS port, an SSLv2
// hello, or any other protocol.
var ErrNotTLS = errors.New("not a TLS connection: the first bytes are not a TLS handshake record")

const (
	recordHeaderLen   = 5
	recordTypeHandshk = 0x16
	// maxHelloBytes bounds what PeekClientHello reads. crypto/tls already
	// caps the ClientHello message at 64 KiB and each record at 16 KiB plus
	// 2 KiB; this also caps a hello cut into many tiny records, whose
	// headers would otherwise add up.
	maxHelloBytes = 128 << 10
)

// errHelloSeen aborts the handshake once the ClientHello has been parsed.
var errHelloSeen = errors.New("tlsconf: ClientHello seen")

// PeekClientHello reads the TLS ClientHello from conn, for TLS passthrough:
// it returns the SNI host name (lower-case; empty if the client sent none)
// and replay, exactly the bytes it read, which the caller must send to the
// upstream before anything else read from conn.
//
// It reads only the records holding the ClientHello: each read stops at a
// record boundary, so no byte after the hello is consumed. A hello split
// across several records is handled (up to crypto/tls's 64 KiB message
// limit); so is one record of the full 16 KiB.
//
// The ClientHello is parsed by crypto/tls itself, over a connection that
// records reads and refuses writes: its GetConfigForClient callback sees the
// parsed hello and aborts the handshake, so nothing is ever sent to the
// client, and the parser is Go's, maintained and fuzzed upstream. An
// encrypted ClientHello (ECH) yields the outer, public name.
//
// timeout bounds the whole peek (a client that sends nothing, or sends
// slowly, is cut off); conn's read deadline is cleared on return. With
// timeout <= 0 the caller's deadline, if any, applies and is left alone.
//
// On error replay still holds the bytes read, so the caller may answer them
// (say, an HTTP 400 for ErrNotTLS). Errors: ErrNotTLS (wrapped, with the
// first bytes); a timeout (errors.Is os.ErrDeadlineExceeded); io.EOF or
// io.ErrUnexpectedEOF for a stream cut short; otherwise the crypto/tls
// error for a malformed hello.
func PeekClientHello(conn net.Conn, timeout time.Duration) (serverName string, replay []byte, err error) {
	if timeout > 0 {
		if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return "", nil, fmt.Errorf("peek client hello: set read deadline: %w", err)
		}
		defer conn.SetReadDeadline(time.Time{})
	}
	r := &recordReader{conn: conn}
	var name string
	seen := false
	srv := tls.Server(&peekConn{Conn: conn, r: r}, &tls.Config{
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			name, seen = hello.ServerName, true
			return nil, errHelloSeen
		},
	})
	err = srv.Handshake()
	if seen {
		return strings.ToLower(name), r.read, nil
	}
	if b := r.read; len(b) > 0 && (b[0] != recordTypeHandshk || len(b) > 1 && b[1] != 3) {
		return "", b, fmt.Errorf("%w (starts with %q)", ErrNotTLS, b[:min(len(b), recordHeaderLen)])
	}
	return "", r.read, fmt.Errorf("peek client hello: %w", err)
}

// recordReader reads from conn no further than the end of the current TLS
// record and keeps a copy of everything read. crypto/tls on its own reads
// ahead as far as its buffer allows, which would swallow bytes sent after
// the hello.
type recordReader struct {
	conn   net.Conn
	read   []byte
	header [recordHeaderLen]byte
	inHdr  int // bytes of the current header read so far
	body   int // bytes of the current record body still to read; 0: a header is next
}

var errHelloTooLarge = fmt.Errorf("ClientHello larger than %d bytes", maxHelloBytes)

func (r *recordReader) Read(p []byte) (int, error) {
	if len(r.read) >= maxHelloBytes {
		return 0, errHelloTooLarge
	}
	want := recordHeaderLen - r.inHdr
	if r.body > 0 {
		want = r.body
	}
	want = min(want, maxHelloBytes-len(r.read))
	if len(p) > want {
		p = p[:want]
	}
	n, err := r.conn.Read(p)
	r.read = append(r.read, p[:n]...)
	if r.body > 0 {
		r.body -= n
	} else {
		r.inHdr += copy(r.header[r.inHdr:], p[:n])
		if r.inHdr == recordHeaderLen {
			// crypto/tls refuses lengths over 16 KiB + 2 KiB before
			// reading the body, so a huge length is never read.
			r.body = int(binary.BigEndian.Uint16(r.header[3:]))
			r.inHdr = 0
		}
	}
	return n, err
}

// peekConn gives crypto/tls the recording reader and nothing else: writes
// (the alert sent when the handshake is aborted) fail without reaching the
// client, and Close leaves the connection open for the caller.
type peekConn struct {
	net.Conn
	r *recordReader
}

var errPeekWrite = errors.New("tlsconf: PeekClientHello never writes to the client")

func (c *peekConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *peekConn) Write(p []byte) (int, error) { return 0, errPeekWrite }
func (c *peekConn) Close() error                { return nil }
