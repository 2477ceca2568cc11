package sockmap

import (
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// sendStream writes data to c and half-closes it, sending the outcome to done.
func sendStream(c *net.TCPConn, data []byte, done chan<- error) {
	if _, err := c.Write(data); err != nil {
		done <- fmt.Errorf("write: %w", err)
		return
	}
	done <- c.CloseWrite()
}

// readStream reads len(want) bytes from c within d and reports how they differ from want, "" when equal.
func readStream(c *net.TCPConn, want []byte, d time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	got := make([]byte, len(want))
	n, err := io.ReadFull(c, got)
	if err != nil {
		return "", fmt.Errorf("read %d of %d bytes, then: %w", n, len(want), err)
	}
	return diffStreams(got, want), nil
}

// TestBackpressureRelaysPassedInLargeReads checks that a demoted direction is carried in reads larger than
// the copy engine's 32 KiB: a continuous bulk stream, once demoted, may be carried in userspace for the
// rest of its life, and with 32 KiB reads (each also paying a counter lookup, a hand-on check and a control
// update) it moved about half of what the copy engine does (docs/datapath.md, "Bulk and demotion").
func TestBackpressureRelaysPassedInLargeReads(t *testing.T) {
	k, _ := newTestEngine(t)
	c, u, _ := carryPair(t, k)
	d := kernelDirOf(t, k, false)
	const size = 32 << 20
	data := stream(40, size)
	go func() { _, _ = u.Write(data) }()
	time.Sleep(300 * time.Millisecond) // the client does not read: the direction is demoted
	if diff, err := readStream(c, data, time.Minute); err != nil || diff != "" {
		t.Fatalf("stream to the client: %v %s", err, diff)
	}
	if n := k.Stats().Demotions; n < 1 {
		t.Fatalf("demotions = %v after the client paused, want at least 1", n)
	}
	// Passed bytes piled up while the client did not read, so a read could take far more than 32 KiB.
	if m := d.maxPassedRead.Load(); m <= 32<<10 {
		t.Errorf("largest read of passed bytes %d, want more than 32 KiB", m)
	}
}

// TestBackpressureResumes checks that a demoted direction goes back into the kernel: once the client has
// caught up, the next bytes are redirected again, and no goroutine is left relaying the tunnel.
func TestBackpressureResumes(t *testing.T) {
	k, _ := newTestEngine(t)
	c, u, _ := carryPair(t, k)
	d := kernelDirOf(t, k, false) // in the kernel before the stream starts (see TestBackpressureLostEvents)
	const size = 32 << 20
	data := stream(30, size)
	go func() { _, _ = u.Write(data) }()
	time.Sleep(300 * time.Millisecond) // the client does not read: the direction is demoted
	if diff, err := readStream(c, data, time.Minute); err != nil || diff != "" {
		t.Fatalf("stream to the client: %v %s", err, diff)
	}
	if n := k.Stats().Demotions; n < 1 {
		t.Fatalf("demotions = %v after the client paused, want at least 1", n)
	}

	// Small messages now, each read before the next: the first one finds the client caught up and resumes.
	msg, back := make([]byte, 1024), make([]byte, 1024)
	exchange := func(i int) {
		msg[0] = byte(i)
		if _, err := u.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, back); err != nil || back[0] != byte(i) {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; ; i++ {
		exchange(i)
		k.mu.Lock()
		relaying := d.relaying
		k.mu.Unlock()
		st, err := k.maps.Stats(d.src.cookie)
		if err != nil {
			t.Fatal(err)
		}
		if !relaying && !st.Demoted {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d messages the direction is still demoted=%v, relayed by a goroutine=%v", i+1, st.Demoted, relaying)
		}
		time.Sleep(10 * time.Millisecond)
	}
	before, _ := k.maps.Stats(d.src.cookie)
	for i := range 10 {
		exchange(100 + i)
	}
	after, _ := k.maps.Stats(d.src.cookie)
	if after.Passed != before.Passed || after.Bytes-before.Bytes != 10*1024 {
		t.Errorf("after resuming, 10 KiB went %d bytes redirected, %d passed; want all redirected",
			after.Bytes-before.Bytes, after.Passed-before.Passed)
	}
	if n := k.Stats().Resumes; n < 1 {
		t.Errorf("resumes = %v, want at least 1", n)
	}
	// The relaying goroutine's conns were closed when it stopped: the sockets are out of Go's poller again
	// (docs/datapath.md, "The kernel engine owns the sockets' descriptors").
	k.mu.Lock()
	inodes := []uint64{inodeOf(t, d.src.fd), inodeOf(t, d.dst.fd)}
	k.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); watchedElsewhere(t, k, inodes); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("after resuming, an epoll other than the kernel engine's still watches the tunnel's sockets")
		}
	}
}

// TestBackpressureLostEvents drops every mode event, as a full ring buffer would: a demoted direction then
// has no goroutine relaying it, and its sender waits. Once the loop learns that events were lost it must
// find the direction itself, and the stream must then complete byte-exact.
func TestBackpressureLostEvents(t *testing.T) {
	k, logs := newTestEngine(t)
	k.dropModeEvents()
	c, u, p := carryPair(t, k)
	// Into the kernel before the stream starts: a source already pouring bytes at the handoff is left on
	// copy (busy_at_handoff), and this test is about the kernel's demotion.
	d := kernelDirOf(t, k, false)
	const size = 64 << 20
	data := stream(40, size)
	wrote := make(chan error, 1)
	go sendStream(u, data, wrote)
	waitDemoted(t, k, d)
	// The demotion's event was dropped, not acted on: only the loop's check for lost events can find the
	// direction now (every second, from the count of events lost; every drop counts, and a resume
	// followed by another demotion is found the same way).
	for deadline := time.Now().Add(5 * time.Second); k.droppedModeEvents() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no mode event was dropped within 5s of the demotion")
		}
	}
	if diff, err := readStream(c, data, time.Minute); err != nil || diff != "" {
		t.Fatalf("stream to the client: %v %s", err, diff)
	}
	if werr := <-wrote; werr != nil {
		t.Fatalf("upstream write: %v", werr)
	}
	if !strings.Contains(logs.String(), "mode events were lost") {
		t.Errorf("the log does not say events were lost:\n%s", logs)
	}
	c.CloseWrite()
	waitEnded(t, p)
	assertMapsEmpty(t, k)
}

// TestOverflowWatch checks the rule behind the overflow reset: only a stall past the bound that lasts
// overflowQuiet with nothing moving counts; progress or a check under the bound starts the wait again.
func TestOverflowWatch(t *testing.T) {
	type check struct {
		after   time.Duration // since the first check
		stalled bool
		mark    uint64
		want    bool
	}
	q := overflowQuiet
	cases := []struct {
		name   string
		checks []check
	}{
		{"stalled-without-progress", []check{{0, true, 5, false}, {q / 2, true, 5, false}, {q, true, 5, true}}},
		{"progress-restarts-the-wait", []check{{0, true, 5, false}, {q / 2, true, 6, false}, {q, true, 6, false}, {q + q/2, true, 6, true}}},
		{"under-the-bound-restarts-the-wait", []check{{0, true, 5, false}, {q / 2, false, 5, false}, {q, true, 5, false}, {2 * q, true, 5, true}}},
		{"never-stalled", []check{{0, false, 5, false}, {2 * q, false, 5, false}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var w overflowWatch
			start := time.Now()
			for i, c := range tc.checks {
				if got := w.stuck(c.stalled, c.mark, start.Add(c.after)); got != c.want {
					t.Fatalf("check %d (after %v, stalled %v, mark %d): stuck %v, want %v", i, c.after, c.stalled, c.mark, got, c.want)
				}
			}
		})
	}
}
