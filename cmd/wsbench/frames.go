package main

import "encoding/binary"

// The bulk workloads write WebSocket frames themselves instead of through gorilla: gorilla builds each frame
// in its write buffer (1 KiB in tunnelDialer, so a 64 KiB message left as 64 frames, each its own segment) and
// masks it on every send, which made the load generator, not the relay, the bottleneck. Frames here are built
// and masked once, before the run, and written many at a time.

// opBinary is the opcode of a binary frame; finBit marks the last frame of a message.
const (
	opBinary = 0x2
	finBit   = 0x80
	maskBit  = 0x80
)

// batchBytes is about how much one write of a bulk stream carries: large writes, so the load generator
// spends its time in the kernel moving bytes, not in system calls.
const batchBytes = 256 << 10

// frameHeaderLen is the length of the header of a frame carrying n bytes, with a masking key when masked
// (every client frame is masked; a server's never is).
func frameHeaderLen(n int, masked bool) int {
	h := 2
	switch {
	case n > 0xffff:
		h += 8
	case n > 125:
		h += 2
	}
	if masked {
		h += 4
	}
	return h
}

// appendFrame appends a final binary frame carrying payload, masked with key when key is not nil. payload
// itself is left as it was.
func appendFrame(b []byte, payload []byte, key *[4]byte) []byte {
	n := len(payload)
	var mask byte
	if key != nil {
		mask = maskBit
	}
	b = append(b, finBit|opBinary)
	switch {
	case n > 0xffff:
		b = append(b, mask|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	case n > 125:
		b = append(b, mask|126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, mask|byte(n))
	}
	if key == nil {
		return append(b, payload...)
	}
	b = append(b, key[:]...)
	start := len(b)
	b = append(b, payload...)
	maskBytes(*key, 0, b[start:])
	return b
}

// maskBytes XORs b with key as RFC 6455 section 5.3 says, b starting pos bytes into the payload; it returns
// the position after b, for the next piece of the same payload. Masking twice unmasks.
func maskBytes(key [4]byte, pos int, b []byte) int {
	for i := range b {
		b[i] ^= key[(pos+i)&3]
	}
	return pos + len(b)
}

// frameBatch returns count masked binary frames of size payload bytes each, back to back, ready to be
// written as they are. Each frame has its own masking key, as a client's would, and its payload says which
// frame it is (its first bytes), so an echo can be told from another frame.
func frameBatch(size, count int) []byte {
	b := make([]byte, 0, count*(size+frameHeaderLen(size, true)))
	payload := make([]byte, size)
	for i := range count {
		payload[len(payload)-1] = byte(i >> 8)
		payload[0] = byte(i) // last, so that a 1-byte payload says its number
		key := [4]byte{byte(i), 0x5a, byte(i >> 8), 0xa5}
		b = appendFrame(b, payload, &key)
	}
	return b
}

// framesPerBatch is how many frames of size bytes one write carries: enough to fill about batchBytes, at
// least one.
func framesPerBatch(size int) int {
	return max(1, batchBytes/(size+frameHeaderLen(size, true)))
}

// payloadShare converts bytes of server frames of size payload bytes each (unmasked, as an echo sends
// them) to the payload they carry.
func payloadShare(wire int64, size int) int64 {
	return wire * int64(size) / int64(size+frameHeaderLen(size, false))
}
