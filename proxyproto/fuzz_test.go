package proxyproto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"testing"
	"testing/iotest"
)

// readCounting reads a header from data and says how many bytes Read took
// from the stream (those it left buffered do not count).
func readCounting(data []byte, bytewise bool) (h *Header, consumed int, err error) {
	src := bytes.NewReader(data)
	var br *bufio.Reader
	if bytewise {
		br = bufio.NewReaderSize(iotest.OneByteReader(src), 16)
	} else {
		br = bufio.NewReader(src)
	}
	h, err = Read(br)
	return h, len(data) - src.Len() - br.Buffered(), err
}

// headerLength is the length of the header data starts with, found from the
// framing alone: up to the first LF for v1, 16 plus the length field for v2.
func headerLength(data []byte) int {
	if data[0] == 'P' {
		return bytes.IndexByte(data, '\n') + 1
	}
	return 16 + int(binary.BigEndian.Uint16(data[14:16]))
}

func FuzzRead(f *testing.F) {
	for _, tc := range append(append([]readCase{}, v1Cases...), v2Cases...) {
		f.Add([]byte(tc.in))
		f.Add([]byte(tc.in + trailer))
	}
	f.Add([]byte(""))
	f.Add([]byte(trailer))
	f.Add(AppendV2(nil, want6.Source, want4.Destination, TLV{TLVCRC32C, make([]byte, 4)}))

	f.Fuzz(func(t *testing.T, data []byte) {
		h, consumed, err := readCounting(data, false)

		// The same answer however the bytes arrive.
		h2, _, err2 := readCounting(data, true)
		if (err == nil) != (err2 == nil) || !reflect.DeepEqual(h, h2) ||
			errors.Is(err, ErrNoHeader) != errors.Is(err2, ErrNoHeader) || errors.Is(err, ErrInvalid) != errors.Is(err2, ErrInvalid) {
			t.Fatalf("whole: %+v, %v\nbytewise: %+v, %v", h, err, h2, err2)
		}

		if err != nil {
			switch {
			case errors.Is(err, ErrNoHeader):
				if consumed != 0 {
					t.Fatalf("ErrNoHeader after consuming %d bytes", consumed)
				}
			case errors.Is(err, ErrInvalid):
			case errors.Is(err, io.EOF) && len(data) == 0:
			default:
				// bytes.Reader fails only with io.EOF: everything else must
				// be one of the documented kinds.
				t.Fatalf("error of no documented kind: %v", err)
			}
			if h != nil {
				t.Fatalf("a header %+v with the error %v", h, err)
			}
			return
		}

		if want := headerLength(data); consumed != want {
			t.Fatalf("Read consumed %d bytes of %q, the header is %d", consumed, data, want)
		}

		// Format writes a header that reads back the same.
		b, err := h.Format()
		if err != nil {
			t.Fatalf("Format(%+v) of a header Read returned: %v", h, err)
		}
		h3, consumed3, err := readCounting(append(b, "tail"...), false)
		if err != nil {
			t.Fatalf("Read(Format(%+v)) of %q: %v", h, b, err)
		}
		if !reflect.DeepEqual(h, h3) {
			t.Fatalf("Read(Format()) =\n%+v\nwant\n%+v", h3, h)
		}
		if consumed3 != len(b) {
			t.Fatalf("Read(Format()) consumed %d bytes, the header is %d", consumed3, len(b))
		}
	})
}
