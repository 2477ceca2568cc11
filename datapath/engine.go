package datapath

import (
	"errors"
	"fmt"
	"time"
)

// An Engine carries pairs. The Copier holds nothing between pairs; the event loops (copy and splice) and the
// kernel engine own threads and descriptors, and are closed after their last pair has ended.
type Engine interface {
	Kind() Kind
	// Accepts reports whether the engine can carry bytes between a and b.
	Accepts(a, b Endpoint) bool
	// Carry takes over p's sockets and returns at once; p ends through p.End or p.Fail.
	Carry(p *Pair)
	Close() error
}

// A Carrier is an engine's hold on one pair while it carries it (Pair.Hold).
type Carrier interface {
	// Pending returns bytes moved each way that the pair's own counters do not hold yet.
	Pending() (toUpstream, toClient uint64)
	// LastActive is when the engine last saw a byte either way; zero when it cannot tell.
	LastActive() time.Time
	// Release lets go of the pair; Pair.End calls it once, with the pair's lock held, before it closes
	// the sockets.
	Release()
}

// A Stopper is a Carrier that can give its pair back alive. Stop returns once the engine holds no byte
// of the pair and will read no more: every byte it read is written, nothing else is in flight, the
// sockets are open and the pair is held by no carrier. The pair may already have ended (ErrPairEnded).
type Stopper interface {
	Carrier
	Stop() error
}

// A SocketOwner is a Carrier that took the pair's sockets from their conns: the kernel engine keeps
// descriptors of its own and closes the conns, so that Go's poller is not woken for bytes it never reads.
// The pair then reaches the sockets through it (Unsent, Progress, the reset at End).
type SocketOwner interface {
	Carrier
	// Sockets returns the descriptors of the client's and the upstream's socket. The pair calls it with
	// its lock held, which Release also runs under: the descriptors stay open until Release.
	Sockets() (client, upstream int)
}

// ErrPairEnded is returned by Stop and Move when the pair ended first.
var ErrPairEnded = errors.New("the pair has ended")

// Move hands p from the engine that carries it to to, without losing, duplicating or reordering a byte:
// the carrier stops at a byte boundary, and to starts from the sockets as they are. It fails, leaving p
// where it was, when to does not accept p's endpoints or p's engine cannot give it back.
func Move(p *Pair, to Engine) error {
	if !to.Accepts(p.Client(), p.Upstream()) {
		return fmt.Errorf("move to %s: the engine does not accept these endpoints", to.Kind())
	}
	p.mu.Lock()
	c, ending := p.carrier, p.ending
	p.mu.Unlock()
	if ending {
		return ErrPairEnded
	}
	s, ok := c.(Stopper)
	if !ok {
		return fmt.Errorf("move from %s to %s: the engine cannot give a live pair back", p.Kind(), to.Kind())
	}
	if err := s.Stop(); err != nil {
		return fmt.Errorf("move from %s to %s: %w", p.Kind(), to.Kind(), err)
	}
	to.Carry(p)
	return nil
}
