// Package fdlimit lets a test run out of descriptors on purpose: the engines' EMFILE paths (a dup or an
// epoll_create that fails) are tested with it.
package fdlimit

import (
	"testing"

	"golang.org/x/sys/unix"
)

// WithDescriptorsLeft runs f with RLIMIT_NOFILE lowered so that only n more descriptors can be opened,
// and restores the limit after.
func WithDescriptorsLeft(t testing.TB, n int, f func()) {
	t.Helper()
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	// Descriptors take the lowest free numbers, so the limit goes just above the n-th free one.
	free, fd := 0, 0
	for ; free < n; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == unix.EBADF {
			free++
		}
	}
	lim := old
	lim.Cur = uint64(fd)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
			t.Fatal(err)
		}
	}()
	f()
}
