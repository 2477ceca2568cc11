package proxyproto

import (
	"bufio"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// trailer is what a client sends after the header; every successful read
// must leave it in the bufio.Reader, byte for byte.
const trailer = "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

// readCase is one input for Read, shared by the v1 and v2 tables and used as
// the fuzz seed corpus.
type readCase struct {
	name string
	in   string
	want *Header // nil when an error is expected
	// err: the error must match this sentinel (errors.Is) and, if errText is
	// set, contain it.
	err     error
	errText string
}

// readers are the ways the tests feed Read: all at once, and one byte per
// read into the smallest bufio.Reader, as if each byte came in its own TCP
// segment.
var readers = []struct {
	name string
	new  func(string) *bufio.Reader
}{
	{"whole", func(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }},
	{"bytewise", func(s string) *bufio.Reader {
		return bufio.NewReaderSize(iotest.OneByteReader(strings.NewReader(s)), 16)
	}},
}

// runReadCases checks each case with each reader: the header or the error,
// and on success that the trailer is still readable.
func runReadCases(t *testing.T, cases []readCase) {
	t.Helper()
	for _, tc := range cases {
		for _, r := range readers {
			t.Run(tc.name+"/"+r.name, func(t *testing.T) {
				in := tc.in
				if tc.want != nil {
					in += trailer
				}
				br := r.new(in)
				h, err := Read(br)
				if tc.want == nil {
					if err == nil {
						t.Fatalf("Read(%q) = %+v, want an error", tc.in, h)
					}
					if !errors.Is(err, tc.err) {
						t.Fatalf("Read(%q) error %q does not match %q", tc.in, err, tc.err)
					}
					if !strings.Contains(err.Error(), tc.errText) {
						t.Fatalf("Read(%q) error %q, want it to contain %q", tc.in, err, tc.errText)
					}
					return
				}
				if err != nil {
					t.Fatalf("Read(%q): %v", tc.in, err)
				}
				if !reflect.DeepEqual(h, tc.want) {
					t.Fatalf("Read(%q) =\n%+v\nwant\n%+v", tc.in, h, tc.want)
				}
				rest, err := io.ReadAll(br)
				if err != nil {
					t.Fatal(err)
				}
				if string(rest) != trailer {
					t.Fatalf("after the header the reader holds %q, want %q", rest, trailer)
				}
			})
		}
	}
}

func TestReadNoHeader(t *testing.T) {
	for _, in := range []string{
		"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
		"POST / HTTP/1.1\r\n\r\n", // "P" is also the start of "PROXY "
		"PROXY\r\n",               // no space after PROXY
		"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
		"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
		"\r\n\r\n\x00\r\nQUIT!",    // v2 signature, last byte wrong
		"\x16\x03\x01\x02\x00\x01", // a TLS ClientHello
		"SSH-2.0-OpenSSH_9.6\r\n",
	} {
		for _, r := range readers {
			br := r.new(in)
			_, err := Read(br)
			if !errors.Is(err, ErrNoHeader) {
				t.Fatalf("%s: Read(%q) error %v, want ErrNoHeader", r.name, in, err)
			}
			if errors.Is(err, ErrInvalid) {
				t.Fatalf("%s: Read(%q) error %v also matches ErrInvalid", r.name, in, err)
			}
			// Nothing consumed: the caller can still read (and answer) what
			// the client sent.
			rest, _ := io.ReadAll(br)
			if string(rest) != in {
				t.Fatalf("%s: after ErrNoHeader the reader holds %q, want all of %q", r.name, rest, in)
			}
		}
	}
}

func TestReadNoHeaderDoesNotWait(t *testing.T) {
	// A client that sends "G" and waits must get ErrNoHeader at once, not
	// after Read has waited for 12 bytes of signature. The reader fails the
	// test if Read asks for more than the first byte.
	r := io.MultiReader(strings.NewReader("G"), readerFunc(func([]byte) (int, error) {
		t.Fatal("Read read past the first byte to reject a stream starting with G")
		return 0, io.EOF
	}))
	if _, err := Read(bufio.NewReaderSize(iotest.OneByteReader(r), 16)); !errors.Is(err, ErrNoHeader) {
		t.Fatalf("Read error %v, want ErrNoHeader", err)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

func TestReadEmpty(t *testing.T) {
	// A TCP connect-and-close (a plain health check) is neither a missing nor
	// an invalid header: the stream simply ended.
	_, err := Read(bufio.NewReader(strings.NewReader("")))
	if !errors.Is(err, io.EOF) || errors.Is(err, ErrNoHeader) || errors.Is(err, ErrInvalid) {
		t.Fatalf("Read of an empty stream: %v, want io.EOF only", err)
	}
}

func TestReadTruncatedSignature(t *testing.T) {
	for _, in := range []string{"P", "PROX", "PROXY", "\r", "\r\n\r\n\x00\r\nQUI"} {
		_, err := Read(bufio.NewReader(strings.NewReader(in)))
		if !errors.Is(err, ErrInvalid) || !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("Read(%q): %v, want ErrInvalid and io.ErrUnexpectedEOF", in, err)
		}
	}
}

func TestReadError(t *testing.T) {
	// An error of the connection (here a reset) in the middle of a header is
	// passed on as it is, not called an invalid header.
	reset := errors.New("connection reset by peer")
	for _, in := range []string{"", "PRO", "PROXY TCP4 1.2", "\r\n\r\n\x00\r\nQUIT\n\x21"} {
		br := bufio.NewReader(io.MultiReader(strings.NewReader(in), iotest.ErrReader(reset)))
		_, err := Read(br)
		if !errors.Is(err, reset) || errors.Is(err, ErrInvalid) {
			t.Fatalf("Read(%q then a reset): %v, want the reset, not ErrInvalid", in, err)
		}
	}
}

func mustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
