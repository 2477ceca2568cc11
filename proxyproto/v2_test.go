package proxyproto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
)

// v2hdr builds a v2 header by hand from the spec's layout (section 2.2): the
// 12-byte signature, the version and command byte, the family and protocol
// byte, the 16-bit big-endian length, then the block.
func v2hdr(verCmd, fam byte, block ...[]byte) string {
	body := bytes.Join(block, nil)
	b := []byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, verCmd, fam}
	b = binary.BigEndian.AppendUint16(b, uint16(len(body)))
	return string(append(b, body...))
}

// v2tlv is one TLV: type, 16-bit big-endian length, value.
func v2tlv(typ byte, value string) []byte {
	return append([]byte{typ, byte(len(value) >> 8), byte(len(value))}, value...)
}

var (
	// 192.168.0.1:56324 -> 192.168.0.11:443
	v2block4 = []byte{192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb}
	// [2001:db8::1]:51000 -> [2001:db8::2]:8443
	v2block6 = []byte{
		0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
		0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
		0xc7, 0x38, 0x20, 0xfb,
	}
	want4 = &Header{
		Version: 2, Command: Proxy, Protocol: TCP4,
		Source: mustAddrPort("192.168.0.1:56324"), Destination: mustAddrPort("192.168.0.11:443"),
	}
	want6 = &Header{
		Version: 2, Command: Proxy, Protocol: TCP6,
		Source: mustAddrPort("[2001:db8::1]:51000"), Destination: mustAddrPort("[2001:db8::2]:8443"),
	}
	wantLocal = &Header{Version: 2, Command: Local}

	// A PP2_TYPE_SSL value: client flags (SSL, cert on this connection),
	// verify = 0, then the sub-TLVs version and CN.
	sslValue = "\x03\x00\x00\x00\x00" + string(v2tlv(0x21, "TLSv1.3")) + string(v2tlv(0x22, "client.example"))
)

func with(h *Header, tlvs ...TLV) *Header {
	c := *h
	c.TLVs = tlvs
	return &c
}

var v2Cases = []readCase{
	// Accepted.
	{name: "PROXY TCP4", in: v2hdr(0x21, 0x11, v2block4), want: want4},
	{name: "PROXY TCP6", in: v2hdr(0x21, 0x21, v2block6), want: want6},
	{name: "PROXY TCP6 IPv4-mapped kept", in: v2hdr(0x21, 0x21, []byte{
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 5, 6, 7, 8,
		0, 1, 0, 2,
	}), want: &Header{
		Version: 2, Command: Proxy, Protocol: TCP6,
		Source: mustAddrPort("[::ffff:1.2.3.4]:1"), Destination: mustAddrPort("[::ffff:5.6.7.8]:2"),
	}},
	{name: "LOCAL UNSPEC", in: v2hdr(0x20, 0x00), want: wantLocal},
	{name: "LOCAL with a TCP4 block", in: v2hdr(0x20, 0x11, v2block4), want: wantLocal},
	{name: "LOCAL with TLVs", in: v2hdr(0x20, 0x00, v2tlv(TLVNoop, "xyz")), want: wantLocal},
	{name: "LOCAL UDP ignored", in: v2hdr(0x20, 0x12, v2block4), want: wantLocal},
	{name: "LOCAL short block ignored", in: v2hdr(0x20, 0x21, []byte{1, 2, 3}), want: wantLocal},
	{name: "PROXY UNSPEC", in: v2hdr(0x21, 0x00), want: &Header{Version: 2, Command: Proxy}},
	{name: "PROXY UNSPEC with a block", in: v2hdr(0x21, 0x00, []byte("ignored")), want: &Header{Version: 2, Command: Proxy}},
	{name: "PROXY UNIX stream as UNSPEC", in: v2hdr(0x21, 0x31, make([]byte, 216)), want: &Header{Version: 2, Command: Proxy}},
	{name: "TLV authority", in: v2hdr(0x21, 0x11, v2block4, v2tlv(TLVAuthority, "example.com")),
		want: with(want4, TLV{TLVAuthority, []byte("example.com")})},
	{name: "TLVs SSL ALPN unique ID NOOP", in: v2hdr(0x21, 0x21, v2block6,
		v2tlv(TLVALPN, "h2"), v2tlv(TLVSSL, sslValue), v2tlv(TLVUniqueID, "\x00\x01\x02"), v2tlv(TLVNoop, ""), v2tlv(0xe0, "custom")),
		want: with(want6,
			TLV{TLVALPN, []byte("h2")}, TLV{TLVSSL, []byte(sslValue)}, TLV{TLVUniqueID, []byte{0, 1, 2}},
			TLV{TLVNoop, []byte{}}, TLV{0xe0, []byte("custom")})},
	{name: "length at the limit", in: v2hdr(0x21, 0x11, v2block4, v2tlv(TLVNoop, strings.Repeat("\x00", MaxV2Length-12-3))),
		want: with(want4, TLV{TLVNoop, make([]byte, MaxV2Length-12-3)})},

	// Fixed part.
	{name: "version 1 nibble", in: v2hdr(0x11, 0x11, v2block4), err: ErrInvalid, errText: "proxyproto: v2: version 1 in byte 13 (0x11), want 2"},
	{name: "version 3 nibble", in: v2hdr(0x31, 0x11, v2block4), err: ErrInvalid, errText: "version 3 in byte 13 (0x31), want 2"},
	{name: "version 0 nibble", in: v2hdr(0x01, 0x11, v2block4), err: ErrInvalid, errText: "version 0"},
	{name: "command 2", in: v2hdr(0x22, 0x11, v2block4), err: ErrInvalid, errText: "proxyproto: v2: command 0x2 in byte 13 (0x22) is neither LOCAL (0x0) nor PROXY (0x1)"},
	{name: "command F", in: v2hdr(0x2f, 0x11, v2block4), err: ErrInvalid, errText: "command 0xf"},
	{name: "family 4", in: v2hdr(0x21, 0x41, v2block4), err: ErrInvalid, errText: "address family 0x4 in byte 14 (0x41)"},
	{name: "LOCAL family 4", in: v2hdr(0x20, 0x41), err: ErrInvalid, errText: "address family 0x4"},
	{name: "protocol 3", in: v2hdr(0x21, 0x13, v2block4), err: ErrInvalid, errText: "transport protocol 0x3 in byte 14 (0x13)"},
	{name: "INET without protocol", in: v2hdr(0x21, 0x10, v2block4), err: ErrInvalid, errText: "family and protocol byte 0x10 is not a combination the spec defines"},
	{name: "UNSPEC with STREAM", in: v2hdr(0x21, 0x01), err: ErrInvalid, errText: "byte 0x01 is not a combination"},
	{name: "UDP4", in: v2hdr(0x21, 0x12, v2block4), err: ErrInvalid, errText: "proxyproto: v2: UDP over IPv4 (byte 14 = 0x12) is not supported: the relay carries TCP streams only"},
	{name: "UDP6", in: v2hdr(0x21, 0x22, v2block6), err: ErrInvalid, errText: "UDP over IPv6 (byte 14 = 0x22) is not supported"},
	{name: "UNIX datagram", in: v2hdr(0x21, 0x32, make([]byte, 216)), err: ErrInvalid, errText: "UNIX datagram (byte 14 = 0x32) is not supported"},
	{name: "length over the limit", in: v2hdr(0x21, 0x11, v2block4, make([]byte, MaxV2Length-12+1)), err: ErrInvalid,
		errText: "proxyproto: v2: length 2049 exceeds the limit of 2048 bytes"},

	// Address block.
	{name: "TCP4 block 11 bytes", in: v2hdr(0x21, 0x11, v2block4[:11]), err: ErrInvalid,
		errText: "proxyproto: v2: length 11 is too short for the 12-byte address block of TCP over IPv4"},
	{name: "TCP4 block empty", in: v2hdr(0x21, 0x11), err: ErrInvalid, errText: "length 0 is too short"},
	{name: "TCP6 block of TCP4 size", in: v2hdr(0x21, 0x21, v2block4), err: ErrInvalid,
		errText: "length 12 is too short for the 36-byte address block of TCP over IPv6"},
	{name: "TCP6 block 35 bytes", in: v2hdr(0x21, 0x21, v2block6[:35]), err: ErrInvalid, errText: "length 35 is too short"},

	// TLVs.
	{name: "TLV cut in its length", in: v2hdr(0x21, 0x11, v2block4, []byte{TLVNoop, 0}), err: ErrInvalid,
		errText: "proxyproto: v2: 2 byte(s) after the last TLV, fewer than the 3 of a TLV's type and length"},
	{name: "TLV overruns", in: v2hdr(0x21, 0x11, v2block4, v2tlv(TLVAuthority, "example.com")[:10]), err: ErrInvalid,
		errText: "proxyproto: v2: TLV 0x02 of length 11 overruns the header by 4 byte(s)"},
	{name: "CRC32C wrong length", in: v2hdr(0x21, 0x11, v2block4, v2tlv(TLVCRC32C, "abc")), err: ErrInvalid,
		errText: "CRC32C TLV of length 3, want 4"},
	{name: "CRC32C wrong", in: v2hdr(0x21, 0x11, v2block4, v2tlv(TLVCRC32C, "\x00\x00\x00\x00")), err: ErrInvalid,
		errText: "CRC32C TLV says 0x00000000, the header sums to 0x"},

	// Truncated by the end of the stream: "partial headers" the spec says
	// to reject.
	{name: "truncated fixed part", in: v2hdr(0x21, 0x11)[:14], err: io.ErrUnexpectedEOF, errText: "proxyproto: v2: header truncated"},
	{name: "truncated block", in: v2hdr(0x21, 0x11, v2block4)[:20], err: io.ErrUnexpectedEOF, errText: "proxyproto: v2: header truncated"},
	{name: "truncated LOCAL block", in: v2hdr(0x20, 0x00, []byte("abc"))[:17], err: ErrInvalid, errText: "header truncated"},
}

func TestReadV2(t *testing.T) {
	runReadCases(t, v2Cases)
}

// crc32cBitwise is CRC-32C (Castagnoli, reflected polynomial 0x82F63B78,
// as in RFC 4960 appendix B) computed bit by bit, to check the package's
// table-driven checksum against an independent implementation.
func crc32cBitwise(b []byte) uint32 {
	crc := ^uint32(0)
	for _, c := range b {
		crc ^= uint32(c)
		for range 8 {
			if crc&1 != 0 {
				crc = crc>>1 ^ 0x82f63b78
			} else {
				crc >>= 1
			}
		}
	}
	return ^crc
}

func TestReadV2CRC32C(t *testing.T) {
	if got := crc32cBitwise([]byte("123456789")); got != 0xe3069283 {
		t.Fatalf("crc32cBitwise check value 0x%08x, want 0xe3069283", got)
	}
	// The header with the checksum field zeroed, its CRC32c written in big
	// endian (network order) into the field.
	hdr := []byte(v2hdr(0x21, 0x11, v2block4, v2tlv(TLVAuthority, "example.com"), v2tlv(TLVCRC32C, "\x00\x00\x00\x00")))
	binary.BigEndian.PutUint32(hdr[len(hdr)-4:], crc32cBitwise(hdr))
	h, err := Read(bufio.NewReader(bytes.NewReader(hdr)))
	if err != nil {
		t.Fatalf("Read of a header with a correct CRC32C: %v", err)
	}
	if len(h.TLVs) != 2 || h.TLVs[1].Type != TLVCRC32C {
		t.Fatalf("TLVs %+v, want authority and CRC32C", h.TLVs)
	}

	// Any flipped bit is caught, except in the CRC32C TLV's type byte, which
	// turns it into a TLV of another type and the header into one without a
	// checksum.
	for i := 12; i < len(hdr); i++ {
		if i == len(hdr)-7 {
			continue
		}
		bad := bytes.Clone(hdr)
		bad[i] ^= 0x40
		if _, err := Read(bufio.NewReader(bytes.NewReader(bad))); err == nil {
			t.Fatalf("Read accepted the header with byte %d flipped", i)
		}
	}

	// Two checksums: which one would count?
	two := []byte(v2hdr(0x21, 0x11, v2block4, v2tlv(TLVCRC32C, "\x00\x00\x00\x00"), v2tlv(TLVCRC32C, "\x00\x00\x00\x00")))
	if _, err := Read(bufio.NewReader(bytes.NewReader(two))); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "more than one CRC32C TLV") {
		t.Fatalf("Read of two CRC32C TLVs: %v", err)
	}
}

func TestReadV2TLVValuesDoNotOverlap(t *testing.T) {
	h, err := Read(readers[0].new(v2hdr(0x21, 0x11, v2block4, v2tlv(TLVALPN, "h2"), v2tlv(TLVAuthority, "example.com"))))
	if err != nil {
		t.Fatal(err)
	}
	_ = append(h.TLVs[0].Value, "XXXX"...)
	if got := string(h.TLVs[1].Value); got != "example.com" {
		t.Fatalf("appending to the first TLV's value changed the second to %q", got)
	}
}

func TestAppendV2Bytes(t *testing.T) {
	// The writer produces the spec's layout byte for byte.
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		tlvs     []TLV
		want     string
	}{
		{"TCP4", want4.Source, want4.Destination, nil, v2hdr(0x21, 0x11, v2block4)},
		{"TCP6", want6.Source, want6.Destination, nil, v2hdr(0x21, 0x21, v2block6)},
		{"TCP4 with TLVs", want4.Source, want4.Destination,
			[]TLV{{TLVAuthority, []byte("example.com")}, {TLVNoop, nil}},
			v2hdr(0x21, 0x11, v2block4, v2tlv(TLVAuthority, "example.com"), v2tlv(TLVNoop, ""))},
		{"IPv4-mapped pair is TCP4", mustAddrPort("[::ffff:192.168.0.1]:56324"), mustAddrPort("[::ffff:192.168.0.11]:443"), nil,
			v2hdr(0x21, 0x11, v2block4)},
		{"mixed pair is TCP6 with the IPv4 address mapped", mustAddrPort("1.2.3.4:1"), mustAddrPort("[2001:db8::2]:2"), nil,
			v2hdr(0x21, 0x21, []byte{
				0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4,
				0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
				0, 1, 0, 2,
			})},
		{"invalid address is UNSPEC without TLVs", netip.AddrPort{}, want4.Destination, []TLV{{TLVNoop, nil}},
			v2hdr(0x21, 0x00)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := AppendV2([]byte("prefix"), tc.src, tc.dst, tc.tlvs...)
			if string(got) != "prefix"+tc.want {
				t.Fatalf("AppendV2 =\n%q\nwant\n%q", got, "prefix"+tc.want)
			}
		})
	}
}

func TestAppendV2CRC32C(t *testing.T) {
	crc := []byte{0xaa, 0xaa, 0xaa, 0xaa}
	b := AppendV2([]byte("prefix"), want4.Source, want4.Destination, TLV{TLVAuthority, []byte("example.com")}, TLV{TLVCRC32C, crc})
	if !bytes.Equal(crc, []byte{0xaa, 0xaa, 0xaa, 0xaa}) {
		t.Fatal("AppendV2 wrote into the caller's TLV value")
	}
	hdr := bytes.Clone(b[len("prefix"):])
	sum := binary.BigEndian.Uint32(hdr[len(hdr)-4:])
	clear(hdr[len(hdr)-4:])
	if want := crc32cBitwise(hdr); sum != want {
		t.Fatalf("AppendV2 wrote CRC32C 0x%08x, want 0x%08x", sum, want)
	}
	if _, err := Read(bufio.NewReader(bytes.NewReader(b[len("prefix"):]))); err != nil {
		t.Fatalf("Read of AppendV2's checksummed header: %v", err)
	}
}

func TestAppendV2TooLongPanics(t *testing.T) {
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "does not fit in 16 bits") {
			t.Fatalf("AppendV2 with 65536 bytes of TLVs: recovered %v, want a panic about the length", r)
		}
	}()
	AppendV2(nil, want4.Source, want4.Destination, TLV{TLVNoop, make([]byte, 65536)})
}
