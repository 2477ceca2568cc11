package streamtest

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// FillUntilBlocked writes to c until a write makes no progress for 50 ms: the peer at the far end of the
// tunnel does not read, so the write to it of whatever carries the tunnel (relay or engine) is blocked then.
func FillUntilBlocked(t testing.TB, c *net.TCPConn) {
	t.Helper()
	chunk := make([]byte, 16<<10)
	for sent := 0; sent < 256<<20; {
		_ = c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		n, err := c.Write(chunk)
		sent += n
		if errors.Is(err, os.ErrDeadlineExceeded) {
			_ = c.SetWriteDeadline(time.Time{})
			return
		}
		if err != nil {
			t.Fatalf("write before the reset: %v", err)
		}
	}
	t.Fatal("256 MiB written and no write blocked: what carries the tunnel reads without bound")
}
