package wsecho

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/gorilla/websocket"
)

// clientFrame is a masked client frame with the given first header byte and payload.
func clientFrame(first byte, payload []byte, key [4]byte) []byte {
	b := []byte{first}
	switch n := len(payload); {
	case n > 0xffff:
		b = append(b, 0x80|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	case n > 125:
		b = append(b, 0x80|126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, 0x80|byte(n))
	}
	b = append(b, key[:]...)
	for i, c := range payload {
		b = append(b, c^key[i&3])
	}
	return b
}

// pipeRW is the client's side as echoFrames sees it: what it reads, and what it wrote.
type pipeRW struct {
	io.Reader
	out bytes.Buffer
}

func (p *pipeRW) Write(b []byte) (int, error) { return p.out.Write(b) }

func payloadOf(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// TestEchoFrames: every frame comes back unmasked with its header byte as it came, however the reads cut
// the stream, for every length encoding and for a frame larger than the buffer; a close frame is echoed
// and ends the echo.
func TestEchoFrames(t *testing.T) {
	big := payloadOf(bulkBufferSize+12345, 9)
	for _, tc := range []struct {
		name     string
		frames   [][]byte // payloads of binary frames, in order
		closeEnd bool
		reader   func(io.Reader) io.Reader
	}{
		{"small frames, one read", [][]byte{payloadOf(0, 1), payloadOf(1, 2), payloadOf(125, 3)}, false, nil},
		{"16-bit and 64-bit lengths", [][]byte{payloadOf(126, 4), payloadOf(65535, 5), payloadOf(65536, 6)}, false, nil},
		{"cut into one-byte reads", [][]byte{payloadOf(130, 7), payloadOf(3, 8)}, false, iotest.OneByteReader},
		{"cut into half reads", [][]byte{payloadOf(70000, 1), payloadOf(1024, 2), payloadOf(1024, 3)}, false, iotest.HalfReader},
		{"larger than the buffer", [][]byte{payloadOf(10, 1), big, payloadOf(10, 2)}, false, iotest.HalfReader},
		{"close ends it", [][]byte{payloadOf(5, 1)}, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var in, want []byte
			for i, p := range tc.frames {
				in = append(in, clientFrame(0x82, p, [4]byte{byte(i), 0x11, 0x22, 0x33})...)
				want = appendServerFrame(want, 0x82, p)
			}
			if tc.closeEnd {
				closing := []byte{0x03, 0xe8} // 1000
				in = append(in, clientFrame(0x88, closing, [4]byte{7, 7, 7, 7})...)
				want = appendServerFrame(want, 0x88, closing)
				// After the close, nothing more is read or echoed.
				in = append(in, clientFrame(0x82, payloadOf(3, 3), [4]byte{})...)
			}
			var r io.Reader = bytes.NewReader(in)
			if tc.reader != nil {
				r = tc.reader(r)
			}
			rw := &pipeRW{Reader: r}
			if err := echoFrames(rw); err != nil {
				t.Fatalf("echoFrames: %v", err)
			}
			if !bytes.Equal(rw.out.Bytes(), want) {
				t.Errorf("echoed %d bytes, want %d (the frames unmasked)", rw.out.Len(), len(want))
			}
		})
	}
}

func TestEchoFramesRefuses(t *testing.T) {
	huge := []byte{0x82, 0x80 | 127, 0, 0, 0, 0x7f, 0, 0, 0, 0, 1, 2, 3, 4}
	for _, tc := range []struct {
		name, want string
		in         []byte
	}{
		{"frame over the limit", "the bulk echo takes at most", huge},
		{"stream ends inside a frame", "read frames: EOF", clientFrame(0x82, payloadOf(100, 1), [4]byte{})[:50]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := echoFrames(&pipeRW{Reader: bytes.NewReader(tc.in)})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("echoFrames error %v; want one containing %q", err, tc.want)
			}
		})
	}
}

// bulkServer is Handler on loopback; it returns the ws:// URL of its root.
func bulkServer(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(Handler(slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http")
}

// TestBulkPathEchoesThroughGorilla: a WebSocket client reads back every message it sent on BulkPath, whole.
func TestBulkPathEchoesThroughGorilla(t *testing.T) {
	c, _, err := websocket.DefaultDialer.Dial(bulkServer(t)+BulkPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for i, n := range []int{1, 200, 70000, 1 << 21} {
		msg := payloadOf(n, byte(i))
		if err := c.WriteMessage(websocket.BinaryMessage, msg); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		kind, got, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("message of %d bytes: %v", n, err)
		}
		if kind != websocket.BinaryMessage || !bytes.Equal(got, msg) {
			t.Errorf("message of %d bytes: echo of kind %d, %d bytes, differs", n, kind, len(got))
		}
	}
}

// TestSinkDiscards: the sink reads whatever comes, frames or not, far more than the sockets could buffer,
// and answers nothing.
func TestSinkDiscards(t *testing.T) {
	c, _, err := websocket.DefaultDialer.Dial(bulkServer(t)+SinkPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	conn := c.NetConn()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_ = conn.SetWriteDeadline(time.Now().Add(20 * time.Second))
	chunk := bytes.Repeat([]byte{0xff}, 1<<20) // not even a frame: the sink does not parse
	for range 256 {
		if _, err := conn.Write(chunk); err != nil || ctx.Err() != nil {
			t.Fatalf("writing 256 MiB into the sink: %v (the sink stopped reading)", err)
		}
	}
	_ = conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, err := conn.Read(make([]byte, 16)); n > 0 || err == nil {
		t.Errorf("the sink answered %d bytes, err %v", n, err)
	}
}
