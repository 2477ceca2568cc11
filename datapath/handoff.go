package datapath

import (
	"errors"
	"fmt"
	"time"
)

// State is what a pair no engine carries (Park) is, besides its sockets: what another engine, in this
// process or another one, needs to carry it on from where it stopped.
type State struct {
	// Peeked are the bytes read from the client (0) and from the upstream (1) and not yet written to
	// the other side: they go first.
	Peeked [2][]byte
	// Finished is per direction, client → upstream then upstream → client: its FIN was carried.
	Finished             [2]bool
	ToUpstream, ToClient uint64
	HalfClosedAt         time.Time // zero while neither direction has finished
	LastActive           time.Time // zero when the engine could not tell
}

// ErrNotCarried is returned by Park for a pair no engine carries: one whose opening has not handed it to
// an engine yet (or one parked already). Whoever opened it carries it in a moment, so it cannot be parked
// for another process: both would relay its sockets. Park it again once it is carried.
var ErrNotCarried = errors.New("no engine carries the pair (yet)")

// Park stops the engine carrying p, keeping the pair alive: once it returns no engine holds a byte of
// p or will read one, and State says where p stands. Carry on any engine then carries it on, as after
// Move. It fails, leaving p carried as it was, when p's engine cannot give a pair back; ErrPairEnded
// when p ended first; ErrNotCarried when no engine carries p.
func (p *Pair) Park() error {
	p.mu.Lock()
	c, ending := p.carrier, p.ending
	p.mu.Unlock()
	if ending {
		return ErrPairEnded
	}
	if c == nil {
		return ErrNotCarried
	}
	s, ok := c.(Stopper)
	if !ok {
		return fmt.Errorf("park: the %s engine cannot give a live pair back", p.Kind())
	}
	last := c.LastActive()
	if err := s.Stop(); err != nil {
		return fmt.Errorf("park: %w", err)
	}
	p.mu.Lock()
	p.lastActive = unixNano(last)
	p.mu.Unlock()
	return nil
}

// State is where a parked pair stands. The caller parked it, and no engine carries it.
func (p *Pair) State() State {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := State{
		Peeked:     [2][]byte{p.client.Peeked, p.upstream.Peeked},
		Finished:   [2]bool{p.finished[0].Load(), p.finished[1].Load()},
		ToUpstream: p.toUpstream.Load(),
		ToClient:   p.toClient.Load(),
		LastActive: timeOf(p.lastActive),
	}
	if t, ok := p.HalfClosedSince(); ok {
		st.HalfClosedAt = t
	}
	return st
}

// RestorePair is NewPair for a pair another process parked and handed over: client and upstream are its
// sockets, st where it stood (its peeked bytes replace the endpoints').
func RestorePair(kind Kind, client, upstream Endpoint, st State, onEnd func(*Pair)) *Pair {
	client.Peeked, upstream.Peeked = st.Peeked[0], st.Peeked[1]
	p := NewPair(kind, client, upstream, onEnd)
	p.toUpstream.Store(st.ToUpstream)
	p.toClient.Store(st.ToClient)
	for i, f := range st.Finished {
		p.finished[i].Store(f)
	}
	if !st.HalfClosedAt.IsZero() {
		p.halfClosedAt.Store(st.HalfClosedAt.UnixNano())
	}
	p.lastActive = unixNano(st.LastActive)
	return p
}

// unixNano is t as Unix nanoseconds, and 0 for the zero time; timeOf is its inverse.
func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func timeOf(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}
