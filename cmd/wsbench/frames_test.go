package main

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
)

func TestFrameHeaderLen(t *testing.T) {
	for _, tc := range []struct {
		n      int
		masked bool
		want   int
	}{
		{0, false, 2}, {125, false, 2}, {126, false, 4}, {65535, false, 4}, {65536, false, 10},
		{1, true, 6}, {1024, true, 8}, {65536, true, 14},
	} {
		if got := frameHeaderLen(tc.n, tc.masked); got != tc.want {
			t.Errorf("frameHeaderLen(%d, masked %v) = %d, want %d", tc.n, tc.masked, got, tc.want)
		}
	}
}

// TestMaskBytes: masking in pieces, each starting where the last ended, is masking at once, and masking
// twice gives back the payload.
func TestMaskBytes(t *testing.T) {
	key := [4]byte{1, 2, 3, 4}
	payload := []byte("the quick brown fox jumps over the lazy dog")
	whole := bytes.Clone(payload)
	maskBytes(key, 0, whole)
	if bytes.Equal(whole, payload) {
		t.Fatal("masking changed nothing")
	}
	for _, cut := range []int{1, 3, 4, 5, 17} {
		pieces := bytes.Clone(payload)
		pos := maskBytes(key, 0, pieces[:cut])
		if pos != cut {
			t.Errorf("maskBytes returned %d after %d bytes", pos, cut)
		}
		maskBytes(key, pos, pieces[cut:])
		if !bytes.Equal(pieces, whole) {
			t.Errorf("masked in two pieces cut at %d: %x, want %x", cut, pieces, whole)
		}
	}
	maskBytes(key, 0, whole)
	if !bytes.Equal(whole, payload) {
		t.Errorf("masked twice: %q, want %q", whole, payload)
	}
}

// TestFrameBatchIsReadByGorilla: a batch is count whole, masked, final binary frames that a WebSocket
// server (gorilla's, not ours) reads as count messages of size bytes each, numbered in their first byte.
func TestFrameBatchIsReadByGorilla(t *testing.T) {
	for _, tc := range []struct{ size, count int }{{1, 3}, {125, 2}, {126, 2}, {1024, 5}, {65535, 2}, {65536, 3}} {
		batch := frameBatch(tc.size, tc.count)
		if want := tc.count * (tc.size + frameHeaderLen(tc.size, true)); len(batch) != want {
			t.Errorf("size %d: batch of %d bytes, want %d", tc.size, len(batch), want)
		}
		got := make(chan []int, 1)
		srv := httptest.NewServer(messageCounter(tc.count, got))
		c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.NetConn().Write(batch); err != nil {
			t.Fatal(err)
		}
		sizes := <-got
		c.Close()
		srv.Close()
		if len(sizes) != tc.count {
			t.Fatalf("size %d: server read %d messages, want %d", tc.size, len(sizes), tc.count)
		}
		for i, n := range sizes {
			if n != tc.size {
				t.Errorf("size %d: message %d has %d bytes", tc.size, i, n)
			}
		}
	}
}

// messageCounter is a gorilla server that reads count messages and sends their sizes to got (-1 for a
// message that is not binary or not numbered in order).
func messageCounter(count int, got chan<- []int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		var sizes []int
		for i := range count {
			kind, rd, err := c.NextReader()
			if err != nil {
				break
			}
			b, err := io.ReadAll(rd)
			if err != nil {
				break
			}
			if kind != websocket.BinaryMessage || b[0] != byte(i) {
				sizes = append(sizes, -1)
				continue
			}
			sizes = append(sizes, len(b))
		}
		got <- sizes
	})
}

func TestFramesPerBatch(t *testing.T) {
	for _, tc := range []struct{ size, want int }{
		{65536, batchBytes / (65536 + 14)}, {1024, batchBytes / (1024 + 8)}, {1 << 20, 1}, {16 << 20, 1},
	} {
		if got := framesPerBatch(tc.size); got != tc.want {
			t.Errorf("framesPerBatch(%d) = %d, want %d", tc.size, got, tc.want)
		}
	}
}

func TestPayloadShare(t *testing.T) {
	for _, tc := range []struct {
		wire int64
		size int
		want int64
	}{
		{2 * (65536 + 10), 65536, 2 * 65536}, {10 * (1024 + 4), 1024, 10 * 1024}, {3 * (100 + 2), 100, 300}, {0, 1024, 0},
	} {
		if got := payloadShare(tc.wire, tc.size); got != tc.want {
			t.Errorf("payloadShare(%d, %d) = %d, want %d", tc.wire, tc.size, got, tc.want)
		}
	}
}
