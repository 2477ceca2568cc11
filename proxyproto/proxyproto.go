// Package proxyproto reads and writes the PROXY protocol header, versions 1
// (text) and 2 (binary), as specified by HAProxy in
// https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt.
//
// A load balancer in front of the relay (HAProxy, an AWS NLB, another
// sockrelay) opens one TCP connection per client and writes this header
// first, so that the relay learns the client's address instead of the
// balancer's.
//
// # When to trust the header
//
// Read only on listeners configured for it, and only when every peer that can
// reach that listener is a trusted proxy. On any other listener a client
// could write a header of its own and spoof its address (logs, rate limits
// and access lists would all believe it). For the same reason the spec
// forbids guessing: a listener configured for the PROXY protocol requires the
// header on every connection, and one that starts with anything else
// ([ErrNoHeader]) must be answered with an error or closed, never served as
// if it came straight from the client. Filter who may connect (firewall,
// allow list) as well.
//
// # LOCAL and UNKNOWN
//
// A balancer's own health checks arrive as v2 LOCAL; a v1 line "PROXY
// UNKNOWN" (or a v2 PROXY header of the UNSPEC family) says the sender could
// not describe the connection. In all these cases the header carries no
// addresses: Source and Destination are zero, [Header.SourceAddr] is nil,
// and the caller uses the real connection's addresses.
//
// # Reading
//
// [Read] consumes exactly the header from a [bufio.Reader]; whatever the
// client sent after it stays buffered there, so the caller must keep reading
// from that same bufio.Reader, not from the bare connection.
package proxyproto

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"
)

// Command says whether a connection is relayed for a client (Proxy) or was
// opened by the balancer itself (Local, e.g. a health check). The values are
// those of the low nibble of the 13th byte of a v2 header.
type Command byte

const (
	// Local: the balancer opened the connection on its own behalf; the header
	// carries no addresses and the real connection endpoints apply.
	Local Command = 0x0
	// Proxy: the connection is relayed for the client the header describes.
	Proxy Command = 0x1
)

func (c Command) String() string {
	switch c {
	case Local:
		return "LOCAL"
	case Proxy:
		return "PROXY"
	}
	return fmt.Sprintf("Command(%#x)", byte(c))
}

// Transport is the proxied protocol and address family: TCP4 and TCP6, or
// Unknown when the header carries no usable addresses (v1 "UNKNOWN", v2
// AF_UNSPEC, v2 LOCAL, and v2 AF_UNIX streams, which the spec lets a receiver
// treat as UNSPEC).
type Transport byte

const (
	// Unknown: no addresses; use the real connection's.
	Unknown Transport = iota
	// TCP4 is TCP over IPv4 (v1 "TCP4", v2 0x11).
	TCP4
	// TCP6 is TCP over IPv6 (v1 "TCP6", v2 0x21).
	TCP6
)

func (t Transport) String() string {
	switch t {
	case Unknown:
		return "UNKNOWN"
	case TCP4:
		return "TCP4"
	case TCP6:
		return "TCP6"
	}
	return fmt.Sprintf("Transport(%d)", byte(t))
}

// TLV is one v2 type-length-value extension, e.g. [TLVAuthority] with the
// client's TLS server name. Value is kept as sent; nested values (the
// sub-TLVs of [TLVSSL]) are not decoded.
type TLV struct {
	Type  byte
	Value []byte
}

// Header is one PROXY protocol header.
type Header struct {
	// Version is 1 (text) or 2 (binary).
	Version int
	// Command is Proxy, or Local for the balancer's own connections (v2
	// only; Read never returns Local for v1).
	Command Command
	// Protocol is TCP4, TCP6 or Unknown. With Unknown, and with Command
	// Local, Source and Destination are zero.
	Protocol Transport
	// Source is the client's address; Destination the address the client
	// connected to (on the balancer). A TCP6 header may carry IPv4-mapped
	// IPv6 addresses (::ffff:a.b.c.d); Read keeps them as sent.
	Source, Destination netip.AddrPort
	// TLVs are the v2 extensions in the order sent; nil for v1 and for
	// headers without addresses (Local, Unknown), whose block Read discards.
	TLVs []TLV
}

var (
	// ErrNoHeader means the stream does not start with a PROXY protocol
	// signature (neither "PROXY " nor the v2 12-byte signature). Read has
	// consumed nothing: the caller can still read the client's first bytes
	// from the bufio.Reader (to answer them with an error, say), and must not
	// serve the connection as if the header were optional.
	ErrNoHeader = errors.New("proxyproto: no PROXY protocol header")
	// ErrInvalid is wrapped by every error about a malformed header: a
	// signature followed by something the spec does not allow, or a header
	// cut short by the end of the stream. The connection must be closed.
	ErrInvalid = errors.New("proxyproto: invalid PROXY protocol header")
)

// invalidError is a malformed header. Its text says what was wrong
// ("proxyproto: v1: source port "70000" out of range") and it matches
// ErrInvalid with errors.Is, so that the message need not repeat it.
type invalidError struct {
	version int // 0 while the version is not known yet
	msg     string
	cause   error // may be nil
}

func (e *invalidError) Error() string {
	s := versionPrefix(e.version) + e.msg
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

func (e *invalidError) Is(target error) bool { return target == ErrInvalid }
func (e *invalidError) Unwrap() error        { return e.cause }

func versionPrefix(version int) string {
	if version == 0 {
		return "proxyproto: "
	}
	return fmt.Sprintf("proxyproto: v%d: ", version)
}

func invalidf(version int, format string, args ...any) error {
	return &invalidError{version: version, msg: fmt.Sprintf(format, args...)}
}

// readError reports a failed read in the middle of a header. The end of the
// stream there means a truncated header, which is invalid (the spec says to
// reject partial headers); other errors (a deadline, a reset) are the
// connection's, not the header's, and are wrapped as they are.
func readError(version int, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &invalidError{version: version, msg: "header truncated", cause: io.ErrUnexpectedEOF}
	}
	return fmt.Errorf("%sread header: %w", versionPrefix(version), err)
}

const (
	v1Signature = "PROXY "
	v2Signature = "\r\n\r\n\x00\r\nQUIT\n"
)

// Read reads one PROXY protocol header, v1 or v2, from br and nothing more:
// the bytes after the header stay in br.
//
// Errors:
//   - ErrNoHeader (wrapped, with the first bytes seen) when the stream starts
//     with anything else; nothing has been consumed.
//   - ErrInvalid (wrapped, saying what was wrong) for a malformed,
//     unsupported (UDP) or truncated header.
//   - io.EOF (wrapped) when the stream ends before its first byte, e.g. a
//     balancer's plain TCP health check.
//   - the reader's own error otherwise, e.g. os.ErrDeadlineExceeded.
//
// Read blocks until a whole header has arrived (the header may come in any
// number of TCP segments); bound it with a read deadline, see [ReadTimeout].
// It works with any bufio.Reader size.
func Read(br *bufio.Reader) (*Header, error) {
	first, err := br.Peek(1)
	if err != nil {
		return nil, fmt.Errorf("proxyproto: read header: %w", err)
	}
	var sig string
	switch first[0] {
	case v1Signature[0]:
		sig = v1Signature
	case v2Signature[0]:
		sig = v2Signature
	default:
		return nil, noHeader(br)
	}
	// Peek one more byte at a time so that a stream which is not a header
	// ("GET / HTTP/1.1") is told apart as soon as it differs, without waiting
	// for bytes the client may never send.
	for n := 2; n <= len(sig); n++ {
		p, err := br.Peek(n)
		if !strings.HasPrefix(sig, string(p)) {
			return nil, noHeader(br)
		}
		if err != nil {
			return nil, readError(0, err)
		}
	}
	if sig == v1Signature {
		return readV1(br)
	}
	return readV2(br)
}

// noHeader returns ErrNoHeader with up to 16 of the bytes already buffered,
// for the log; it reads nothing more.
func noHeader(br *bufio.Reader) error {
	p, _ := br.Peek(min(br.Buffered(), 16))
	return fmt.Errorf("%w: stream starts with %q", ErrNoHeader, p)
}

// ReadTimeout calls [Read] with a read deadline of d from now on conn, which
// must be the connection br reads from, and clears the deadline afterwards
// (any deadline set before is lost). A header that has not fully arrived by
// then fails with an error wrapping os.ErrDeadlineExceeded. The spec suggests
// at least 3 seconds, to cover a TCP retransmission. d must be positive.
func ReadTimeout(conn net.Conn, br *bufio.Reader, d time.Duration) (*Header, error) {
	if d <= 0 {
		return nil, fmt.Errorf("proxyproto: read timeout %v must be positive", d)
	}
	if err := conn.SetReadDeadline(time.Now().Add(d)); err != nil {
		return nil, fmt.Errorf("proxyproto: set read deadline: %w", err)
	}
	h, err := Read(br)
	if cerr := conn.SetReadDeadline(time.Time{}); cerr != nil && err == nil {
		return nil, fmt.Errorf("proxyproto: clear read deadline: %w", cerr)
	}
	return h, err
}

// Format encodes h in its Version's format: the same bytes that [AppendV1] or
// [AppendV2] write, except that Protocol (not the addresses) picks TCP4 or
// TCP6. A Local or Unknown header is written without addresses ("PROXY
// UNKNOWN\r\n" in v1, which has no LOCAL). It fails for a Version other than
// 1 or 2, addresses that do not fit Protocol, and TLVs that cannot be sent:
// any in v1, any without an address family (a receiver ignores that block),
// or more than the 16-bit length field can hold.
func (h *Header) Format() ([]byte, error) {
	switch h.Version {
	case 1:
		return h.formatV1()
	case 2:
		return h.formatV2()
	}
	return nil, fmt.Errorf("proxyproto: format: version %d, want 1 or 2", h.Version)
}

// addresses reports whether h carries addresses, checking that Command and
// Protocol are known values.
func (h *Header) addresses() (bool, error) {
	if h.Command != Local && h.Command != Proxy {
		return false, fmt.Errorf("command %v, want LOCAL or PROXY", h.Command)
	}
	if h.Protocol > TCP6 {
		return false, fmt.Errorf("protocol %v, want TCP4, TCP6 or UNKNOWN", h.Protocol)
	}
	return h.Command == Proxy && h.Protocol != Unknown, nil
}

// checkAddrs checks that h's addresses fit its Protocol: both IPv4 (or
// IPv4-mapped IPv6) for TCP4, both valid for TCP6.
func (h *Header) checkAddrs() error {
	for _, ap := range []netip.AddrPort{h.Source, h.Destination} {
		if !ap.IsValid() {
			return fmt.Errorf("%v header with an invalid address %v", h.Protocol, ap)
		}
		if h.Protocol == TCP4 && !ap.Addr().Unmap().Is4() {
			return fmt.Errorf("TCP4 header with IPv6 address %v", ap.Addr())
		}
	}
	return nil
}

// SourceAddr returns the client's address as a *net.TCPAddr (IPv4-mapped
// IPv6 addresses unmapped to IPv4), or nil when the header carries none
// (Local, Unknown) and for a nil h: the caller then uses the connection's
// RemoteAddr.
func (h *Header) SourceAddr() net.Addr {
	if h == nil {
		return nil
	}
	return h.tcpAddr(h.Source)
}

// DestinationAddr is like [Header.SourceAddr] for the address the client
// connected to; nil means the connection's LocalAddr applies.
func (h *Header) DestinationAddr() net.Addr {
	if h == nil {
		return nil
	}
	return h.tcpAddr(h.Destination)
}

func (h *Header) tcpAddr(ap netip.AddrPort) net.Addr {
	if h.Command != Proxy || h.Protocol == Unknown || !ap.IsValid() {
		return nil // an untyped nil, not a nil *net.TCPAddr
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
}

// transportFor picks the family for a pair of addresses to send: TCP4 when
// both are IPv4 (or IPv4-mapped), TCP6 when both are valid otherwise,
// Unknown when either is invalid.
func transportFor(src, dst netip.AddrPort) Transport {
	switch {
	case !src.IsValid() || !dst.IsValid():
		return Unknown
	case src.Addr().Unmap().Is4() && dst.Addr().Unmap().Is4():
		return TCP4
	}
	return TCP6
}

// as4 and as16 give an address in the family written on the wire; a zone,
// which the PROXY protocol cannot carry, is dropped.
func as4(a netip.Addr) netip.Addr  { return a.Unmap() }
func as16(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.As16()) }
