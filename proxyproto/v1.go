package proxyproto

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// V1MaxLength is the longest v1 line the spec allows, CRLF included:
// "PROXY UNKNOWN " followed by two full IPv6 addresses and two 5-digit ports.
const V1MaxLength = 107

// readV1 reads the text line whose "PROXY " signature Read has peeked, up to
// and including its CRLF and not one byte further.
func readV1(br *bufio.Reader) (*Header, error) {
	line := make([]byte, 0, V1MaxLength)
	for {
		c, err := br.ReadByte()
		if err != nil {
			return nil, readError(1, err)
		}
		line = append(line, c)
		if c == '\n' {
			break
		}
		if len(line) == V1MaxLength {
			return nil, invalidf(1, "no CRLF in the first %d bytes", V1MaxLength)
		}
	}
	if len(line) < 2 || line[len(line)-2] != '\r' {
		return nil, invalidf(1, "line ends with a bare LF, want CRLF")
	}
	return parseV1(string(line[len(v1Signature) : len(line)-2]))
}

// parseV1 parses what follows "PROXY " on the line, CRLF excluded:
// "TCP4 <src> <dst> <sport> <dport>", the same with TCP6, or "UNKNOWN"
// followed by anything.
func parseV1(s string) (*Header, error) {
	proto, rest, _ := strings.Cut(s, " ")
	h := &Header{Version: 1, Command: Proxy}
	switch proto {
	case "UNKNOWN":
		// The spec: the receiver must ignore anything before the CRLF.
		h.Protocol = Unknown
		return h, nil
	case "TCP4":
		h.Protocol = TCP4
	case "TCP6":
		h.Protocol = TCP6
	case "":
		return nil, invalidf(1, "no protocol after \"PROXY \" (fields are separated by exactly one space)")
	default:
		return nil, invalidf(1, "protocol %q, want TCP4, TCP6 or UNKNOWN", proto)
	}
	fields := strings.Split(rest, " ")
	for _, f := range fields {
		if f == "" {
			return nil, invalidf(1, "%s line %q has an empty field (fields are separated by exactly one space)", proto, s)
		}
	}
	if len(fields) != 4 {
		return nil, invalidf(1, "%s line has %d fields after the protocol, want 4: source address, destination address, source port, destination port", proto, len(fields))
	}
	src, err := parseV1Addr(h.Protocol, "source address", fields[0])
	if err != nil {
		return nil, err
	}
	dst, err := parseV1Addr(h.Protocol, "destination address", fields[1])
	if err != nil {
		return nil, err
	}
	sport, err := parseV1Port("source port", fields[2])
	if err != nil {
		return nil, err
	}
	dport, err := parseV1Port("destination port", fields[3])
	if err != nil {
		return nil, err
	}
	h.Source = netip.AddrPortFrom(src, sport)
	h.Destination = netip.AddrPortFrom(dst, dport)
	return h, nil
}

// parseV1Addr parses an address of the line's family. netip.ParseAddr already
// refuses IPv4 octets with leading zeros, which the spec forbids.
func parseV1Addr(proto Transport, what, s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, invalidf(1, "%s %q is not an IP address", what, s)
	case a.Zone() != "":
		return netip.Addr{}, invalidf(1, "%s %q has a zone, which the PROXY protocol cannot carry", what, s)
	case proto == TCP4 && !a.Is4():
		return netip.Addr{}, invalidf(1, "%s %q is not an IPv4 address (protocol TCP4)", what, s)
	case proto == TCP6 && !a.Is6():
		return netip.Addr{}, invalidf(1, "%s %q is not an IPv6 address (protocol TCP6)", what, s)
	}
	return a, nil
}

// parseV1Port parses a port: decimal, 0 to 65535, no leading zeros (the spec
// forbids them, to avoid any confusion with octal).
func parseV1Port(what, s string) (uint16, error) {
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, invalidf(1, "%s %q is not a decimal number", what, s)
		}
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, invalidf(1, "%s %q has a leading zero", what, s)
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if errors.Is(err, strconv.ErrRange) {
		return 0, invalidf(1, "%s %q out of range", what, s)
	}
	if err != nil {
		return 0, invalidf(1, "%s %q is not a decimal number", what, s)
	}
	return uint16(n), nil
}

// AppendV1 appends a v1 line for a TCP connection from src to dst:
// "PROXY TCP4 ..." when both addresses are IPv4 (IPv4-mapped IPv6 counts as
// IPv4), "PROXY TCP6 ..." otherwise, with an IPv4 address of a mixed pair
// written IPv4-mapped (::ffff:a.b.c.d, in hexadecimal groups as the spec
// asks), since one line has one family. "PROXY UNKNOWN\r\n" when either
// address is invalid. Zones are dropped.
func AppendV1(b []byte, src, dst netip.AddrPort) []byte {
	return appendV1(b, transportFor(src, dst), src, dst)
}

// appendV1 writes the line for proto; the addresses must fit it (see
// Header.checkAddrs).
func appendV1(b []byte, proto Transport, src, dst netip.AddrPort) []byte {
	b = append(b, v1Signature...)
	if proto == Unknown {
		return append(b, "UNKNOWN\r\n"...)
	}
	conv := as4
	if proto == TCP6 {
		conv = as16
	}
	b = append(b, proto.String()...)
	b = append(b, ' ')
	b = appendV1Addr(b, conv(src.Addr()))
	b = append(b, ' ')
	b = appendV1Addr(b, conv(dst.Addr()))
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(src.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(dst.Port()), 10)
	return append(b, "\r\n"...)
}

// appendV1Addr writes a in the spec's canonical text. Go writes an
// IPv4-mapped address with a dotted tail (::ffff:1.2.3.4), which the spec's
// "sets of 4 hexadecimal digits" does not include; the expanded form is in
// hexadecimal and still within the 39 characters the spec budgets.
func appendV1Addr(b []byte, a netip.Addr) []byte {
	if a.Is4In6() {
		return append(b, a.StringExpanded()...)
	}
	return a.AppendTo(b)
}

func (h *Header) formatV1() ([]byte, error) {
	if len(h.TLVs) > 0 {
		return nil, errors.New("proxyproto: format v1: v1 has no TLVs")
	}
	hasAddrs, err := h.addresses()
	if err != nil {
		return nil, fmt.Errorf("proxyproto: format v1: %w", err)
	}
	if !hasAddrs {
		// v1 has no LOCAL: UNKNOWN tells the receiver to use the real
		// connection endpoints, which is what LOCAL means.
		return appendV1(nil, Unknown, h.Source, h.Destination), nil
	}
	if err := h.checkAddrs(); err != nil {
		return nil, fmt.Errorf("proxyproto: format v1: %w", err)
	}
	return appendV1(make([]byte, 0, V1MaxLength), h.Protocol, h.Source, h.Destination), nil
}
