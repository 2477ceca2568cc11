package relay

import (
	"fmt"
	"log/slog"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// Datapath names how a tunnel's bytes move once the handshake is done (datapath.Kind).
type Datapath = datapath.Kind

const (
	// DatapathAuto picks the best datapath this host can run.
	DatapathAuto = datapath.Auto
	// DatapathSockmap redirects bytes inside the kernel with a BPF sockhash.
	DatapathSockmap = datapath.Sockmap
	// DatapathSplice moves bytes socket → pipe → socket with splice(2); they never enter userspace.
	DatapathSplice = datapath.Splice
	// DatapathCopy reads and writes through a userspace buffer.
	DatapathCopy = datapath.Copy
)

// Datapaths lists every accepted --datapath value, best first.
var Datapaths = datapath.Kinds

// ErrDatapathUnavailable is returned when a datapath cannot run on this host or in this build.
var ErrDatapathUnavailable = datapath.ErrUnavailable

// ParseDatapath accepts one of Datapaths.
func ParseDatapath(s string) (Datapath, error) { return datapath.Parse(s) }

// DatapathAvailable reports whether d can carry tunnels on this host, and if not, why. For sockmap it
// loads the kernel datapath and runs its self-test.
func DatapathAvailable(d Datapath) error {
	switch d {
	case DatapathCopy:
		return nil
	case DatapathSplice:
		return datapath.SpliceAvailable()
	case DatapathSockmap:
		if err := sockmap.SelfTest(slog.New(slog.DiscardHandler)); err != nil {
			return fmt.Errorf("%w: sockmap: %v", ErrDatapathUnavailable, err)
		}
		return nil
	default:
		return fmt.Errorf("%w: %q is not a concrete datapath", ErrDatapathUnavailable, d)
	}
}
