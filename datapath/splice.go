package datapath

import (
	"fmt"

	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// The splice engine is EventLoop.Splice: splice tunnels run on the event loops, each direction moving its
// bytes socket → pipe → socket with splice(2) through a pipe it borrows from its loop only while bytes sit in
// it. (It replaced a goroutine and a pipe per direction for the tunnel's life: 6 descriptors and 2 goroutines
// per tunnel, idle or not, at about the same CPU per message and throughput; docs/datapath.md.)

// SpliceAvailable checks that this process can make a pipe and size it as the splice engine does.
func SpliceAvailable() error {
	if err := eventloop.CheckPipe(); err != nil {
		return fmt.Errorf("%w: splice: %v", ErrUnavailable, err)
	}
	return nil
}
