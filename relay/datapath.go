package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"golang.org/x/sys/unix"
)

// Datapath names how a tunnel's bytes move once the handshake is done.
type Datapath string

const (
	// DatapathAuto picks the best datapath this host can run; see ChooseDatapath.
	DatapathAuto Datapath = "auto"
	// DatapathSockmap redirects bytes inside the kernel with a BPF sockhash.
	DatapathSockmap Datapath = "sockmap"
	// DatapathSplice moves bytes socket → pipe → socket with splice(2); they never enter userspace.
	DatapathSplice Datapath = "splice"
	// DatapathCopy reads and writes through a userspace buffer.
	DatapathCopy Datapath = "copy"
)

// Datapaths lists every accepted --datapath value, best first.
var Datapaths = []Datapath{DatapathAuto, DatapathSockmap, DatapathSplice, DatapathCopy}

// ErrDatapathUnavailable is returned when a datapath cannot run on this host or in this build.
var ErrDatapathUnavailable = errors.New("datapath unavailable")

// ParseDatapath accepts one of Datapaths.
func ParseDatapath(s string) (Datapath, error) {
	for _, d := range Datapaths {
		if s == string(d) {
			return d, nil
		}
	}
	names := make([]string, len(Datapaths))
	for i, d := range Datapaths {
		names[i] = string(d)
	}
	return "", fmt.Errorf("unknown datapath %q: accepted values are %s", s, strings.Join(names, ", "))
}

// Available reports whether d can carry tunnels on this host, and if not, why.
func (d Datapath) Available() error {
	switch d {
	case DatapathCopy:
		return nil
	case DatapathSplice:
		return probeSplice()
	case DatapathSockmap:
		if err := SelfTestSockmap(slog.New(slog.DiscardHandler)); err != nil {
			return fmt.Errorf("%w: sockmap: %v", ErrDatapathUnavailable, err)
		}
		return nil
	default:
		return fmt.Errorf("%w: %q is not a concrete datapath", ErrDatapathUnavailable, d)
	}
}

// probeSplice checks that this process can make a pipe and size it as the splice datapath does.
func probeSplice() error {
	p, err := newPipe(splicePipeSize)
	if err != nil {
		return fmt.Errorf("%w: splice: %v", ErrDatapathUnavailable, err)
	}
	p.Close()
	return nil
}

// isReset reports whether err says the peer reset the connection. EPIPE is a reset too: a reset that
// arrives after the peer's FIN (CLOSE_WAIT) is reported by Linux as EPIPE, not ECONNRESET (tcp_reset), and
// that is how a browser tab that closes a WebSocket ends it: close frame, FIN, then a reset for the bytes
// that still come.
func isReset(err error) bool {
	return errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE)
}
