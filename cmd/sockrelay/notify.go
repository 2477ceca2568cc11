package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// notifySystemd wraps ready so that, under a systemd unit of Type=notify, the relay tells systemd itself
// that it serves ("READY=1", once every listener is bound and accepting) and, when ctx ends, that it is
// stopping to drain ("STOPPING=1"); reloaded runs a reload between "RELOADING=1" and "READY=1" with a
// STATUS= that says how it went (sd_notify(3)), so that systemd shows the unit reloading meanwhile and
// `systemctl status` the outcome. It speaks the notify protocol directly (one datagram to the unixgram
// socket $NOTIFY_SOCKET names) rather than through libsystemd, which would need cgo. Without
// $NOTIFY_SOCKET it returns ready unchanged and reloaded only runs the reload. The relay calls sent before
// it exits, so that STOPPING=1 is not lost to a drain quicker than the goroutine that sends it. A relay
// that handed over to a new process (handedOff) is no longer the unit's main process: stopped while it
// drains, it says nothing, since STOPPING=1 would stop the unit, the new process with it.
func notifySystemd(ctx context.Context, ready readyFunc, handedOff func() bool, log *slog.Logger) (_ readyFunc, reloaded reloadNotifier, sent func()) {
	socket := os.Getenv("NOTIFY_SOCKET")
	if socket == "" {
		return ready, func(reload func() error) { _ = reload() }, func() {}
	}
	reloaded = func(reload func() error) {
		// MONOTONIC_USEC, in the same message, tells systemd which reload this is (required by
		// Type=notify-reload, harmless before it).
		if err := sdNotify(socket, fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", monotonicUsec())); err != nil {
			log.Warn("systemd reloading state not sent", "err", err)
		}
		status := "STATUS=configuration reloaded"
		if err := reload(); err != nil {
			// One line: STATUS is shown as it is, and the refusal lists every problem on its own line.
			status = "STATUS=configuration reload refused, the configuration in force is unchanged: " +
				strings.Join(strings.Fields(err.Error()), " ")
		}
		if err := sdNotify(socket, "READY=1\n"+status); err != nil {
			log.Warn("systemd readiness after the reload not sent", "err", err)
		}
	}
	// ready and sent are called by the goroutine that runs the relay, one after the other.
	started, stopping := false, make(chan struct{}) // stopping is closed once STOPPING=1 is sent, or failed
	wrapped := func(listen, admin net.Addr) {
		if ready != nil {
			ready(listen, admin)
		}
		if err := sdNotify(socket, "READY=1"); err != nil {
			log.Warn("systemd readiness not sent", "err", err)
		}
		started = true
		go func() {
			defer close(stopping)
			<-ctx.Done()
			if handedOff() {
				return
			}
			if err := sdNotify(socket, "STOPPING=1"); err != nil {
				log.Warn("systemd stopping state not sent", "err", err)
			}
		}()
	}
	sent = func() {
		// Not for a relay that never served, or one that stops on an error instead of being asked to.
		if started && ctx.Err() != nil {
			<-stopping
		}
	}
	return wrapped, reloaded, sent
}

// reloadNotifier runs a reload of the configuration, telling systemd about it when the relay runs under
// a unit of Type=notify.
type reloadNotifier func(reload func() error)

// monotonicUsec is CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC with.
func monotonicUsec() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0 // not on Linux's clocks; systemd then ignores the field
	}
	return ts.Nano() / 1000
}

// sdNotify sends one notify message to socket: a file path, or an abstract socket written "@name" (Go's
// net package maps a leading '@' to the abstract namespace's leading NUL, as systemd means it).
func sdNotify(socket, state string) error {
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: socket, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("NOTIFY_SOCKET %s: %w", socket, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("NOTIFY_SOCKET %s: send %s: %w", socket, state, err)
	}
	return nil
}

// notifyMainPID tells systemd, under a Type=notify unit, that pid (the process an upgrade started, which
// serves now) is the unit's main process: this one drains and exits, and the unit must not end with it.
// systemd takes MAINPID= from the unit's main process (this one, until now) for a process in the unit's
// cgroup (the new one, this one's child). The new process's own READY=1 comes before this: systemd takes
// it only with NotifyAccess=all (packaging/sockrelay.service); the unit is active either way.
func notifyMainPID(pid int, log *slog.Logger) {
	socket := os.Getenv("NOTIFY_SOCKET")
	if socket == "" {
		return
	}
	if err := sdNotify(socket, fmt.Sprintf("MAINPID=%d", pid)); err != nil {
		log.Warn("systemd main process not changed: the unit may end when this process exits", "pid", pid, "err", err)
	}
}
