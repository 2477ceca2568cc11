package proxyproto

import (
	"bufio"
	"bytes"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestAppendV1Bytes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		want     string
	}{
		{"TCP4", mustAddrPort("192.168.0.1:56324"), mustAddrPort("192.168.0.11:443"),
			"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"},
		{"TCP6", mustAddrPort("[2001:db8::1]:51000"), mustAddrPort("[2001:db8::2]:8443"),
			"PROXY TCP6 2001:db8::1 2001:db8::2 51000 8443\r\n"},
		{"IPv4-mapped pair is TCP4", mustAddrPort("[::ffff:1.2.3.4]:1"), mustAddrPort("[::ffff:5.6.7.8]:2"),
			"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"},
		// One line has one family: the IPv4 address is written IPv4-mapped,
		// in the hexadecimal groups the spec describes.
		{"mixed pair is TCP6", mustAddrPort("1.2.3.4:1"), mustAddrPort("[2001:db8::2]:2"),
			"PROXY TCP6 0000:0000:0000:0000:0000:ffff:0102:0304 2001:db8::2 1 2\r\n"},
		{"zone dropped", mustAddrPort("[fe80::1%eth0]:1"), mustAddrPort("[fe80::2]:2"),
			"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"},
		{"invalid address is UNKNOWN", netip.AddrPort{}, mustAddrPort("1.2.3.4:5"), "PROXY UNKNOWN\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := AppendV1([]byte("prefix"), tc.src, tc.dst)
			if string(got) != "prefix"+tc.want {
				t.Fatalf("AppendV1 = %q, want %q", got, "prefix"+tc.want)
			}
		})
	}
}

func TestAppendRoundTrip(t *testing.T) {
	// What AppendV1 and AppendV2 write, Read reads back: the same addresses
	// (IPv4 ones IPv4-mapped when the pair is mixed) and the TLVs.
	tlvs := []TLV{{TLVAuthority, []byte("example.com")}, {TLVSSL, []byte(sslValue)}, {TLVCRC32C, make([]byte, 4)}}
	for _, tc := range []struct {
		name     string
		src, dst string
		proto    Transport
	}{
		{"IPv4", "203.0.113.7:40000", "198.51.100.1:443", TCP4},
		{"IPv6", "[2001:db8::7]:40000", "[2001:db8::1]:443", TCP6},
		{"IPv4-mapped", "[::ffff:203.0.113.7]:40000", "[::ffff:198.51.100.1]:443", TCP4},
		{"IPv4 to IPv6", "203.0.113.7:40000", "[2001:db8::1]:443", TCP6},
		{"IPv6 to IPv4", "[2001:db8::7]:40000", "198.51.100.1:443", TCP6},
		{"longest v1", "[" + maxIPv6 + "]:65535", "[" + maxIPv6 + "]:65535", TCP6},
		{"ports 0", "0.0.0.0:0", "255.255.255.255:0", TCP4},
	} {
		src, dst := mustAddrPort(tc.src), mustAddrPort(tc.dst)
		for _, v := range []struct {
			version int
			b       []byte
		}{
			{1, AppendV1(nil, src, dst)},
			{2, AppendV2(nil, src, dst, tlvs...)},
		} {
			t.Run(tc.name+"/v"+string(rune('0'+v.version)), func(t *testing.T) {
				h, err := Read(bufio.NewReader(bytes.NewReader(append(v.b, trailer...))))
				if err != nil {
					t.Fatalf("Read(%q): %v", v.b, err)
				}
				if h.Version != v.version || h.Command != Proxy || h.Protocol != tc.proto {
					t.Fatalf("Read(%q) = version %d %v %v, want version %d PROXY %v", v.b, h.Version, h.Command, h.Protocol, v.version, tc.proto)
				}
				for _, p := range []struct{ got, want netip.AddrPort }{{h.Source, src}, {h.Destination, dst}} {
					if p.got.Addr().Unmap() != p.want.Addr().Unmap() || p.got.Port() != p.want.Port() {
						t.Fatalf("Read(%q) address %v, want %v", v.b, p.got, p.want)
					}
				}
				if h.Protocol == TCP6 && (!h.Source.Addr().Is6() || !h.Destination.Addr().Is6()) {
					t.Fatalf("TCP6 header with addresses %v and %v, want both IPv6", h.Source, h.Destination)
				}
				if v.version == 2 && (len(h.TLVs) != len(tlvs) || !bytes.Equal(h.TLVs[1].Value, tlvs[1].Value)) {
					t.Fatalf("TLVs %+v, want %+v", h.TLVs, tlvs)
				}
			})
		}
	}
}

func TestFormatRoundTrip(t *testing.T) {
	// Format then Read gives the header back, for every header the read
	// tables accept (after Read: Format keeps IPv4-mapped TCP6 addresses
	// and the TLVs as they are).
	for _, tc := range append(append([]readCase{}, v1Cases...), v2Cases...) {
		if tc.want == nil {
			continue
		}
		b, err := tc.want.Format()
		if err != nil {
			t.Fatalf("%s: Format(%+v): %v", tc.name, tc.want, err)
		}
		h, err := Read(bufio.NewReader(bytes.NewReader(b)))
		if err != nil {
			t.Fatalf("%s: Read(Format()) of %q: %v", tc.name, b, err)
		}
		if !reflect.DeepEqual(h, tc.want) {
			t.Fatalf("%s: Read(Format()) =\n%+v\nwant\n%+v", tc.name, h, tc.want)
		}
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    Header
		want string
	}{
		{"v1 LOCAL is UNKNOWN", Header{Version: 1, Command: Local, Source: want4.Source, Destination: want4.Destination}, "PROXY UNKNOWN\r\n"},
		{"v1 UNKNOWN", Header{Version: 1, Command: Proxy}, "PROXY UNKNOWN\r\n"},
		{"v1 TCP4 from IPv4-mapped", Header{Version: 1, Command: Proxy, Protocol: TCP4,
			Source: mustAddrPort("[::ffff:1.2.3.4]:1"), Destination: mustAddrPort("5.6.7.8:2")}, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"},
		{"v1 TCP6 forces IPv6", Header{Version: 1, Command: Proxy, Protocol: TCP6,
			Source: mustAddrPort("1.2.3.4:1"), Destination: mustAddrPort("[::1]:2")},
			"PROXY TCP6 0000:0000:0000:0000:0000:ffff:0102:0304 ::1 1 2\r\n"},
		{"v2 LOCAL drops addresses", Header{Version: 2, Command: Local, Protocol: TCP4, Source: want4.Source, Destination: want4.Destination},
			v2hdr(0x20, 0x00)},
		{"v2 UNKNOWN", Header{Version: 2, Command: Proxy}, v2hdr(0x21, 0x00)},
		{"v2 TCP6 forces IPv6", Header{Version: 2, Command: Proxy, Protocol: TCP6,
			Source: mustAddrPort("1.2.3.4:1"), Destination: mustAddrPort("5.6.7.8:2")},
			v2hdr(0x21, 0x21, []byte{
				0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4,
				0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 5, 6, 7, 8,
				0, 1, 0, 2,
			})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.h.Format()
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("Format = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestFormatErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    Header
		want string
	}{
		{"version 0", Header{Command: Proxy}, "proxyproto: format: version 0, want 1 or 2"},
		{"version 3", Header{Version: 3, Command: Proxy}, "version 3, want 1 or 2"},
		{"v1 TLVs", Header{Version: 1, Command: Proxy, Protocol: TCP4, Source: want4.Source, Destination: want4.Destination,
			TLVs: []TLV{{TLVNoop, nil}}}, "proxyproto: format v1: v1 has no TLVs"},
		{"v1 command", Header{Version: 1, Command: 7}, "command Command(0x7), want LOCAL or PROXY"},
		{"v2 protocol", Header{Version: 2, Command: Proxy, Protocol: 9}, "protocol Transport(9), want TCP4, TCP6 or UNKNOWN"},
		{"v1 TCP4 with IPv6", Header{Version: 1, Command: Proxy, Protocol: TCP4, Source: want6.Source, Destination: want4.Destination},
			"proxyproto: format v1: TCP4 header with IPv6 address 2001:db8::1"},
		{"v2 TCP4 with IPv6", Header{Version: 2, Command: Proxy, Protocol: TCP4, Source: want4.Source, Destination: want6.Destination},
			"proxyproto: format v2: TCP4 header with IPv6 address 2001:db8::2"},
		{"v2 TCP6 without addresses", Header{Version: 2, Command: Proxy, Protocol: TCP6}, "TCP6 header with an invalid address"},
		{"v2 LOCAL with TLVs", Header{Version: 2, Command: Local, TLVs: []TLV{{TLVNoop, nil}}}, "TLVs need a PROXY header with TCP4 or TCP6 addresses"},
		{"v2 UNKNOWN with TLVs", Header{Version: 2, Command: Proxy, TLVs: []TLV{{TLVNoop, nil}}}, "TLVs need a PROXY header"},
		{"v2 too long", Header{Version: 2, Command: Proxy, Protocol: TCP6, Source: want6.Source, Destination: want6.Destination,
			TLVs: []TLV{{TLVNoop, make([]byte, 65535-36-3+1)}}}, "proxyproto: format v2: header length 65536 does not fit in 16 bits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.h.Format()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Format = %q, %v; want an error containing %q", b, err, tc.want)
			}
		})
	}
	// The longest header that fits is written.
	h := Header{Version: 2, Command: Proxy, Protocol: TCP6, Source: want6.Source, Destination: want6.Destination,
		TLVs: []TLV{{TLVNoop, make([]byte, 65535-36-3)}}}
	if b, err := h.Format(); err != nil || len(b) != 16+65535 {
		t.Fatalf("Format of a 65535-byte block: %d bytes, %v", len(b), err)
	}
}

func TestSourceAddr(t *testing.T) {
	for _, tc := range []struct {
		name     string
		h        *Header
		src, dst *net.TCPAddr // nil: none
	}{
		{"TCP4", want4, &net.TCPAddr{IP: net.IPv4(192, 168, 0, 1).To4(), Port: 56324}, &net.TCPAddr{IP: net.IPv4(192, 168, 0, 11).To4(), Port: 443}},
		{"TCP6", want6, &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 51000}, &net.TCPAddr{IP: net.ParseIP("2001:db8::2"), Port: 8443}},
		{"IPv4-mapped unmapped", &Header{Version: 1, Command: Proxy, Protocol: TCP6,
			Source: mustAddrPort("[::ffff:1.2.3.4]:1"), Destination: mustAddrPort("[::1]:2")},
			&net.TCPAddr{IP: net.IPv4(1, 2, 3, 4).To4(), Port: 1}, &net.TCPAddr{IP: net.IPv6loopback, Port: 2}},
		{"LOCAL", &Header{Version: 2, Command: Local, Protocol: TCP4, Source: want4.Source, Destination: want4.Destination}, nil, nil},
		{"UNKNOWN", &Header{Version: 1, Command: Proxy}, nil, nil},
		{"nil header", nil, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, a := range []struct {
				got  net.Addr
				want *net.TCPAddr
			}{{tc.h.SourceAddr(), tc.src}, {tc.h.DestinationAddr(), tc.dst}} {
				if a.want == nil {
					// A nil net.Addr, not a nil *net.TCPAddr in an interface.
					if a.got != nil {
						t.Fatalf("got %#v, want nil", a.got)
					}
					continue
				}
				if !reflect.DeepEqual(a.got, a.want) {
					t.Fatalf("got %#v, want %#v", a.got, a.want)
				}
			}
		})
	}
}
