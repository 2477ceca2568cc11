package main

import (
	"errors"
	"log/slog"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/relay"
)

// goneCheck is how often waitGone looks whether a process has exited where it cannot wait on a pidfd.
const goneCheck = 500 * time.Millisecond

// unshareWhenGone tells srv's kernel engine that the old process (pid) reads no more mode events once it
// has exited: it did not say it stopped reading them (handover.Done.EventsStopped), and until it exits it
// may read events for this process's tunnels, which only the engine's sweeps then find.
func unshareWhenGone(srv *relay.Server, pid int, log *slog.Logger) {
	if !srv.KernelAdopted() {
		return
	}
	waitGone(pid, log)
	srv.UnshareKernel()
}

// waitGone returns once the process pid has exited: it waits on a pidfd, or, where none can be opened,
// looks every goneCheck.
func waitGone(pid int, log *slog.Logger) {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return
	}
	if err == nil {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, -1)
			if err == nil && n > 0 {
				return
			}
			if err != nil && err != unix.EINTR {
				log.Warn("upgrade: cannot wait on the old process's pidfd; looking whether it exited instead", "pid", pid, "err", err)
				break
			}
		}
	}
	for unix.Kill(pid, 0) != unix.ESRCH {
		time.Sleep(goneCheck)
	}
}
