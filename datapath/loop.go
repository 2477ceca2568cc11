package datapath

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath/eventloop"
)

// EventLoop is the copy engine for plain (non-TLS) pairs: a few event loops (datapath/eventloop), each a
// goroutine blocking in its own epoll_wait, own the pairs' descriptors and move their bytes through buffers lent only while bytes are
// in flight, instead of two goroutines and their buffers per pair. It is of kind Copy: it moves the same
// bytes the same way the Copier does, and a pair it cannot take (TLS, or no descriptor left to take the
// sockets with) runs on the Copier.
//
// A pair on the loop can be given back alive (Stop, for Move): the loop hands its descriptors back as new Go
// connections, which replace the pair's (those were closed when the loop took the descriptors), and the bytes
// it held become the endpoints' peeked bytes, written first by the next engine.
type EventLoop struct {
	loops *eventloop.Loops
	// OnFallback, when set, is told of each plain pair the loops could not take (err says why: most often
	// EMFILE, no descriptor left to duplicate its sockets with) and that the Copier carries instead. It runs
	// on the caller's goroutine of Carry.
	OnFallback func(p *Pair, err error)
	// splice: this engine is of kind Splice and its tunnels move bytes with splice(2) through pipes the
	// loops lend while bytes are in flight (Splice).
	splice bool
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

// Splice returns the splice engine on the same loops: its pairs' bytes move socket → pipe → socket with
// splice(2), never entering userspace, through a pipe a direction borrows from its loop only while bytes
// sit in it and gives back once it is empty (eventloop.Spec.Splice). An idle spliced pair holds its two
// sockets and no pipe; a direction that cannot have a pipe (out of descriptors) copies through a buffer until
// it can. A pair the loops cannot take runs on the Copier, as e's do (OnFallback, which the returned engine
// starts without). Closing either engine stops the loops both use.
func (e *EventLoop) Splice() *EventLoop {
	return &EventLoop{loops: e.loops, splice: true}
}

// Kind is Copy, or Splice for the engine Splice returns.
func (e *EventLoop) Kind() Kind {
	if e.splice {
		return Splice
	}
	return Copy
}

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
	// PipeSize is the capacity of a lent pipe: spliced tunnels' pipes hold at most PipesInUse × PipeSize.
	PipeSize int
}

// Stats returns the loops' counters.
func (e *EventLoop) Stats() EventLoopStats {
	return EventLoopStats{Loops: e.loops.Stats(), BufSize: e.loops.BufSize(), PipeSize: e.loops.PipeSize()}
}

// Carry hands p's sockets to a loop; a TLS pair, or one the loops cannot take, runs on the Copier.
func (e *EventLoop) Carry(p *Pair) {
	if !e.Accepts(p.Client(), p.Upstream()) {
		Copier{}.Carry(p)
		return
	}
	c := &loopCarrier{p: p}
	c.ended.Add(1)
	held, err := p.Hold(e.Kind(), c, func() error { return c.attach(e.loops, e.splice) })
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

// OnEventLoop reports whether an event loop carries p now (a copy pair may also run on goroutines: TLS,
// or a fallback), spliced or not.
func (p *Pair) OnEventLoop() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.carrier.(*loopCarrier)
	return ok
}

// loopCarrier is the EventLoop's hold on one pair.
type loopCarrier struct {
	p *Pair
	h eventloop.Handle // set by attach, under p.mu, before the carrier holds the pair
	// ended is done on the loop's thread once the tunnel has ended and its descriptors are closed, and its
	// final counts are in h.Bytes. (A WaitGroup, not a channel: an idle pair keeps its carrier, and a
	// channel is 96 bytes more.)
	ended sync.WaitGroup
	// folded: the tunnel's final counts are in the pair's counters (Pending then returns 0). Guarded by p.mu.
	folded bool
}

var (
	_ activityReporter = (*loopCarrier)(nil)
	_ Stopper          = (*loopCarrier)(nil)
	// The carrier is the loop's owner of the tunnel: one record tells it of FINs and the end, where two
	// closures would be kept for the tunnel's life.
	_ eventloop.Owner = (*loopCarrier)(nil)
)

// attach gives the pair's sockets and unsent peeked bytes to a loop, spliced or not. It runs under p.mu
// (Pair.Hold).
func (c *loopCarrier) attach(ls *eventloop.Loops, splice bool) error {
	dirs := c.p.Directions()
	h, err := ls.CarryWith(c.p.client.Conn, c.p.upstream.Conn, eventloop.Spec{
		APeeked:  dirs[0].src.Peeked,
		BPeeked:  dirs[1].src.Peeked,
		Finished: [2]bool{dirs[0].Finished(), dirs[1].Finished()},
		Owner:    c,
		Splice:   splice,
	})
	if err != nil {
		return fmt.Errorf("event loop: %w", err)
	}
	// The loop has its own copy, and counts them as moved.
	dirs[0].src.Peeked, dirs[1].src.Peeked = nil, nil
	c.h = *h
	return nil
}

// TunnelFIN runs on the loop's thread when direction dir (0: client → upstream, as the pair's) has carried
// its FIN. It reaches the pair through c rather than through the directions attach used, which an idle
// tunnel would otherwise keep for its life.
func (c *loopCarrier) TunnelFIN(dir int) {
	c.p.finished[dir].Store(true)
	c.p.MarkHalfClosed()
}

// TunnelEnded runs on the loop's thread, which must not block: it records the end and leaves ending the
// pair (which takes the pair's lock and runs the relay's end of a tunnel) to a goroutine.
func (c *loopCarrier) TunnelEnded(e eventloop.End) {
	c.ended.Done()
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

// Progress asks the loop what TCP has moved on the pair's sockets (TCP_INFO), as the other engines'
// Progress reads it: a slow reader draining a full buffer counts with every ACK, not only when the loop
// writes again.
func (c *loopCarrier) Progress() uint64 { return c.h.Progress() }

// Unsent asks the loop whether bytes wait to reach a peer (its own or the sockets' send queues).
func (c *loopCarrier) Unsent() bool { return c.h.Queued() }

// Release closes the tunnel on its loop (reset when the pair ends aborted) and waits for the loop to have
// closed its descriptors, so that the pair's end is reported after its sockets are closed and with its
// final counts. The caller holds p.mu; the loop's thread never takes it, so the wait cannot deadlock.
func (c *loopCarrier) Release() {
	c.h.Close(c.p.aborted)
	c.ended.Wait()
	if !c.folded {
		c.folded = true
		up, down := c.h.Bytes() // final: the loop wrote the last before ended was done
		c.p.AddBytes(uint64(up), uint64(down))
	}
}

// Stop gives the pair back alive: the loop hands over its descriptors, at a byte boundary, as new Go
// connections that replace the pair's, and what it read but did not write becomes the endpoints' peeked
// bytes. It holds the pair's lock throughout, so that no End runs between the loop letting go and the pair
// holding the new connections; the loop's thread never takes that lock. On an error (out of descriptors
// for the new connections) the pair stays on the loop, untouched. When the loop ended the tunnel first,
// Stop returns ErrPairEnded once the pair has ended too.
func (c *loopCarrier) Stop() error {
	err := c.stop()
	if errors.Is(err, eventloop.ErrEnded) {
		<-c.p.Done() // endLoopPair ends it, once stop has let go of the pair's lock
		return ErrPairEnded
	}
	return err
}

// stop is Stop under the pair's lock.
func (c *loopCarrier) stop() error {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ending || p.carrier != c {
		return ErrPairEnded
	}
	var client, upstream *net.TCPConn
	d, err := c.h.Detach(func(afd, bfd int) error {
		var err error
		if client, err = tcpConnOf(afd); err != nil {
			unix.Close(bfd)
			return fmt.Errorf("client side: %w", err)
		}
		if upstream, err = tcpConnOf(bfd); err != nil {
			_ = client.Close()
			return fmt.Errorf("upstream side: %w", err)
		}
		return nil
	})
	if errors.Is(err, eventloop.ErrEnded) {
		return err
	}
	if err != nil {
		return fmt.Errorf("event loop: %w", err)
	}
	p.client.Conn, p.upstream.Conn = client, upstream
	p.client.Peeked, p.upstream.Peeked = d.Pending[0], d.Pending[1]
	p.AddBytes(uint64(d.AToB), uint64(d.BToA))
	c.folded = true
	p.carrier = nil
	return nil
}

// tcpConnOf makes a Go connection of a TCP socket's descriptor, which it closes (net.FileConn keeps a
// duplicate of its own).
func tcpConnOf(fd int) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "tcp")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		_ = c.Close()
		return nil, fmt.Errorf("descriptor %d is not a TCP socket", fd)
	}
	return tc, nil
}
