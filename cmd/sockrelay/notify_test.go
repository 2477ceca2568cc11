package main

import (
	"context"
	"fmt"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSystemdNotify: under a Type=notify unit (NOTIFY_SOCKET set, as a file path or an abstract "@name"),
// `sockrelay run` sends READY=1 only once its listener accepts connections, and STOPPING=1 when it is
// told to stop, before run returns (a quick drain must not end the process before it is sent).
func TestSystemdNotify(t *testing.T) {
	for _, tc := range []struct{ name, socket string }{
		{"path", filepath.Join(t.TempDir(), "notify")},
		{"abstract", fmt.Sprintf("@sockrelay-notify-test-%d", os.Getpid())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: tc.socket, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { notify.Close() })
			t.Setenv("NOTIFY_SOCKET", tc.socket)

			listen := freeAddr(t)
			ctx, stop := context.WithCancel(context.Background())
			logs, done := &syncbuf.Buffer{}, make(chan int, 1)
			go func() {
				done <- runCommand(ctx, []string{"--listen", listen, "--upstream", "127.0.0.1:1", "--datapath", "copy"}, logs, nil)
			}()
			t.Cleanup(stop)

			if msg := readNotify(t, notify, logs); msg != "READY=1" {
				t.Fatalf("first notification %q, want READY=1", msg)
			}
			// READY=1 has arrived, so the listener must accept now, not some time later.
			c, err := net.DialTimeout("tcp", listen, time.Second)
			if err != nil {
				t.Fatalf("READY=1 sent, but the listener does not accept: %v", err)
			}
			c.Close()

			stop()
			select {
			case code := <-done:
				if code != 0 {
					t.Errorf("exit code %d, want 0:\n%s", code, logs)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("sockrelay still running 10s after it was stopped:\n%s", logs)
			}
			// Sent before run returned (so before the process exits), hence waiting in the socket now.
			if msg := readNotifyWithin(t, notify, logs, time.Millisecond); msg != "STOPPING=1" {
				t.Errorf("notification after SIGTERM %q, want STOPPING=1", msg)
			}
		})
	}
}

// readNotify returns the next datagram sent to the notify socket, failing after 10 s.
func readNotify(t *testing.T, notify *net.UnixConn, logs *syncbuf.Buffer) string {
	t.Helper()
	return readNotifyWithin(t, notify, logs, 10*time.Second)
}

func readNotifyWithin(t *testing.T, notify *net.UnixConn, logs *syncbuf.Buffer, d time.Duration) string {
	t.Helper()
	buf := make([]byte, 4096)
	notify.SetReadDeadline(time.Now().Add(d))
	n, err := notify.Read(buf)
	if err != nil {
		t.Fatalf("no notification on NOTIFY_SOCKET: %v\nlogs:\n%s", err, logs)
	}
	return string(buf[:n])
}

// TestSystemdNotifyReload: on SIGHUP (what the unit's ExecReload sends) the relay says RELOADING=1 with
// the MONOTONIC_USEC of the moment, then READY=1 with a STATUS= that says whether the file was taken,
// for a refused reload too (the relay serves on with the configuration in force), as sd_notify(3) asks.
func TestSystemdNotifyReload(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: socket, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { notify.Close() })
	t.Setenv("NOTIFY_SOCKET", socket)

	good := minimalConfig(freeAddr(t), newEchoUpstream(t))
	r := startConfigRelay(t, good, "--datapath", "copy")
	if msg := readNotify(t, notify, r.logs); msg != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", msg)
	}
	for _, tc := range []struct {
		name, text string
		taken      bool
		status     string
	}{
		{"taken", good, true, "STATUS=configuration reloaded"},
		{"refused", good + "    wieght: 2\n", false,
			"STATUS=configuration reload refused, the configuration in force is unchanged: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := monotonicUsec()
			if taken := r.reloadVia(t, "sighup", tc.text); taken != tc.taken {
				t.Fatalf("reload taken: %v, want %v", taken, tc.taken)
			}
			after := monotonicUsec()
			msg := readNotify(t, notify, r.logs)
			var usec int64
			if _, err := fmt.Sscanf(msg, "RELOADING=1\nMONOTONIC_USEC=%d", &usec); err != nil || usec < before || usec > after {
				t.Errorf("notification %q, want RELOADING=1 and a MONOTONIC_USEC between %d and %d", msg, before, after)
			}
			msg = readNotify(t, notify, r.logs)
			ready, status, _ := strings.Cut(msg, "\n")
			if ready != "READY=1" || !strings.HasPrefix(status, tc.status) || strings.Contains(status, "\n") {
				t.Errorf("notification after the reload %q, want READY=1 and one line starting %q", msg, tc.status)
			}
		})
	}
}
