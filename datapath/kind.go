package datapath

import (
	"errors"
	"fmt"
	"strings"
)

// Kind names a datapath as --datapath and the configuration file do.
type Kind string

const (
	// Auto asks for the best datapath this host can run; the caller resolves it, no engine has it.
	Auto Kind = "auto"
	// Sockmap redirects bytes inside the kernel with a BPF sockhash (datapath/sockmap).
	Sockmap Kind = "sockmap"
	// Splice moves bytes socket → pipe → socket with splice(2); they never enter userspace.
	Splice Kind = "splice"
	// Copy reads and writes through a userspace buffer.
	Copy Kind = "copy"
)

// Kinds lists every accepted --datapath value, best first.
var Kinds = []Kind{Auto, Sockmap, Splice, Copy}

// ErrUnavailable is returned when a datapath cannot run on this host or in this build.
var ErrUnavailable = errors.New("datapath unavailable")

// Parse accepts one of Kinds.
func Parse(s string) (Kind, error) {
	for _, k := range Kinds {
		if s == string(k) {
			return k, nil
		}
	}
	names := make([]string, len(Kinds))
	for i, k := range Kinds {
		names[i] = string(k)
	}
	return "", fmt.Errorf("unknown datapath %q: accepted values are %s", s, strings.Join(names, ", "))
}
