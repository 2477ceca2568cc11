package proxyproto

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/netip"
)

// MaxV2Length is the largest v2 length field (the address block and TLVs
// after the 16-byte fixed part) that Read accepts; the field itself could say
// up to 65535. The largest address block is 216 bytes (AF_UNIX), so this
// leaves room for TLVs such as TLS details and a unique ID while bounding
// what one connection can make the relay buffer before it is trusted.
const MaxV2Length = 2048

// TLV types registered by the spec (section 2.2).
const (
	TLVALPN      = 0x01 // application protocol (the TLS ALPN value)
	TLVAuthority = 0x02 // host name the client asked for (TLS SNI), UTF-8
	TLVCRC32C    = 0x03 // CRC32c of the whole header, 4 bytes; Read verifies it
	TLVNoop      = 0x04 // padding, to be ignored
	TLVUniqueID  = 0x05 // opaque connection ID, up to 128 bytes
	TLVSSL       = 0x20 // TLS details: client flags, verify result, sub-TLVs
	TLVNetNS     = 0x30 // network namespace name
)

// Byte 14 of a v2 header: address family (high nibble) and transport
// protocol (low nibble), as the spec lists them.
const (
	famUnspec     = 0x00
	famTCP4       = 0x11
	famUDP4       = 0x12
	famTCP6       = 0x21
	famUDP6       = 0x22
	famUnixStream = 0x31
	famUnixDgram  = 0x32
)

const (
	v2FixedLength = 16 // signature, version and command, family, length
	v2AddrLen4    = 12 // 2 IPv4 addresses, 2 ports
	v2AddrLen6    = 36 // 2 IPv6 addresses, 2 ports
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// readV2 reads the binary header whose signature Read has peeked: the 16-byte
// fixed part, then exactly the number of bytes its length field says.
func readV2(br *bufio.Reader) (*Header, error) {
	var fixed [v2FixedLength]byte
	if _, err := io.ReadFull(br, fixed[:]); err != nil {
		return nil, readError(2, err)
	}
	verCmd, fam := fixed[12], fixed[13]
	length := int(binary.BigEndian.Uint16(fixed[14:]))
	if v := verCmd >> 4; v != 2 {
		return nil, invalidf(2, "version %d in byte 13 (0x%02x), want 2", v, verCmd)
	}
	cmd := Command(verCmd & 0x0f)
	if cmd != Local && cmd != Proxy {
		return nil, invalidf(2, "command 0x%x in byte 13 (0x%02x) is neither LOCAL (0x0) nor PROXY (0x1)", byte(cmd), verCmd)
	}
	if f := fam >> 4; f > 0x3 {
		return nil, invalidf(2, "address family 0x%x in byte 14 (0x%02x), want UNSPEC (0x0), INET (0x1), INET6 (0x2) or UNIX (0x3)", f, fam)
	}
	if p := fam & 0x0f; p > 0x2 {
		return nil, invalidf(2, "transport protocol 0x%x in byte 14 (0x%02x), want UNSPEC (0x0), STREAM (0x1) or DGRAM (0x2)", p, fam)
	}
	if length > MaxV2Length {
		return nil, invalidf(2, "length %d exceeds the limit of %d bytes", length, MaxV2Length)
	}

	h := &Header{Version: 2, Command: cmd}
	addrLen := 0
	if cmd == Proxy {
		switch fam {
		case famUnspec, famUnixStream:
			// No usable addresses: the spec lets a receiver treat a
			// combination it does not implement (UNIX) as UNSPEC, whose
			// address information it should ignore.
		case famTCP4:
			h.Protocol, addrLen = TCP4, v2AddrLen4
		case famTCP6:
			h.Protocol, addrLen = TCP6, v2AddrLen6
		case famUDP4, famUDP6, famUnixDgram:
			// The spec would let a receiver fall back to UNSPEC here too,
			// but a datagram header on a TCP stream means a misconfigured
			// sender: say so rather than serve it with the balancer's
			// address.
			return nil, invalidf(2, "%s (byte 14 = 0x%02x) is not supported: the relay carries TCP streams only", famName(fam), fam)
		default:
			return nil, invalidf(2, "family and protocol byte 0x%02x is not a combination the spec defines (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32)", fam)
		}
		if length < addrLen {
			return nil, invalidf(2, "length %d is too short for the %d-byte address block of %s", length, addrLen, famName(fam))
		}
	}
	// For LOCAL the spec says to skip the whole block, whatever the family,
	// and not to assume that it is empty.
	buf := make([]byte, v2FixedLength+length)
	copy(buf, fixed[:])
	if _, err := io.ReadFull(br, buf[v2FixedLength:]); err != nil {
		return nil, readError(2, err)
	}
	if addrLen == 0 {
		return h, nil
	}

	block := buf[v2FixedLength:]
	if h.Protocol == TCP4 {
		h.Source = netip.AddrPortFrom(netip.AddrFrom4([4]byte(block[0:4])), binary.BigEndian.Uint16(block[8:10]))
		h.Destination = netip.AddrPortFrom(netip.AddrFrom4([4]byte(block[4:8])), binary.BigEndian.Uint16(block[10:12]))
	} else {
		// IPv4-mapped addresses stay as sent, so that Format writes the same
		// header again.
		h.Source = netip.AddrPortFrom(netip.AddrFrom16([16]byte(block[0:16])), binary.BigEndian.Uint16(block[32:34]))
		h.Destination = netip.AddrPortFrom(netip.AddrFrom16([16]byte(block[16:32])), binary.BigEndian.Uint16(block[34:36]))
	}
	tlvs, err := parseTLVs(buf, v2FixedLength+addrLen)
	if err != nil {
		return nil, err
	}
	h.TLVs = tlvs
	return h, nil
}

func famName(fam byte) string {
	switch fam {
	case famTCP4:
		return "TCP over IPv4"
	case famUDP4:
		return "UDP over IPv4"
	case famTCP6:
		return "TCP over IPv6"
	case famUDP6:
		return "UDP over IPv6"
	case famUnixStream:
		return "UNIX stream"
	case famUnixDgram:
		return "UNIX datagram"
	}
	return fmt.Sprintf("family 0x%02x", fam)
}

// parseTLVs splits header[off:] into TLVs, which must fill it exactly, and
// verifies a CRC32C TLV against the whole header. The values share header's
// memory but are capped, so appending to one cannot overwrite the next.
func parseTLVs(header []byte, off int) ([]TLV, error) {
	var tlvs []TLV
	crcAt := -1
	for i := off; i < len(header); {
		if left := len(header) - i; left < 3 {
			return nil, invalidf(2, "%d byte(s) after the last TLV, fewer than the 3 of a TLV's type and length", left)
		}
		typ := header[i]
		n := int(binary.BigEndian.Uint16(header[i+1:]))
		i += 3
		if left := len(header) - i; n > left {
			return nil, invalidf(2, "TLV 0x%02x of length %d overruns the header by %d byte(s)", typ, n, n-left)
		}
		if typ == TLVCRC32C {
			if n != 4 {
				return nil, invalidf(2, "CRC32C TLV of length %d, want 4", n)
			}
			if crcAt >= 0 {
				return nil, invalidf(2, "more than one CRC32C TLV")
			}
			crcAt = i
		}
		tlvs = append(tlvs, TLV{Type: typ, Value: header[i : i+n : i+n]})
		i += n
	}
	if crcAt >= 0 {
		want := binary.BigEndian.Uint32(header[crcAt:])
		if got := headerCRC(header, crcAt); got != want {
			return nil, invalidf(2, "CRC32C TLV says 0x%08x, the header sums to 0x%08x", want, got)
		}
	}
	return tlvs, nil
}

// headerCRC is the CRC32c of header with the 4 bytes at crcAt taken as zero
// (spec section 2.2.3).
func headerCRC(header []byte, crcAt int) uint32 {
	var zero [4]byte
	sum := crc32.Update(0, castagnoli, header[:crcAt])
	sum = crc32.Update(sum, castagnoli, zero[:])
	return crc32.Update(sum, castagnoli, header[crcAt+4:])
}

// AppendV2 appends a v2 PROXY header for a TCP connection from src to dst,
// followed by tlvs. The family is TCP over IPv4 when both addresses are IPv4
// (IPv4-mapped IPv6 counts as IPv4) and TCP over IPv6 otherwise, with an
// IPv4 address of a mixed pair written IPv4-mapped (::ffff:a.b.c.d), since
// one header has one family. When either address is invalid it writes an
// UNSPEC header without addresses, and without the TLVs, since a receiver
// skips that block. A TLVCRC32C TLV with a 4-byte value gets the header's
// checksum written into it.
//
// It panics if the TLVs do not fit in the 16-bit length field (65535 bytes
// with the addresses); [Header.Format] returns an error instead.
func AppendV2(b []byte, src, dst netip.AddrPort, tlvs ...TLV) []byte {
	proto := transportFor(src, dst)
	if proto != Unknown {
		if n := v2Length(proto, tlvs); n > 0xffff {
			panic(fmt.Sprintf("proxyproto: AppendV2: header length %d does not fit in 16 bits", n))
		}
	}
	return appendV2(b, Proxy, proto, src, dst, tlvs)
}

// v2Length is the length field of a TCP4 or TCP6 header carrying tlvs.
func v2Length(proto Transport, tlvs []TLV) int {
	n := v2AddrLen4
	if proto == TCP6 {
		n = v2AddrLen6
	}
	for _, t := range tlvs {
		n += 3 + len(t.Value)
	}
	return n
}

// appendV2 writes the header; its length must fit (see v2Length).
func appendV2(b []byte, cmd Command, proto Transport, src, dst netip.AddrPort, tlvs []TLV) []byte {
	start := len(b)
	b = append(b, v2Signature...)
	b = append(b, 0x20|byte(cmd))
	if cmd != Proxy || proto == Unknown {
		return append(b, famUnspec, 0, 0)
	}
	fam := byte(famTCP4)
	if proto == TCP6 {
		fam = famTCP6
	}
	b = append(b, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(v2Length(proto, tlvs)))
	if proto == TCP4 {
		s, d := as4(src.Addr()).As4(), as4(dst.Addr()).As4()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	} else {
		s, d := as16(src.Addr()).As16(), as16(dst.Addr()).As16()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	b = binary.BigEndian.AppendUint16(b, dst.Port())
	crcAt := -1
	for _, t := range tlvs {
		b = append(b, t.Type)
		b = binary.BigEndian.AppendUint16(b, uint16(len(t.Value)))
		if t.Type == TLVCRC32C && len(t.Value) == 4 && crcAt < 0 {
			crcAt = len(b) - start
		}
		b = append(b, t.Value...)
	}
	if crcAt >= 0 {
		header := b[start:]
		binary.BigEndian.PutUint32(header[crcAt:], headerCRC(header, crcAt))
	}
	return b
}

func (h *Header) formatV2() ([]byte, error) {
	hasAddrs, err := h.addresses()
	if err != nil {
		return nil, fmt.Errorf("proxyproto: format v2: %w", err)
	}
	if !hasAddrs {
		if len(h.TLVs) > 0 {
			return nil, errors.New("proxyproto: format v2: TLVs need a PROXY header with TCP4 or TCP6 addresses: a receiver skips the block of a LOCAL or UNSPEC one")
		}
		return appendV2(nil, h.Command, Unknown, h.Source, h.Destination, nil), nil
	}
	if err := h.checkAddrs(); err != nil {
		return nil, fmt.Errorf("proxyproto: format v2: %w", err)
	}
	n := v2Length(h.Protocol, h.TLVs)
	if n > 0xffff {
		return nil, fmt.Errorf("proxyproto: format v2: header length %d does not fit in 16 bits", n)
	}
	return appendV2(make([]byte, 0, v2FixedLength+n), h.Command, h.Protocol, h.Source, h.Destination, h.TLVs), nil
}
