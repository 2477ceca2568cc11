package sockmap

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
)

// epollWatches returns, for every epoll instance this process holds except skip, the events each watched
// file is registered for, by the file's inode (from /proc/self/fdinfo, whose "tfd:" lines name them).
func epollWatches(t testing.TB, skip int) map[uint64][]uint32 {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	watches := map[uint64][]uint32{}
	for _, e := range fds {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd == skip {
			continue
		}
		if link, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); link != "anon_inode:[eventpoll]" {
			continue
		}
		f, err := os.Open(filepath.Join("/proc/self/fdinfo", e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var tfd int
			var events uint32
			var data, ino string
			line := sc.Text()
			if !strings.HasPrefix(line, "tfd:") {
				continue
			}
			if _, err := fmt.Sscanf(line, "tfd: %d events: %x data: %s pos:0 ino:%s", &tfd, &events, &data, &ino); err != nil {
				t.Fatalf("fdinfo line %q: %v", line, err)
			}
			n, err := strconv.ParseUint(ino, 16, 64)
			if err != nil {
				t.Fatalf("fdinfo line %q: inode: %v", line, err)
			}
			watches[n] = append(watches[n], events)
		}
		f.Close()
	}
	return watches
}

// watchedElsewhere reports whether an epoll of the process other than k's watches a socket of inodes.
func watchedElsewhere(t testing.TB, k *Engine, inodes []uint64) bool {
	t.Helper()
	others := epollWatches(t, k.epfd)
	for _, ino := range inodes {
		if _, ok := others[ino]; ok {
			return true
		}
	}
	return false
}

// inodeOf returns the inode of the file fd refers to.
func inodeOf(t testing.TB, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatalf("fstat %d: %v", fd, err)
	}
	return st.Ino
}

// TestKernelSocketsLeaveGoPoller checks that a tunnel in the kernel is watched by no epoll of the process
// but the engine's, and there for hang-up and error only: every verdict run ends in data_ready, which
// would otherwise wake Go's poller for bytes it never reads (docs/datapath.md, "The kernel engine owns the
// sockets' descriptors"). The tunnel still carries bytes and its FIN, and once it ends no descriptor of
// its sockets is left open.
func TestKernelSocketsLeaveGoPoller(t *testing.T) {
	k, _ := newTestEngine(t)
	c, u, p := carryPair(t, k)
	d := kernelDirOf(t, k, true)
	k.mu.Lock()
	inodes := []uint64{inodeOf(t, d.src.fd), inodeOf(t, d.dst.fd)}
	k.mu.Unlock()

	// Bytes both ways, so that the verdict runs on both sockets.
	for i := range 10 {
		msg := []byte(fmt.Sprintf("message %d", i))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(u, back); err != nil {
			t.Fatalf("upstream read: %v", err)
		}
		if _, err := u.Write(back); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, back); err != nil || string(back) != string(msg) {
			t.Fatalf("client read %q, %v; want %q", back, err, msg)
		}
	}

	others := epollWatches(t, k.epfd)
	mine := epollWatches(t, -1)
	for i, ino := range inodes {
		if ev, ok := others[ino]; ok {
			t.Errorf("socket %d of the tunnel is watched by another epoll (Go's poller?) for events %#x", i, ev)
		}
		want := uint32(unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR | unix.EPOLLET)
		if ev := mine[ino]; len(ev) != 1 || ev[0] != want {
			t.Errorf("socket %d of the tunnel: the epolls of the process watch it for %#x, want only the engine's, for %#x (no EPOLLIN)", i, ev, want)
		}
	}

	// The FIN is carried each way, and the tunnel ends cleanly.
	c.CloseWrite()
	if rest, err := readAllWithin(u, 5*time.Second); err != nil || len(rest) != 0 {
		t.Fatalf("upstream read %q, %v after the client's FIN; want EOF", rest, err)
	}
	u.CloseWrite()
	if rest, err := readAllWithin(c, 5*time.Second); err != nil || len(rest) != 0 {
		t.Fatalf("client read %q, %v after the upstream's FIN; want EOF", rest, err)
	}
	waitEnded(t, p)
	assertMapsEmpty(t, k)
	if p.Reason() != datapath.ReasonClosed {
		t.Errorf("the tunnel ended %q (%v), want %q", p.Reason(), p.Err(), datapath.ReasonClosed)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		open := openSocketInodes(t)
		if !open[inodes[0]] && !open[inodes[1]] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a descriptor of the ended tunnel's sockets is still open")
		}
	}
}

// openSocketInodes returns the inodes of every socket this process has a descriptor of.
func openSocketInodes(t testing.TB) map[uint64]bool {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	open := map[uint64]bool{}
	for _, e := range fds {
		link, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		var ino uint64
		if _, err := fmt.Sscanf(link, "socket:[%d]", &ino); err == nil {
			open[ino] = true
		}
	}
	return open
}

// TestKernelStaleEventNamesNoOtherTunnel hands the kernel loop an error event as epoll reports it for a
// descriptor number that a live tunnel's socket now has: what an event read just before another tunnel's
// release closed that number looks like. Events name sockets by cookie, never reused, so the live tunnel
// must not be reset by it (seen in wsbench runs before: a fresh tunnel ended as upstream_error, errno 0).
func TestKernelStaleEventNamesNoOtherTunnel(t *testing.T) {
	k, _ := newTestEngine(t)
	c, u, p := carryPair(t, k)
	d := kernelDirOf(t, k, true)
	k.mu.Lock()
	fd := d.src.fd
	k.mu.Unlock()
	k.handle(unix.EpollEvent{Events: unix.EPOLLERR, Fd: int32(fd)})

	msg := []byte("still here")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, len(msg))
	_ = u.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(u, back); err != nil || string(back) != string(msg) {
		t.Fatalf("upstream read %q, %v after a stale event; want %q", back, err, msg)
	}
	if p.Ending() {
		t.Fatalf("the tunnel ended on a stale event: %q (%v)", p.Reason(), p.Err())
	}
}

// readAllWithin reads c until EOF, failing after d.
func readAllWithin(c *net.TCPConn, d time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	return io.ReadAll(c)
}
