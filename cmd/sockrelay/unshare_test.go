package main

import (
	"log/slog"
	"os/exec"
	"testing"
	"time"
)

// TestWaitGone: waitGone returns once the process has exited, and not before; at once for a process
// that is gone already.
func TestWaitGone(t *testing.T) {
	cmd := exec.Command("sleep", "0.3")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	returned := goWaitGone(cmd.Process.Pid)
	select {
	case <-returned:
		select {
		case <-exited:
		case <-time.After(time.Second):
			t.Fatal("waitGone returned while the process ran")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("waitGone did not return within 10s of the start of a process that runs 0.3s")
	}
	done := goWaitGone(cmd.Process.Pid)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("waitGone waited for a process that had exited")
	}
}

// goWaitGone runs waitGone(pid) on a goroutine and returns a channel closed once it has returned.
func goWaitGone(pid int) <-chan struct{} {
	returned := make(chan struct{})
	go func() {
		waitGone(pid, slog.New(slog.DiscardHandler))
		close(returned)
	}()
	return returned
}
