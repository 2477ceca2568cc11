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
	returned := make(chan struct{})
	go func() {
		waitGone(cmd.Process.Pid, slog.New(slog.DiscardHandler))
		close(returned)
	}()
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
	done := make(chan struct{})
	go func() {
		waitGone(cmd.Process.Pid, slog.New(slog.DiscardHandler))
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("waitGone waited for a process that had exited")
	}
}
