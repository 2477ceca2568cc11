package proxyproto

import (
	"errors"
	"strings"
	"testing"
)

const (
	maxIPv6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" // 39 characters, the longest
	// The spec's longest lines: 104 bytes for TCP6, 107 for UNKNOWN.
	maxTCP6Line    = "PROXY TCP6 " + maxIPv6 + " " + maxIPv6 + " 65535 65535\r\n"
	maxUnknownLine = "PROXY UNKNOWN " + maxIPv6 + " " + maxIPv6 + " 65535 65535\r\n"
)

var v1Cases = []readCase{
	// Accepted.
	{name: "TCP4", in: "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", want: &Header{
		Version: 1, Command: Proxy, Protocol: TCP4,
		Source: mustAddrPort("192.168.0.1:56324"), Destination: mustAddrPort("192.168.0.11:443"),
	}},
	{name: "TCP4 longest", in: "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", want: &Header{
		Version: 1, Command: Proxy, Protocol: TCP4,
		Source: mustAddrPort("255.255.255.255:65535"), Destination: mustAddrPort("255.255.255.255:65535"),
	}},
	{name: "TCP4 port 0", in: "PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", want: &Header{
		Version: 1, Command: Proxy, Protocol: TCP4,
		Source: mustAddrPort("0.0.0.0:0"), Destination: mustAddrPort("10.0.0.1:0"),
	}},
	{name: "TCP6", in: "PROXY TCP6 2001:db8::1 2001:DB8::2 51000 8443\r\n", want: &Header{
		Version: 1, Command: Proxy, Protocol: TCP6,
		Source: mustAddrPort("[2001:db8::1]:51000"), Destination: mustAddrPort("[2001:db8::2]:8443"),
	}},
	{name: "TCP6 longest", in: maxTCP6Line, want: &Header{
		Version: 1, Command: Proxy, Protocol: TCP6,
		Source: mustAddrPort("[" + maxIPv6 + "]:65535"), Destination: mustAddrPort("[" + maxIPv6 + "]:65535"),
	}},
	{name: "TCP6 IPv4-mapped kept", in: "PROXY TCP6 ::ffff:102:304 0:0:0:0:0:ffff:5.6.7.8 1 2\r\n", want: &Header{
		Version: 1, Command: Proxy, Protocol: TCP6,
		Source: mustAddrPort("[::ffff:1.2.3.4]:1"), Destination: mustAddrPort("[::ffff:5.6.7.8]:2"),
	}},
	{name: "UNKNOWN short", in: "PROXY UNKNOWN\r\n", want: &Header{Version: 1, Command: Proxy, Protocol: Unknown}},
	{name: "UNKNOWN with addresses", in: "PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", want: &Header{Version: 1, Command: Proxy, Protocol: Unknown}},
	{name: "UNKNOWN longest (107 bytes)", in: maxUnknownLine, want: &Header{Version: 1, Command: Proxy, Protocol: Unknown}},
	{name: "UNKNOWN anything", in: "PROXY UNKNOWN whatever  the sender\twrote\r\n", want: &Header{Version: 1, Command: Proxy, Protocol: Unknown}},
	{name: "UNKNOWN 107 bytes", in: "PROXY UNKNOWN " + strings.Repeat("x", 91) + "\r\n", want: &Header{Version: 1, Command: Proxy, Protocol: Unknown}},

	// Line framing.
	{name: "108 bytes", in: "PROXY UNKNOWN " + strings.Repeat("x", 92) + "\r\n", err: ErrInvalid, errText: "proxyproto: v1: no CRLF in the first 107 bytes"},
	{name: "too long", in: "PROXY TCP6 " + maxIPv6 + "  " + maxIPv6 + " 65535 65535 65535\r\n", err: ErrInvalid, errText: "no CRLF in the first 107 bytes"},
	{name: "bare LF", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", err: ErrInvalid, errText: "proxyproto: v1: line ends with a bare LF, want CRLF"},
	{name: "bare CR", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r" + strings.Repeat("x", 100), err: ErrInvalid, errText: "no CRLF"},
	{name: "CR inside", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET / HTTP/1.1\r\n", err: ErrInvalid, errText: "v1:"},
	{name: "truncated", in: "PROXY TCP4 1.2.3.4 5.6", err: ErrInvalid, errText: "proxyproto: v1: header truncated: unexpected EOF"},

	// Fields.
	{name: "no protocol", in: "PROXY \r\n", err: ErrInvalid, errText: `no protocol after "PROXY "`},
	{name: "two spaces after PROXY", in: "PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: "no protocol"},
	{name: "two spaces between addresses", in: "PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", err: ErrInvalid, errText: "empty field"},
	{name: "trailing space", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", err: ErrInvalid, errText: "empty field"},
	{name: "tab separator", in: "PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", err: ErrInvalid, errText: "has 3 fields after the protocol, want 4"},
	{name: "too few fields", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", err: ErrInvalid, errText: "TCP4 line has 3 fields after the protocol, want 4"},
	{name: "too many fields", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", err: ErrInvalid, errText: "has 5 fields"},
	{name: "protocol UDP4", in: "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: `protocol "UDP4", want TCP4, TCP6 or UNKNOWN`},
	{name: "protocol lower case", in: "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: `protocol "tcp4"`},
	{name: "UNKNOWN glued", in: "PROXY UNKNOWNX\r\n", err: ErrInvalid, errText: `protocol "UNKNOWNX"`},

	// Addresses.
	{name: "bad IPv4", in: "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: `proxyproto: v1: source address "1.2.3" is not an IP address`},
	{name: "IPv4 octet too big", in: "PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", err: ErrInvalid, errText: `destination address "5.6.7.256" is not an IP address`},
	{name: "IPv4 leading zero", in: "PROXY TCP4 010.2.3.4 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: `source address "010.2.3.4" is not an IP address`},
	{name: "host name", in: "PROXY TCP4 localhost 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: `"localhost" is not an IP address`},
	{name: "IPv4 in TCP6", in: "PROXY TCP6 1.2.3.4 ::1 1 2\r\n", err: ErrInvalid, errText: `source address "1.2.3.4" is not an IPv6 address (protocol TCP6)`},
	{name: "IPv6 in TCP4", in: "PROXY TCP4 1.2.3.4 ::1 1 2\r\n", err: ErrInvalid, errText: `destination address "::1" is not an IPv4 address (protocol TCP4)`},
	{name: "IPv4-mapped in TCP4", in: "PROXY TCP4 ::ffff:1.2.3.4 5.6.7.8 1 2\r\n", err: ErrInvalid, errText: "is not an IPv4 address"},
	{name: "bad IPv6", in: "PROXY TCP6 2001:db8:::1 ::1 1 2\r\n", err: ErrInvalid, errText: `source address "2001:db8:::1" is not an IP address`},
	{name: "IPv6 zone", in: "PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", err: ErrInvalid, errText: `source address "fe80::1%eth0" has a zone`},
	{name: "bracketed IPv6", in: "PROXY TCP6 [::1] ::1 1 2\r\n", err: ErrInvalid, errText: `"[::1]" is not an IP address`},

	// Ports.
	{name: "port out of range", in: "PROXY TCP4 1.2.3.4 5.6.7.8 70000 443\r\n", err: ErrInvalid, errText: `proxyproto: v1: source port "70000" out of range`},
	{name: "port 65536", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", err: ErrInvalid, errText: `destination port "65536" out of range`},
	{name: "port six digits", in: "PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n", err: ErrInvalid, errText: `source port "100000" out of range`},
	{name: "port leading zero", in: "PROXY TCP4 1.2.3.4 5.6.7.8 0443 2\r\n", err: ErrInvalid, errText: `source port "0443" has a leading zero`},
	{name: "port 00", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", err: ErrInvalid, errText: `destination port "00" has a leading zero`},
	{name: "port sign", in: "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", err: ErrInvalid, errText: `source port "+1" is not a decimal number`},
	{name: "port negative", in: "PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", err: ErrInvalid, errText: `destination port "-2" is not a decimal number`},
	{name: "port hex", in: "PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", err: ErrInvalid, errText: `source port "0x50" is not a decimal number`},
}

func TestReadV1(t *testing.T) {
	if len(maxTCP6Line) != 104 || len(maxUnknownLine) != 107 {
		t.Fatalf("test lines are %d and %d bytes, want the spec's 104 and 107", len(maxTCP6Line), len(maxUnknownLine))
	}
	runReadCases(t, v1Cases)
}

func TestReadV1ErrorMessage(t *testing.T) {
	// The whole message, as a user sees it in the log.
	_, err := Read(readers[0].new("PROXY TCP4 1.2.3.4 5.6.7.8 70000 443\r\n"))
	if got, want := err.Error(), `proxyproto: v1: source port "70000" out of range`; got != want {
		t.Fatalf("error %q, want %q", got, want)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Fatal("the error does not match ErrInvalid")
	}
}
