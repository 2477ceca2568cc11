package datapath

import (
	"fmt"
	"time"

	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// EventLoop is the copy engine for plain (non-TLS) pairs: a few event loops (datapath/eventloop), one per
// locked OS thread, own the pairs' descriptors and move their bytes through buffers lent only while bytes are
// in flight, instead of two goroutines and their buffers per pair. It is of kind Copy: it moves the same
// bytes the same way the Copier does, and a pair it cannot take (TLS, or no descriptor left to take the
// sockets with) runs on the Copier.
//
// A pair on the loop cannot be given back alive yet (it is no Stopper): its Go connections are closed when
// the loop takes its descriptors, and the relay and the pair hold those. A Move away from it fails and
// leaves it carried; a Move to it works from any engine that can stop.
type EventLoop struct {
	loops *eventloop.Loops
	// OnFallback, when set, is told of each plain pair the loops could not take (err says why: most often
	// EMFILE, no descriptor left to duplicate its sockets with) and that the Copier carries instead. It runs
	// on the caller's goroutine of Carry.
	OnFallback func(p *Pair, err error)
}

var _ Engine = (*EventLoop)(nil)

// StartEventLoop starts the loops. An error (EMFILE from epoll_create or eventfd, most often) leaves
// nothing open: the caller then carries pairs on the Copier.
func StartEventLoop(opts eventloop.Options) (*EventLoop, error) {
	ls, err := eventloop.Start(opts)
	if err != nil {
		return nil, fmt.Errorf("copy datapath: %w", err)
	}
	return &EventLoop{loops: ls}, nil
}

func (*EventLoop) Kind() Kind { return Copy }

// Accepts takes plain endpoints only: TLS bytes must be decrypted, which crypto/tls does on a goroutine.
func (*EventLoop) Accepts(a, b Endpoint) bool { return a.TLS == nil && b.TLS == nil }

// Close resets the pairs still carried (they end as ReasonShutdown) and stops the loops. Draining pairs
// first is the caller's job.
func (e *EventLoop) Close() error {
	e.loops.Close()
	return nil
}

// EventLoopStats are the loops' counters, for a collector to read at scrape time.
type EventLoopStats struct {
	Loops []eventloop.LoopStats // one per loop, in loop order
	// BufSize is the size of a lent buffer: a loop holds BuffersInUse × BufSize bytes for bytes in flight.
	BufSize int
}

// Stats returns the loops' counters.
func (e *EventLoop) Stats() EventLoopStats {
	return EventLoopStats{Loops: e.loops.Stats(), BufSize: e.loops.BufSize()}
}

// Carry hands p's sockets to a loop; a TLS pair, or one the loops cannot take, runs on the Copier.
func (e *EventLoop) Carry(p *Pair) {
	if !e.Accepts(p.Client(), p.Upstream()) {
		Copier{}.Carry(p)
		return
	}
	c := &loopCarrier{p: p, ended: make(chan struct{})}
	held, err := p.Hold(Copy, c, func() error { return c.attach(e.loops) })
	if err != nil {
		// The sockets are untouched (eventloop.Loops.Carry leaves them as they were on error), and no
		// peer did anything wrong: the pair runs on goroutines instead.
		if e.OnFallback != nil {
			e.OnFallback(p, err)
		}
		Copier{}.Carry(p)
		return
	}
	_ = held // false: the pair was already ending, and End closed its sockets
}

// loopCarrier is the EventLoop's hold on one pair.
type loopCarrier struct {
	p *Pair
	h *eventloop.Handle // set by attach, under p.mu, before the carrier holds the pair
	// ended is closed on the loop's thread once the tunnel has ended and its descriptors are closed; end is
	// written before.
	ended chan struct{}
	end   eventloop.End
	// folded: the tunnel's final counts are in the pair's counters (Pending then returns 0). Guarded by p.mu.
	folded bool
}

var _ socketOwner = (*loopCarrier)(nil)

// attach gives the pair's sockets and unsent peeked bytes to a loop. It runs under p.mu (Pair.Hold).
func (c *loopCarrier) attach(ls *eventloop.Loops) error {
	dirs := c.p.Directions()
	h, err := ls.CarryWith(c.p.client.Conn, c.p.upstream.Conn, eventloop.Spec{
		APeeked:  *dirs[0].peeked,
		BPeeked:  *dirs[1].peeked,
		Finished: [2]bool{dirs[0].Finished(), dirs[1].Finished()},
		OnEnd:    c.onEnd,
		OnFIN: func(dir int) {
			dirs[dir].MarkFinished()
			c.p.MarkHalfClosed()
		},
	})
	if err != nil {
		return fmt.Errorf("event loop: %w", err)
	}
	// The loop has its own copy, and counts them as moved.
	*dirs[0].peeked, *dirs[1].peeked = nil, nil
	c.h = h
	return nil
}

// onEnd runs on the loop's thread, which must not block: it records the end and leaves ending the pair
// (which takes the pair's lock and runs the relay's end of a tunnel) to a goroutine.
func (c *loopCarrier) onEnd(e eventloop.End) {
	c.end = e
	close(c.ended)
	go endLoopPair(c.p, e)
}

// endLoopPair ends a pair whose tunnel the loop ended, naming the reason as every engine does (Blame).
// When the pair was already ending (Release closed the tunnel) this does nothing.
func endLoopPair(p *Pair, e eventloop.End) {
	switch e.Reason {
	case eventloop.ReasonClosed:
		p.End(ReasonClosed, false)
	case eventloop.ReasonResetByA, eventloop.ReasonResetByB, eventloop.ReasonError:
		p.Fail(Blame(e.First == eventloop.SideA, e.Err), e.Err, true)
	case eventloop.ReasonLoopsClosed:
		p.End(ReasonShutdown, true)
	default: // ReasonLocalClose, ReasonLocalAbort: Release asked, the pair is ending already
		p.End(ReasonShutdown, true)
	}
}

// Pending returns what the loop has moved, until its final counts are folded into the pair's. The caller
// holds p.mu.
func (c *loopCarrier) Pending() (toUpstream, toClient uint64) {
	if c.folded {
		return 0, 0
	}
	up, down := c.h.Bytes()
	return uint64(up), uint64(down)
}

// LastActive is when the loop last moved a byte of the pair, to its own clock: no system call.
func (c *loopCarrier) LastActive() time.Time { return c.h.LastActive() }

// Progress is the bytes the loop has written both ways. A slow reader draining a full buffer counts: each
// partial write it allows moves it.
func (c *loopCarrier) Progress() uint64 {
	up, down := c.h.Bytes()
	return uint64(up + down)
}

// Unsent asks the loop whether bytes wait to reach a peer (its own or the sockets' send queues).
func (c *loopCarrier) Unsent() bool { return c.h.Queued() }

// Release closes the tunnel on its loop (reset when the pair ends aborted) and waits for the loop to have
// closed its descriptors, so that the pair's end is reported after its sockets are closed and with its
// final counts. The caller holds p.mu; the loop's thread never takes it, so the wait cannot deadlock.
func (c *loopCarrier) Release() {
	c.h.Close(c.p.aborted)
	<-c.ended
	if !c.folded {
		c.folded = true
		c.p.AddBytes(uint64(c.end.AToB), uint64(c.end.BToA))
	}
}
