package sockmap

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
)

// Handing kernel tunnels to another engine over the same BPF objects (docs/upgrade.md, "Kernel
// tunnels"): in an upgrade, the new process adopts the old one's maps (loader.Adopt), and each kernel
// tunnel moves with its sockets left in them, so that the verdict goes on redirecting its bytes in the
// kernel throughout. Only what this engine keeps of a tunnel in userspace moves: its epoll registration,
// its tables and descriptors, and TunnelState.
//
// LetGo stops the tunnel's relaying goroutines at a byte boundary, as Stop does (a write or a wait for
// earlier bytes to be handed on is cut short): the bytes one read and did not write go along as the
// pair's peeked bytes, which the adopting engine writes first, after the bytes redirected before them.
// Passed bytes not read yet wait in the source's psock for the adopter's relay. A FIN the old engine saw
// and did not carry yet is not handed along: the adopter's epoll registration reports it again (an
// edge-triggered registration reports the state the socket is in when it is added), as it reports a FIN
// or an error that came in between; and Adopt starts the relay of a direction it finds demoted.
//
// Once the objects are shared, both processes may read the mode-change ring buffer, and an event one
// reads the other may never see; or both may see it: the ring buffer's reader (cilium/ebpf ringbuf)
// advances the consumer position with a load, then a store, so two readers can read the same event.
// Duplicates are harmless because an event is only a hint checked against the verdict's state: a
// Demoted event starts a relay that does nothing if one runs (and that stops once the verdict redirects
// and every passed byte is relayed), demotions are counted from the verdict's own count, once, by the
// engine that carries the tunnel, a Resumed event only wakes the relay to look, and a Broken one ends a
// tunnel only if the verdict's state says broken. An engine that shares its objects rechecks every
// tunnel each sharedSweep, as it does after lost events, while any other process may read (sharers counts them: the
// process it adopted from, each process it exported to). The old process stops reading (StopEvents) once
// it holds no kernel tunnel and tells the new one, or exits; the new one then calls Unshare, and once no
// other reader is left the loop rechecks every tunnel one last time, for an event the other read before
// it stopped.

// sharedSweep is how often an engine that shares its BPF objects rechecks every tunnel's mode: the
// longest a direction demoted while the other process read its event waits for its relay.
const sharedSweep = 100 * time.Millisecond

// TunnelState is what an engine that adopts a kernel tunnel needs besides its sockets and the pair's
// own State: the verdict's counters and mode stay in the maps, this is what the engine kept in userspace.
type TunnelState struct {
	// Cookies are the sockets' cookies, client then upstream: the adopting engine checks that the
	// descriptors it got are these sockets.
	Cookies [2]uint64 `json:"cookies"`
	// SentBase is, per socket, how many bytes had entered its send path before it entered the maps:
	// what the verdict counts as redirected into it is counted from there.
	SentBase [2]uint64 `json:"sent_base"`
	// Folded is, per socket, how many of the bytes the verdict redirected from it the pair's own
	// counters (datapath.State) hold already: the engine that let go folded them in, so that its
	// process's byte counts do not go back; the adopter counts only the verdict's bytes past them.
	Folded [2]uint64 `json:"folded"`
	// Dirs are client → upstream, then upstream → client.
	Dirs [2]DirState `json:"dirs"`
}

// DirState is one direction of a kernel tunnel, as its engine kept it.
type DirState struct {
	HeldLimit uint64 `json:"held_limit"`
	// FINDone: the direction's FIN was carried (its destination's write side is shut).
	FINDone bool `json:"fin_done,omitempty"`
	// UserRead and UserWritten count the passed bytes userspace has relayed, as the verdict reads them
	// (loader.Control); ResumeGen is the demotion after which resuming was last asked for.
	UserRead    uint64 `json:"user_read,omitempty"`
	UserWritten uint64 `json:"user_written,omitempty"`
	ResumeGen   uint64 `json:"resume_gen,omitempty"`
	// Demotions is how many of its source's demotions the engine counted (Stats): the adopter counts
	// those past them.
	Demotions uint64 `json:"demotions,omitempty"`
}

// errStopAsked stops a relaying goroutine's wait for earlier bytes to be handed on: LetGo or Stop asked it to
// return, and a slow reader would keep them waiting.
var errStopAsked = errors.New("asked to stop")

// StartAdopted is Start over BPF objects another process exported (loader.Adopt, which closes files):
// it adopts them, refusing objects of another build (loader.ErrIncompatible), and runs the self-test on
// them, whose tunnels use entries of their own and leave the other process's alone. The engine shares
// the objects until Unshare.
func StartAdopted(log *slog.Logger, onFallback func(p *datapath.Pair, reason string), heldLimit uint64, files map[string]*os.File) (*Engine, error) {
	if err := loader.Probe().Err(); err != nil {
		for _, f := range files {
			f.Close()
		}
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	maps, err := loader.Adopt(files)
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k, err := newEngineOver(log, onFallback, maps)
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k.share()
	if err := k.selfTest(); err != nil {
		k.Close()
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k.resetStats()
	k.heldLimit = heldLimit
	return k, nil
}

// Export returns descriptors of the engine's BPF objects for another process (loader.Sockmap.Export);
// the caller closes them. From here on the engine shares them: it rechecks its tunnels' modes each
// sharedSweep, and its Close leaves the verdict attached.
func (k *Engine) Export() (map[string]*os.File, error) {
	files, err := k.maps.Export()
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k.share()
	return files, nil
}

// Shared reports whether another process may still read the engine's mode-change ring buffer, so that
// the engine sweeps its tunnels for events that process read.
func (k *Engine) Shared() bool { return k.sharers.Load() > 0 }

// share counts one more process that may read the ring buffer (sharers).
func (k *Engine) share() { k.sharers.Add(1) }

// Unshare says that one of the processes that shared the objects (the one this engine adopted them from,
// or one it exported them to that did not adopt them) reads the ring buffer no more: it stopped reading
// (StopEvents) or is gone. Once none is left, the loop rechecks every tunnel one last time and stops the
// sweeps. A call with no sharer left does nothing.
func (k *Engine) Unshare() {
	for {
		n := k.sharers.Load()
		if n <= 0 {
			return
		}
		if k.sharers.CompareAndSwap(n, n-1) {
			if n == 1 {
				k.lastSweep.Store(true)
			}
			return
		}
	}
}

// StopEvents stops this engine's reading of the ring buffer, for the process it handed its tunnels to:
// called once it holds no kernel tunnel. Tunnels it still carried would find their demotions only at the
// sweep.
func (k *Engine) StopEvents() error { return k.maps.CloseEvents() }

// sweepIfShared rechecks every tunnel each sharedSweep while the engine shares its objects, and once more
// when sharing has ended: an event the other process read between the last sweep and its StopEvents
// would be lost otherwise. Only the loop calls it.
func (k *Engine) sweepIfShared() {
	last := k.lastSweep.Swap(false)
	if !last && (k.sharers.Load() <= 0 || time.Since(k.sweptAt) < sharedSweep || k.hooks.pauseSweeps.Load()) {
		return
	}
	k.sweptAt = time.Now()
	k.recheckAll()
}

// Tunnels counts the kernel tunnels the engine carries.
func (k *Engine) Tunnels() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.socks) / 2
}

// LetGo lets go of p, a pair k carries, leaving its sockets in the maps: the verdict goes on, and the
// engine that Adopts it (over the same objects) carries on from the returned state. Its relaying
// goroutines stop first, at a byte boundary; bytes one read and did not write become p's peeked bytes.
// p gets new conns of its sockets (for their descriptors to be handed over) and no carrier; its State is
// the rest. A pair that ended gives datapath.ErrPairEnded; one not carried yet, or being given back
// already, ErrBusy (it may be let go of later).
func (k *Engine) LetGo(p *datapath.Pair) (TunnelState, error) {
	c := p.Carrier()
	kt, ok := c.(*kernelTunnel)
	switch {
	case c == nil && !p.Ending():
		// Its handshake is finishing: it enters the kernel in a moment (or falls back to copy).
		return TunnelState{}, fmt.Errorf("let go of pair %d: no engine carries it yet: %w", p.ID, ErrBusy)
	case !ok || kt.k != k:
		return TunnelState{}, fmt.Errorf("let go of pair %d: the kernel engine does not carry it", p.ID)
	}
	relays, err := k.leaveLoop(kt)
	if err != nil {
		return TunnelState{}, fmt.Errorf("let go of pair %d: %w", p.ID, err)
	}
	for _, done := range relays {
		select {
		case <-done:
		case <-p.Done():
			return TunnelState{}, datapath.ErrPairEnded
		}
	}
	st, held, client, upstream, err := k.handedState(kt)
	if err != nil {
		// Out of the loop, it would not be watched: it ends rather than hang.
		p.Fail(datapath.ReasonKernelError, err, true)
		return TunnelState{}, fmt.Errorf("let go of pair %d: %w", p.ID, err)
	}
	gave, err := p.GiveBack(kt, client, upstream, held, func() error { return k.forget(kt, &st.Folded) })
	if !gave {
		_ = client.Close()
		_ = upstream.Close()
		if err == nil {
			err = datapath.ErrPairEnded
		}
		return TunnelState{}, err
	}
	return st, nil
}

// handedState is kt's state once its relaying goroutines have returned, the bytes they held back, and new
// conns of its sockets.
func (k *Engine) handedState(kt *kernelTunnel) (st TunnelState, held [2][]byte, client, upstream *net.TCPConn, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return st, held, nil, nil, datapath.ErrPairEnded
	}
	st = TunnelState{Cookies: [2]uint64{kt.client.cookie, kt.up.cookie}, SentBase: [2]uint64{kt.client.sentBase, kt.up.sentBase}}
	for i := range kt.dirs {
		d := &kt.dirs[i]
		st.Dirs[i] = DirState{HeldLimit: d.limit, FINDone: d.finDone, UserRead: d.userRead,
			UserWritten: d.userWritten, ResumeGen: d.resumeGen}
		if d.demoted != nil {
			st.Dirs[i].Demotions = d.counted
		}
		held[i], d.heldBack = d.heldBack, nil
	}
	if client, err = pollConn(kt.client.fd); err != nil {
		return st, held, nil, nil, err
	}
	if upstream, err = pollConn(kt.up.fd); err != nil {
		_ = client.Close()
		return st, held, nil, nil, err
	}
	return st, held, client, upstream, nil
}

// forget closes the engine's descriptors of kt, which another engine adopts, marking the FINs it carried
// and folding the verdict's counts so far into the pair; folded gets those counts, from which the
// adopter goes on. The sockets stay in the maps, and the verdict's counters with them. The caller holds
// the pair's lock (Pair.GiveBack).
func (k *Engine) forget(kt *kernelTunnel, folded *[2]uint64) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return errTunnelEnded
	}
	up, down := k.counters(kt)
	kt.p.AddBytes(up, down)
	*folded = [2]uint64{kt.client.folded + up, kt.up.folded + down}
	for i := range kt.dirs {
		if kt.dirs[i].finDone {
			kt.dirs[i].markFinished()
		}
	}
	kt.released = true
	kt.closeSockets()
	return nil
}

// Adopt carries on p, a kernel tunnel another engine over the same BPF objects let go of (LetGo), from
// st: its sockets are p's conns, which must be the sockets st names, still in the maps. Like Carry, it
// takes the sockets from the conns. An error leaves p as it was, not carried; datapath.ErrPairEnded
// when its sockets have left the maps (the tunnel ended meanwhile).
func (k *Engine) Adopt(p *datapath.Pair, st TunnelState) error {
	kt := &kernelTunnel{k: k, p: p}
	adopted := false
	defer func() {
		if !adopted {
			kt.closeSockets()
		}
	}()
	var err error
	if kt.client, err = k.newSide(kt, p.Client().Conn, true); err == nil {
		kt.up, err = k.newSide(kt, p.Upstream().Conn, false)
	}
	if err != nil {
		return fmt.Errorf("adopt kernel tunnel %d: %w", p.ID, err)
	}
	if got := [2]uint64{kt.client.cookie, kt.up.cookie}; got != st.Cookies {
		return fmt.Errorf("adopt kernel tunnel %d: its sockets have cookies %v, the state names %v", p.ID, got, st.Cookies)
	}
	for _, c := range st.Cookies {
		if _, err := k.maps.Stats(c); err != nil {
			return fmt.Errorf("adopt kernel tunnel %d: %w", p.ID, datapath.ErrPairEnded)
		}
	}
	kt.client.sentBase, kt.up.sentBase = st.SentBase[0], st.SentBase[1]
	kt.client.folded, kt.up.folded = st.Folded[0], st.Folded[1]
	pdirs := p.Directions()
	for i, src, dst := 0, &kt.client, &kt.up; i < 2; i, src, dst = i+1, &kt.up, &kt.client {
		ds := st.Dirs[i]
		kt.dirs[i] = kernelDir{kt: kt, src: src, dst: dst, limit: ds.HeldLimit, finSeen: ds.FINDone,
			finDone: ds.FINDone, userRead: ds.UserRead, userWritten: ds.UserWritten, resumeGen: ds.ResumeGen}
		if ds.Demotions > 0 {
			kt.dirs[i].demoted = &demoted{counted: ds.Demotions}
		}
	}
	defer func() {
		if !adopted { // p as it was: its held-back bytes are its peeked bytes again
			for i := range kt.dirs {
				pdirs[i].HoldBackAgain(kt.dirs[i].heldBack)
			}
		}
	}()
	for i := range kt.dirs {
		// Bytes the other engine's relaying goroutine read and did not write: this engine's relay
		// writes them first, once the bytes redirected before them are handed on.
		kt.dirs[i].heldBack = pdirs[i].TakePeeked()
	}
	held, err := p.Hold(datapath.Sockmap, kt, func() error { return k.attachAdopted(kt) })
	switch {
	case err != nil:
		return fmt.Errorf("adopt kernel tunnel %d: %w", p.ID, err)
	case !held:
		return datapath.ErrPairEnded
	}
	adopted = true
	return nil
}

// Discard takes the sockets st names out of every map: for a kernel tunnel that no engine carries any
// more, the engine that let go of it having forgotten it, and that Adopt could not take (it ran out of
// descriptors, its epoll had no room, the pair ended). Its pair is to be ended after: closing its sockets
// would take them out of the sockhashes, not out of the state map (socks), which is keyed by cookie and
// would keep the entries for good. Not for a tunnel another engine still carries (a refusal, the old
// process keeping it): the entries are that engine's. A cookie is never reused, so an entry of another
// tunnel is never removed.
func (k *Engine) Discard(st TunnelState) error {
	err := k.maps.Remove(loader.Socket{Cookie: st.Cookies[0]}, loader.Socket{Cookie: st.Cookies[1]})
	if err != nil {
		return fmt.Errorf("discard kernel tunnel: %w", err)
	}
	return nil
}

// attachAdopted puts kt, whose sockets are in the maps already, into the loop's epoll and tables, closes
// its conns as attach does, and starts the relay of a direction the verdict demoted meanwhile. It runs
// under the pair's lock (Pair.Hold); on error nothing is left in the epoll.
func (k *Engine) attachAdopted(kt *kernelTunnel) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.enterLoop(kt); err != nil {
		return err
	}
	kt.forgetConns() // as attach does
	for i := range kt.dirs {
		d := &kt.dirs[i]
		if d.finDone {
			continue
		}
		vs, err := k.maps.Stats(d.src.cookie)
		if err == nil {
			k.countDemotionsLocked(d, vs.Demotions) // demoted while no engine held it
		}
		if len(d.heldBack) > 0 || (err == nil && (vs.Demoted || vs.Passed != d.userRead)) {
			k.startRelayLocked(d)
		}
	}
	return nil
}

// writeHeldBack writes d.heldBack, the bytes a relaying goroutine of the engine that let go of d read and
// did not write, before any other byte the relay moves, once the bytes redirected before them are handed
// on, as relayPassed writes each read. It reports whether the relay goes on; it ends it (fail) otherwise.
// Only d's relaying goroutine calls it.
func (k *Engine) writeHeldBack(d *kernelDir, dst *net.TCPConn, fail func(reason string)) bool {
	held := d.heldBack
	d.heldBack = nil
	if len(held) == 0 {
		return true
	}
	if err := k.waitHandedOn(d, dst); err != nil {
		switch {
		case errors.Is(err, errStopAsked):
			d.heldBack = held
			k.stopRelaying(d, true)
		case errors.Is(err, errTunnelEnded):
			fail("")
		default:
			fail(datapath.ReasonStalled)
		}
		return false
	}
	w, err := dst.Write(held)
	d.count(w)
	d.userWritten += uint64(w)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && k.stopAsked(d) {
		d.heldBack = held[w:]
		k.stopRelaying(d, true)
		return false
	}
	if err != nil {
		fail(datapath.Blame(d.dst.isClient, err))
		return false
	}
	if err := k.setControl(d); err != nil {
		fail(controlFailure(err))
		return false
	}
	return true
}

// CheckAdoptable says whether Adopt can take a pair of client and upstream with st: they are the sockets
// st names, and those are still in the maps (datapath.ErrPairEnded when not: the tunnel ended).
func (k *Engine) CheckAdoptable(st TunnelState, client, upstream *net.TCPConn) error {
	for i, c := range []*net.TCPConn{client, upstream} {
		var cookie uint64
		var cerr error
		if err := withFD(c, func(fd int) { cookie, cerr = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE) }); err != nil || cerr != nil {
			return fmt.Errorf("kernel tunnel: SO_COOKIE: %w", errors.Join(err, cerr))
		}
		if cookie != st.Cookies[i] {
			return fmt.Errorf("kernel tunnel: socket %d has cookie %d, the state names %d", i, cookie, st.Cookies[i])
		}
		if _, err := k.maps.Stats(cookie); err != nil {
			return fmt.Errorf("kernel tunnel: socket %d (cookie %d) is not in the maps: %w", i, cookie, datapath.ErrPairEnded)
		}
	}
	return nil
}
