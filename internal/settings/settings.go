// Package settings holds the default and the accepted range of each of the relay's bounded settings, once.
// The configuration file (package config), the command line (cmd/sockrelay) and relay.NewServer check
// values against these ranges and say what is accepted in the same words, so that a value one of them
// accepts is never refused by another.
package settings

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Defaults.
const (
	DefaultClientHeaderTimeout     = 10 * time.Second
	DefaultConnectTimeout          = 5 * time.Second
	DefaultUpstreamResponseTimeout = 15 * time.Second
	DefaultHTTPIdleTimeout         = 60 * time.Second // nginx's client_body_timeout and send_timeout
	DefaultShutdownTimeout         = 30 * time.Second
	DefaultMaxHeaderBytes          = 16 << 10
	// DefaultKernelHeldLimit is 4 MiB, where the backpressure prototype demoted (docs/datapath.md,
	// "Backpressure"). The kernel also holds up to a send buffer in the destination (tcp_wmem, 4 MiB at
	// most by default) and a receive buffer in the source, so a stopped reader costs about 12 MiB per
	// direction, the order of what the userspace paths let the socket buffers hold for them (8–10 MiB
	// measured here).
	DefaultKernelHeldLimit = 4 << 20
	// DefaultHalfClosedTimeout: a WebSocket has no meaningful half-close (RFC 6455 closes both ways with
	// close frames), so a tunnel one side has finished is a dead one; nginx and HAProxy had closed such
	// tunnels within 3 s.
	DefaultHalfClosedTimeout = 5 * time.Second
	// DefaultTCPHalfClosedTimeout is longer: raw TCP protocols do half-close and then answer.
	DefaultTCPHalfClosedTimeout = 60 * time.Second
)

// Ranges.
var (
	// Timeout is the range of the timeouts every connection runs under: client header, connect, upstream
	// response, shutdown (drain) and HTTP idle. None can be off.
	Timeout = Duration{Min: time.Nanosecond}
	// TunnelTimeout is the range of the tunnel idle timeout, lifetime and half-closed timeouts and of the
	// tunnel log and reload intervals: 0 turns them off, and under a second they would close tunnels
	// between two scans' worth of noise, or flood the log.
	TunnelTimeout = Duration{Min: time.Second, Off: true}
	// KernelHeldLimit: below a few segments every burst would demote a direction; the verdict compares
	// what it holds as a signed 32-bit count (bpf/sockrelay.c).
	KernelHeldLimit = Size{Min: 64 << 10, Max: 1 << 30}
	// MaxHeaderBytes: a request line and headers past 1 MiB are a mistake or an attack (nginx's default
	// buffers hold 4 × 8 KiB), and the relay buffers them per connection.
	MaxHeaderBytes = Size{Min: 1 << 10, Max: 1 << 20}
	// EventLoops is the number of event loops (OS threads) of the copy datapath, 0 for the relay's default
	// (one per two CPUs). The bound is fixed rather than a multiple of this host's CPUs, so that a file
	// `sockrelay check` passes on one host is not refused on a smaller one; 1024 is past the default of any
	// host we know of and stops a typo from starting thousands of threads. More loops than CPUs start
	// (the relay warns): they only take turns on the CPUs.
	EventLoops = Count{Max: 1024, Zero: "the default, one per two CPUs"}
)

// Count is the range of a setting that counts things, 0 taking a default.
type Count struct {
	Max  int    // the most accepted; the least is 1, or 0 for the default
	Zero string // what 0 means
}

// Contains reports whether v is accepted.
func (r Count) Contains(v int64) bool { return v >= 0 && v <= int64(r.Max) }

// String says what the range accepts: "0 (the default, one per two CPUs) or 1 to 1024".
func (r Count) String() string { return fmt.Sprintf("0 (%s) or 1 to %d", r.Zero, r.Max) }

// Check returns nil when v is accepted, else an error that gives v and what is accepted.
func (r Count) Check(v int64) error {
	if r.Contains(v) {
		return nil
	}
	return fmt.Errorf("%d is out of range; accepted %s", v, r)
}

// Duration is the range a duration setting accepts.
type Duration struct {
	Min time.Duration // the least value accepted (besides 0 where Off)
	Max time.Duration // the most; 0: no upper bound
	Off bool          // 0 is accepted too, and turns the setting off
}

// Contains reports whether v is accepted.
func (r Duration) Contains(v time.Duration) bool {
	if r.Off && v == 0 {
		return true
	}
	return v >= r.Min && (r.Max == 0 || v <= r.Max)
}

// String says what the range accepts, as the errors about it do: "more than 0s", "0s (off) or 1s or more",
// "1s to 1h", "0s (off) to 1h".
func (r Duration) String() string {
	anyPositive := r.Min <= time.Nanosecond
	switch {
	case r.Off && anyPositive && r.Max > 0:
		return "0s (off) to " + FormatDuration(r.Max)
	case r.Off && anyPositive:
		return "0s (off) or more"
	case r.Off:
		return "0s (off) or " + Duration{Min: r.Min, Max: r.Max}.String()
	case anyPositive && r.Max > 0:
		return "more than 0s, up to " + FormatDuration(r.Max)
	case anyPositive:
		return "more than 0s"
	case r.Max == 0:
		return FormatDuration(r.Min) + " or more"
	}
	return FormatDuration(r.Min) + " to " + FormatDuration(r.Max)
}

// Check returns nil when v is accepted, else an error that gives v and what is accepted; the caller
// prefixes the name of the setting as its user wrote it (a flag, a key).
func (r Duration) Check(v time.Duration) error {
	if r.Contains(v) {
		return nil
	}
	return fmt.Errorf("%s is out of range; accepted %s", FormatDuration(v), r)
}

// Size is the range a byte-count setting accepts.
type Size struct {
	Min, Max int
}

// Contains reports whether v is accepted.
func (r Size) Contains(v int64) bool { return v >= int64(r.Min) && v <= int64(r.Max) }

// String says what the range accepts: "64KiB to 1GiB".
func (r Size) String() string { return FormatSize(r.Min) + " to " + FormatSize(r.Max) }

// Check returns nil when v is accepted, else an error that gives v and what is accepted.
func (r Size) Check(v int64) error {
	if r.Contains(v) {
		return nil
	}
	return fmt.Errorf("%d is out of range; accepted %s", v, r)
}

// FormatDuration writes d as a user would: 1h rather than Go's 1h0m0s.
func FormatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// SizeUnits are the units a size may be written in: binary only, since "4MB" could mean 4,000,000 or
// 4,194,304 bytes, and a limit should not depend on which the reader assumed.
var SizeUnits = []struct {
	Suffix string
	Mult   int64
}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}}

// FormatSize writes a byte count in the largest unit that divides it, as a user would write it.
func FormatSize(v int) string {
	for i := len(SizeUnits) - 1; i >= 0; i-- {
		if m := SizeUnits[i].Mult; v != 0 && int64(v)%m == 0 {
			return strconv.FormatInt(int64(v)/m, 10) + SizeUnits[i].Suffix
		}
	}
	return strconv.Itoa(v)
}
