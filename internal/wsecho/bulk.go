package wsecho

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The bulk paths serve wsbench throughput, which must measure the relay, not the upstream: gorilla with
// 4 KiB buffers reads a 64 KiB message in many small reads and copies it twice, so it was slower than the
// relays in front of it. After the handshake they work on the socket itself, with large buffers.

// BulkPath is the path on which the server echoes every frame as it came (unmasked, as a server sends),
// reading and writing in large batches. It parses frame headers only: a close frame is echoed and ends the
// connection; pings are echoed as pings, not answered with pongs.
const BulkPath = "/bulk"

// bulkBufferSize is the size of the bulk paths' read buffer, and about that of the echo's writes.
const bulkBufferSize = 1 << 20

// maxBulkFrame is the largest frame the bulk echo accepts; wsbench sends at most 16 MiB.
const maxBulkFrame = 64 << 20

// discard reads r into a large buffer and drops what it read, until r fails (the client went away). It
// parses nothing: the sink costs one read system call per megabyte, whatever the frames.
func discard(r io.Reader) {
	buf := make([]byte, bulkBufferSize)
	for {
		if _, err := r.Read(buf); err != nil {
			return
		}
	}
}

// echoFrames reads client frames from rw and writes each back unmasked, batching every complete frame one
// read brought into one write. It returns nil after echoing a close frame or when rw's reader ends between
// frames, and an error for a frame it cannot echo or a failed write.
func echoFrames(rw io.ReadWriter) error {
	in := make([]byte, bulkBufferSize)
	out := make([]byte, 0, bulkBufferSize+bulkBufferSize/64)
	have := 0
	for {
		n, readErr := rw.Read(in[have:])
		have += n
		off, closed, err := echoComplete(in[:have], &out)
		if err != nil {
			return err
		}
		if len(out) > 0 {
			if _, err := rw.Write(out); err != nil {
				return fmt.Errorf("write echo: %w", err)
			}
			out = out[:0]
		}
		if closed {
			return nil
		}
		have = copy(in, in[off:have])
		if need := pendingFrameLen(in[:have]); need > len(in) {
			// A frame larger than the buffer: grow it to hold the frame whole.
			in = append(in[:have], make([]byte, need-have)...)
		}
		if readErr != nil {
			if errors.Is(readErr, io.EOF) && have == 0 {
				return nil
			}
			return fmt.Errorf("read frames: %w", readErr)
		}
	}
}

// echoComplete appends to out the echo of every complete frame at the start of b, unmasking their
// payloads in place, and returns how many bytes of b they took and whether the last was a close frame.
func echoComplete(b []byte, out *[]byte) (used int, closed bool, err error) {
	for {
		h, ok, err := parseFrameHeader(b[used:])
		if err != nil || !ok || used+h.headerLen+h.payloadLen > len(b) {
			return used, false, err
		}
		payload := b[used+h.headerLen : used+h.headerLen+h.payloadLen]
		if h.masked {
			for i := range payload {
				payload[i] ^= h.key[i&3]
			}
		}
		*out = appendServerFrame(*out, h.first, payload)
		used += h.headerLen + h.payloadLen
		if h.first&0x0f == 0x8 {
			return used, true, nil
		}
	}
}

// pendingFrameLen is the whole length of the frame b starts with, or 0 when b does not hold its header yet.
func pendingFrameLen(b []byte) int {
	h, ok, err := parseFrameHeader(b)
	if err != nil || !ok {
		return 0
	}
	return h.headerLen + h.payloadLen
}

// frameHeader is what a frame's header says.
type frameHeader struct {
	first      byte // FIN, RSV and opcode, echoed as they came
	masked     bool
	key        [4]byte
	headerLen  int
	payloadLen int
}

// parseFrameHeader reads the frame header at the start of b; ok is false when b does not hold all of it.
func parseFrameHeader(b []byte) (h frameHeader, ok bool, err error) {
	if len(b) < 2 {
		return h, false, nil
	}
	h.first, h.masked, h.headerLen = b[0], b[1]&0x80 != 0, 2
	n := uint64(b[1] & 0x7f)
	switch n {
	case 126:
		if len(b) < 4 {
			return h, false, nil
		}
		n, h.headerLen = uint64(binary.BigEndian.Uint16(b[2:])), 4
	case 127:
		if len(b) < 10 {
			return h, false, nil
		}
		n, h.headerLen = binary.BigEndian.Uint64(b[2:]), 10
	}
	if n > maxBulkFrame {
		return h, false, fmt.Errorf("frame of %d bytes; the bulk echo takes at most %d", n, maxBulkFrame)
	}
	h.payloadLen = int(n)
	if h.masked {
		if len(b) < h.headerLen+4 {
			return h, false, nil
		}
		copy(h.key[:], b[h.headerLen:])
		h.headerLen += 4
	}
	return h, true, nil
}

// appendServerFrame appends an unmasked frame whose first header byte is first, carrying payload.
func appendServerFrame(b []byte, first byte, payload []byte) []byte {
	b = append(b, first)
	switch n := len(payload); {
	case n > 0xffff:
		b = append(b, 127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	case n > 125:
		b = append(b, 126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, byte(n))
	}
	return append(b, payload...)
}
