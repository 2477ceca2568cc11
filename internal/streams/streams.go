// Package streams makes the seeded byte streams that the kernel engine's self-test and the tests send
// through tunnels, and says where a stream received differs from the one sent.
package streams

import (
	"bytes"
	"fmt"
	"math/rand/v2"
)

// Stream returns n pseudo-random bytes, the same for the same seed.
func Stream(seed uint64, n int) []byte {
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	b := make([]byte, n)
	r := rand.NewChaCha8(key)
	_, _ = r.Read(b)
	return b
}

// Diff reports where got and want first differ, for failure messages.
func Diff(got, want []byte) string {
	if bytes.Equal(got, want) {
		return ""
	}
	n := min(len(got), len(want))
	for i := 0; i < n; i++ {
		if got[i] != want[i] {
			return fmt.Sprintf("got %d bytes, want %d; first difference at byte %d", len(got), len(want), i)
		}
	}
	return fmt.Sprintf("got %d bytes, want %d; equal over the first %d", len(got), len(want), n)
}
