package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/handover"
	"github.com/sockrelay/sockrelay/relay"
)

// adoptAnswerTimeout bounds how long the old process waits for the new one's answer to a batch of
// tunnels; past it, it tells the new one to drop the batch and carries the tunnels on itself. A variable
// for the tests, which shorten it (adoptHooks).
var adoptAnswerTimeout = 10 * time.Second

// inlinePeeked is how many peeked bytes a tunnel may carry in its batch's message; more go ahead of it
// in Data messages, so that a batch of many tunnels stays within one message's body.
const inlinePeeked = 2 << 10

// tunnelMover is the old process's side of the tunnels' handover: it parks each live userspace tunnel
// (its engine stops at a byte boundary, keeping the sockets), sends the new process its descriptors and
// state in batches, and lets go of each the new process took, carrying on those it did not.
type tunnelMover struct {
	conn     *handover.Conn
	srv      *relay.Server
	to       int // the new process
	log      *slog.Logger
	finished chan struct{} // closed once run has returned

	batch       int
	moved, kept int
	peeked      int             // bytes read and not yet written that went along with the tunnels
	tried       map[uint64]bool // tunnels offered once: one the new process refused is not offered again
}

// run hands over the movable tunnels, round after round (tunnels whose handshake was in progress when
// the listeners were let go open after the first), until no tunnel can become movable any more, or the
// new process cannot take more. Then it tells the new process it is done: once settled is closed (no
// tunnel is added here: relay.Server.Settled) and a round a tick later found none, and this process no
// longer reads the kernel events the new one shares; or once drained is closed (no tunnel is left). The
// tunnels it keeps (TLS) drain here meanwhile: the new process, which waits for Done before it may end a
// drain of its own, does not wait for them.
func (m *tunnelMover) run(settled, drained <-chan struct{}) {
	defer close(m.finished)
	defer m.conn.Close()
	m.tried = map[uint64]bool{}
	final := false // this round comes a tick after settled closed
	for rounds := 0; ; rounds++ {
		started, moved, kept, peeked := time.Now(), m.moved, m.kept, m.peeked
		n, busy, err := m.round()
		if err != nil {
			m.log.Error("upgrade: handing tunnels over stopped; the rest drain here", "pid", m.to, "err", err)
			return
		}
		if rounds == 0 || n > 0 {
			msg := "upgrade: tunnels handed over"
			if rounds > 0 {
				msg = "upgrade: more tunnels handed over" // opened by handshakes that were in progress
			}
			m.log.Info(msg, "pid", m.to, "handed_over", m.moved-moved, "kept", m.kept-kept,
				"peeked_bytes", m.peeked-peeked, "batches", m.batch, "took_ms", time.Since(started).Milliseconds())
		}
		m.srv.StopKernelEvents() // once this process holds no kernel tunnel
		if n > 0 {
			continue
		}
		if busy > 0 {
			// Not carried yet (a handshake finishing) or busy: offered again in a moment. The handshake
			// carries or ends it soon, so the upgrade waits for it rather than leave it here.
			select {
			case <-drained:
			case <-time.After(busyRetry):
			}
			continue
		}
		if isClosed(drained) || (final && !m.srv.ReadsSharedKernelEvents()) {
			_ = m.conn.Send(handover.Message{Type: handover.TypeDone, Done: &handover.Done{Tunnels: m.moved, EventsStopped: m.srv.KernelEventsStopped()}}, nil)
			return
		}
		// A tick between settled and the last round: a handshake net/http let go of (hijacked) just
		// before Shutdown returned registers its tunnel meanwhile.
		final = isClosed(settled)
		select {
		case <-drained:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// busyRetry is how long the mover waits before it offers again the tunnels a round found not carried yet
// or busy: a handshake hands its tunnel to an engine within moments of registering it.
const busyRetry = 2 * time.Millisecond

// round hands over every movable tunnel live now, in batches; n is how many it tried, busy how many of
// those it is to offer again (parkAll).
func (m *tunnelMover) round() (n, busy int, err error) {
	var todo []*relay.Tunnel
	for _, t := range m.srv.Tunnels().Tunnels() {
		if m.srv.Tunnels().CanMove(t) && !t.Parked() && !m.tried[t.ID] {
			todo = append(todo, t)
		}
	}
	for len(todo) > 0 {
		chunk := todo[:min(len(todo), handover.MaxFDs/2)]
		todo = todo[len(chunk):]
		parked, later := m.parkAll(chunk)
		n, busy = n+len(chunk)-later, busy+later
		for len(parked) > 0 {
			used, err := m.sendBatch(parked)
			if err != nil {
				if len(parked) > used {
					m.keepAll(parked[used:], err)
				}
				return n, busy, err
			}
			parked = parked[used:]
		}
	}
	return n, busy, nil
}

// parkers is how many tunnels are parked at once: an engine's stop waits for its goroutines or its
// loop's thread, and the tunnels of a batch wait for the last of them.
const parkers = 16

// parkAll parks ts, parkers at a time, and returns those parked, in ts's order; a tunnel that ended
// meanwhile, or cannot move after all, is left to drain here. One that no engine carries yet
// (datapath.ErrNotCarried: its handshake registered it and has not handed it to an engine) or that is busy
// (sockmap.ErrBusy) is offered again in a later round; busy counts them.
func (m *tunnelMover) parkAll(ts []*relay.Tunnel) (parked []*relay.ParkedTunnel, busy int) {
	out := make([]*relay.ParkedTunnel, len(ts))
	errs := make([]error, len(ts))
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(parkers, len(ts)) {
		wg.Go(func() {
			for i := range next {
				out[i], errs[i] = m.srv.Park(ts[i])
			}
		})
	}
	for i, t := range ts {
		m.tried[t.ID] = true
		next <- i
	}
	close(next)
	wg.Wait()
	for i, err := range errs {
		if errors.Is(err, sockmap.ErrBusy) || errors.Is(err, datapath.ErrNotCarried) {
			delete(m.tried, ts[i].ID)
			busy++
		}
	}
	return slices.DeleteFunc(out, func(pt *relay.ParkedTunnel) bool { return pt == nil }), busy
}

// batchBody is how much of a message's body a batch fills at most: the rest is the envelope's.
const batchBody = handover.MaxBody - 4<<10

// sendBatch hands over the first of the parked tunnels that fit one message, and lets go of those the
// new process took; it returns how many of parked it used.
func (m *tunnelMover) sendBatch(parked []*relay.ParkedTunnel) (int, error) {
	m.batch++
	batch := &handover.Tunnels{Batch: m.batch}
	var sent []*relay.ParkedTunnel
	var files []*os.File
	defer func() { closeAllFiles(files) }()
	size, used := 0, 0
	for _, pt := range parked {
		if len(files)+2 > handover.MaxFDs || size >= batchBody-2*inlinePeeked*4/3-1024 {
			break
		}
		used++
		desc, fs, err := m.describe(pt, len(files))
		if err != nil {
			m.srv.Resume(pt)
			m.log.Warn("upgrade: tunnel kept here", "id", pt.T.ID, "err", err)
			m.kept++
			continue
		}
		b, _ := json.Marshal(desc)
		size += len(b)
		batch.Tunnels = append(batch.Tunnels, desc)
		sent = append(sent, pt)
		files = append(files, fs...)
	}
	if len(sent) == 0 {
		return used, nil
	}
	parked = sent
	err := m.conn.Send(handover.Message{Type: handover.TypeTunnels, Tunnels: batch}, files)
	if err != nil {
		m.keepAll(parked, err)
		return used, err
	}
	results, err := m.awaitAdopted(batch.Batch)
	if err != nil {
		if !peerGone(err) {
			// It may still adopt them: it must drop them instead, as it reads this before anything else.
			_ = m.conn.Send(handover.Message{Type: handover.TypeCommit, Commit: &handover.Commit{Batch: batch.Batch, Abort: true}}, nil)
		}
		m.keepAll(parked, err)
		return used, err
	}
	if err := m.conn.Send(handover.Message{Type: handover.TypeCommit, Commit: &handover.Commit{Batch: batch.Batch}}, nil); err != nil {
		m.keepAll(parked, err) // the new process is gone before it carried any of them
		return used, err
	}
	for _, pt := range parked {
		r, ok := results[pt.T.ID]
		if !ok || r.Error != "" {
			m.srv.Resume(pt)
			m.kept++
			m.log.Warn("upgrade: the new process did not adopt the tunnel; it stays here", "id", pt.T.ID,
				"pid", m.to, "err", r.Error)
			continue
		}
		m.srv.HandedOver(pt)
		m.moved++
		m.peeked += len(pt.State.Peeked[0]) + len(pt.State.Peeked[1])
	}
	return used, nil
}

// describe is the parked tunnel's entry in a batch whose descriptors so far are nfds; its peeked bytes
// beyond inlinePeeked go ahead in Data messages.
func (m *tunnelMover) describe(pt *relay.ParkedTunnel, nfds int) (handover.Tunnel, []*os.File, error) {
	t := pt.T
	up, down := pt.State.ToUpstream, pt.State.ToClient
	desc := handover.Tunnel{ID: t.ID, Client: t.ClientAddr, Upstream: t.UpstreamAddr, Pool: t.Pool,
		Listener: t.Listener, Datapath: string(pt.Datapath), Started: t.Started, LastActive: pt.LastActive,
		HalfClosedAt: pt.State.HalfClosedAt, HalfClosedTimeout: pt.HalfClosedTimeout, ToUpstream: up,
		ToClient: down, Finished: pt.State.Finished, Peeked: pt.State.Peeked, ClientFD: nfds, UpstreamFD: nfds + 1,
		URI: pt.URI, Host: pt.Host, UserAgent: pt.UserAgent, ClientIP: pt.ClientIP}
	if len(desc.Peeked[0])+len(desc.Peeked[1]) > inlinePeeked {
		for dir, b := range desc.Peeked {
			for len(b) > 0 {
				chunk := b[:min(len(b), handover.MaxData)]
				b = b[len(chunk):]
				d := &handover.Data{ID: t.ID, Dir: dir, Bytes: chunk}
				if err := m.conn.Send(handover.Message{Type: handover.TypeData, Data: d}, nil); err != nil {
					return handover.Tunnel{}, nil, err
				}
			}
		}
		desc.Peeked = [2][]byte{}
	}
	if pt.Kernel != nil {
		desc.Kernel, _ = json.Marshal(pt.Kernel)
	}
	client, upstream, err := pt.Files()
	if err != nil {
		return handover.Tunnel{}, nil, err
	}
	return desc, []*os.File{client, upstream}, nil
}

// awaitAdopted waits for the new process's answer to the batch.
func (m *tunnelMover) awaitAdopted(batch int) (map[uint64]handover.AdoptResult, error) {
	_ = m.conn.SetDeadline(time.Now().Add(adoptAnswerTimeout))
	defer m.conn.SetDeadline(time.Time{})
	msg, files, err := m.conn.Receive()
	closeAllFiles(files)
	if err != nil {
		return nil, err
	}
	if msg.Type != handover.TypeAdopted || msg.Adopted.Batch != batch {
		return nil, fmt.Errorf("the new process answered %q for batch %d, want %q for batch %d", msg.Type,
			batchOf(msg), handover.TypeAdopted, batch)
	}
	out := make(map[uint64]handover.AdoptResult, len(msg.Adopted.Results))
	for _, r := range msg.Adopted.Results {
		out[r.ID] = r
	}
	return out, nil
}

func batchOf(m handover.Message) int {
	if m.Adopted != nil {
		return m.Adopted.Batch
	}
	return 0
}

// keepAll carries on here every tunnel of a batch the new process did not take.
func (m *tunnelMover) keepAll(parked []*relay.ParkedTunnel, why error) {
	for _, pt := range parked {
		m.srv.Resume(pt)
	}
	m.kept += len(parked)
	m.log.Warn("upgrade: the new process did not take a batch of tunnels; they stay here", "pid", m.to,
		"tunnels", len(parked), "err", why)
}

// adopter is the new process's side: it adopts each tunnel the old process sends, answers per batch,
// and carries the batch's tunnels once the old process has let go of them.
type adopter struct {
	conn *handover.Conn
	srv  *relay.Server
	from int
	log  *slog.Logger
}

// run takes tunnels until the old process is done or gone.
func (a *adopter) run() {
	defer a.conn.Close()
	data := map[uint64]*[2][]byte{}
	prepared := map[int][]*relay.Tunnel{}
	adopted := 0
	failFor := adoptHooks.refuse
	if failFor == nil {
		failFor = func(uint64) bool { return false }
	}
	for {
		m, files, err := a.conn.Receive()
		if err != nil {
			// The old process is gone (or broke off) without settling these: it cannot carry them.
			for _, ts := range prepared {
				for _, t := range ts {
					a.srv.CarryAdopted(t)
				}
			}
			if !errors.Is(err, os.ErrClosed) && !peerGone(err) {
				a.log.Warn("upgrade: the old process's handover of tunnels broke off", "pid", a.from, "err", err)
			}
			go unshareWhenGone(a.srv, a.from, a.log) // it may still read mode events until it exits
			return
		}
		switch m.Type {
		case handover.TypeData:
			d := data[m.Data.ID]
			if d == nil {
				d = &[2][]byte{}
				data[m.Data.ID] = d
			}
			d[m.Data.Dir] = append(d[m.Data.Dir], m.Data.Bytes...)
		case handover.TypeTunnels:
			if adoptHooks.crashOnBatch {
				os.Exit(3) // the test hook: a new process that dies with a batch in hand
			}
			ts, results := a.adopt(m.Tunnels, files, data, failFor)
			prepared[m.Tunnels.Batch] = ts
			if adoptHooks.neverAnswer {
				continue // the test hook: a new process that never answers a batch
			}
			ans := handover.Message{Type: handover.TypeAdopted, Adopted: &handover.Adopted{Batch: m.Tunnels.Batch, Results: results}}
			if err := a.conn.Send(ans, nil); err != nil {
				a.log.Warn("upgrade: could not answer the old process", "pid", a.from, "err", err)
			}
		case handover.TypeCommit:
			for _, t := range prepared[m.Commit.Batch] {
				if m.Commit.Abort {
					a.srv.DropAdopted(t)
				} else {
					a.srv.CarryAdopted(t)
					adopted++
				}
			}
			delete(prepared, m.Commit.Batch)
		case handover.TypeDone:
			a.log.Info("upgrade: tunnels adopted from the old process", "pid", a.from, "tunnels", adopted)
			if m.Done.EventsStopped {
				a.srv.UnshareKernel() // the old process reads no more mode events
			} else {
				go unshareWhenGone(a.srv, a.from, a.log) // it still reads them, for the tunnels it kept
			}
			return
		default:
			closeAllFiles(files)
			a.log.Warn("upgrade: unexpected message from the old process", "pid", a.from, "type", m.Type)
		}
	}
}

// adopt registers a batch's tunnels, not carried yet; results says per tunnel whether it was taken.
func (a *adopter) adopt(b *handover.Tunnels, files []*os.File, data map[uint64]*[2][]byte, failFor func(uint64) bool) ([]*relay.Tunnel, []handover.AdoptResult) {
	var ts []*relay.Tunnel
	results := make([]handover.AdoptResult, 0, len(b.Tunnels))
	for _, d := range b.Tunnels {
		peeked := d.Peeked
		if pre := data[d.ID]; pre != nil {
			peeked = [2][]byte{append(pre[0], peeked[0]...), append(pre[1], peeked[1]...)}
			delete(data, d.ID)
		}
		client, upstream := files[d.ClientFD], files[d.UpstreamFD]
		if failFor(d.ID) {
			client.Close()
			upstream.Close()
			results = append(results, handover.AdoptResult{ID: d.ID, Error: "refused by the test hook"})
			continue
		}
		kernel, err := kernelStateOf(d)
		if err != nil {
			client.Close()
			upstream.Close()
			results = append(results, handover.AdoptResult{ID: d.ID, Error: err.Error()})
			continue
		}
		t, err := a.srv.Adopt(relay.Adoption{ID: d.ID, Kernel: kernel, ClientAddr: d.Client, UpstreamAddr: d.Upstream, Pool: d.Pool,
			Listener: d.Listener, Datapath: relay.Datapath(d.Datapath), Started: d.Started, LastActive: d.LastActive,
			HalfClosedTimeout: d.HalfClosedTimeout, Client: client, Upstream: upstream, URI: d.URI, Host: d.Host,
			UserAgent: d.UserAgent, ClientIP: d.ClientIP,
			State: stateOf(d, peeked)})
		if err != nil {
			results = append(results, handover.AdoptResult{ID: d.ID, Error: err.Error()})
			continue
		}
		ts = append(ts, t)
		results = append(results, handover.AdoptResult{ID: d.ID, NewID: t.ID})
	}
	return ts, results
}

// kernelStateOf is the kernel engine's state of a handed-over kernel tunnel; nil for another.
func kernelStateOf(d handover.Tunnel) (*sockmap.TunnelState, error) {
	if len(d.Kernel) == 0 {
		return nil, nil
	}
	var st sockmap.TunnelState
	if err := json.Unmarshal(d.Kernel, &st); err != nil {
		return nil, fmt.Errorf("kernel tunnel %d: its engine state: %w", d.ID, err)
	}
	return &st, nil
}

// stateOf is the datapath state of a handed-over tunnel, its peeked bytes whole.
func stateOf(d handover.Tunnel, peeked [2][]byte) datapath.State {
	return datapath.State{Peeked: peeked, Finished: d.Finished, ToUpstream: d.ToUpstream, ToClient: d.ToClient,
		HalfClosedAt: d.HalfClosedAt, LastActive: d.LastActive}
}

// adoptHooks are set only by the tests, in the relay processes they start (TestMain): refuse makes a new
// process refuse the handed-over tunnels it names, crashOnBatch makes it exit when the first batch
// arrives, neverAnswer makes it adopt a batch and never answer, so that the tests see the old process
// keep what the new one does not adopt.
var adoptHooks struct {
	refuse       func(id uint64) bool
	crashOnBatch bool
	neverAnswer  bool
}
