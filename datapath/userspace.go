package datapath

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// userspace is the carrier of the goroutine engine, the Copier (TLS pairs, and those the event loops cannot
// take): a goroutine per direction pumps bytes, and a third ends the pair when both have returned.
type userspace struct {
	p *Pair

	wg sync.WaitGroup
	// stopping is set by Stop; stopped is closed by awaitDirections once both directions have returned,
	// and gaveBack then says whether the pair was given back alive.
	stopping atomic.Bool
	stopped  chan struct{}
	gaveBack bool
}

func newUserspace(p *Pair) *userspace {
	return &userspace{p: p, stopped: make(chan struct{})}
}

func (u *userspace) Pending() (uint64, uint64) { return 0, 0 }
func (u *userspace) LastActive() time.Time     { return time.Time{} }

// Release has nothing to free: closing the pair's conns ends the directions.
func (u *userspace) Release() {}

// run runs pump for both directions of the pair, each in its own goroutine, and ends the pair when both
// have carried their FIN or either has failed. The goroutines run named functions (pumpDirection,
// awaitDirections) so that a stack dump of many tunnels says what each goroutine is.
func (u *userspace) run(pump func(*Direction) error) {
	dirs := u.p.Directions()
	u.wg.Add(len(dirs))
	for _, d := range dirs {
		go pumpDirection(u, d, pump)
	}
	go awaitDirections(u)
}

// pumpDirection carries one direction of a pair: the peeked bytes, then pump until the source's EOF, then
// the FIN. A pump that Stop interrupted returns without either.
func pumpDirection(u *userspace, d *Direction, pump func(*Direction) error) {
	defer u.wg.Done()
	if d.Finished() {
		return // carried to its FIN before the pair moved here
	}
	err := d.WritePeeked()
	if err == nil {
		err = pump(d)
	}
	if u.stopping.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
		return // stopped: every byte read is written or kept as peeked bytes
	}
	if err == nil {
		err = d.Finish()
	}
	if err == nil {
		u.p.MarkHalfClosed()
	}
	if err != nil {
		// The first failure ends the pair; the other direction then fails on the closed socket, and
		// its error is ignored because End runs once.
		u.p.Fail(d.Blame(err), err, true)
	}
}

// awaitDirections ends the pair cleanly once both of its directions have returned, or gives it back when
// Stop asked.
func awaitDirections(u *userspace) {
	u.wg.Wait()
	if u.stopping.Load() && u.p.Let(u) {
		u.gaveBack = true
		close(u.stopped)
		return
	}
	close(u.stopped)
	u.p.End(ReasonClosed, false)
}

// Stop interrupts both directions (expired deadlines) and waits for them: a direction stopped in a read
// holds no byte; one stopped in a write keeps what it did not write as its source's peeked bytes. A TLS pair cannot stop: its TLS connections may hold bytes already decrypted.
func (u *userspace) Stop() error {
	if u.p.TLS() {
		return errors.New("a TLS pair cannot leave userspace: its TLS connections may hold decrypted bytes")
	}
	if !u.stopping.CompareAndSwap(false, true) {
		return errors.New("already stopping")
	}
	// Reads and writes both: a write blocked on a slow reader must not hold the move up. What it did not
	// write is kept as peeked bytes (holdBack), for the next engine to write first.
	conns := [2]interface{ SetDeadline(time.Time) error }{u.p.client.Conn, u.p.upstream.Conn}
	for _, c := range conns {
		_ = c.SetDeadline(time.Now())
	}
	<-u.stopped
	for _, c := range conns {
		_ = c.SetDeadline(time.Time{})
	}
	if !u.gaveBack {
		return ErrPairEnded
	}
	return nil
}
