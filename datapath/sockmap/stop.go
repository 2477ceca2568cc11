package sockmap

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
)

// Giving a kernel pair back alive (docs/datapath.md, "How a kernel pair is given back"): kernelTunnel is a
// datapath.Stopper, so datapath.Move and Pair.Park can take a pair off sockmap. The order is what keeps
// every byte:
//
//  1. The tunnel leaves the loop's epoll and tables: from here on the engine carries no FIN and starts no
//     relaying goroutine for it; a FIN it carried already becomes the pair's (Direction.MarkFinished).
//  2. Each relaying goroutine is asked to stop at a byte boundary; a write it had not finished is kept.
//  3. Both sources' receive low-water mark is raised, so that TCP stops running the verdict for new bytes
//     (holdVerdict); every byte the verdict passed is read out of its source's psock, with the verdict
//     still attached, and then both sockets leave the verdict map only (StopVerdict): the verdict stops,
//     and new bytes stay in each source's receive queue, behind every byte it redirected or passed.
//     Passed bytes must be read first, because a socket out of the verdict map reads its psock's queue
//     without advancing TCP's copied_seq, and TCP then never finds the bytes after them; and a psock
//     dropped with bytes queued purges them (skmsg.c, sk_psock_destroy). A read that finds new bytes
//     waiting under the hold gets EAGAIN (tcp_bpf_recvmsg_parser), so the engine runs the verdict over
//     them first (runVerdictNow). A byte passed between the last read and StopVerdict puts the verdict
//     back (RestartVerdict) and this step runs again. A direction that would hold more than
//     giveBackHeldLimit (a sender that outruns the reads, or a reader that stopped) is not read
//     further: the give-back is refused with ErrBusy, and the tunnel rejoins the engine as it was
//     (rejoin).
//  4. The engine waits until every redirected byte has entered its destination's send queue: the sockets
//     stay targets meanwhile, so redirected bytes still on their way through a psock are still sent.
//  5. Under the pair's lock, the sockets leave the remaining maps and the pair gets new conns of them; the
//     bytes read in 2 and 3 become its peeked bytes, which the next engine writes first, before what it
//     reads from the receive queues.

var _ datapath.Stopper = (*kernelTunnel)(nil)

// Stop gives the pair back alive (datapath.Stopper); see stopAlive.
func (kt *kernelTunnel) Stop() error { return kt.stopAlive() }

// ErrBusy is returned for a pair the kernel engine cannot give back or let go of now, and which is left as
// it is: it may be given back later, once what kept it busy is over (a handshake finishing, a give-back
// under way, a half-closed pair's demoted direction).
var ErrBusy = errors.New("sockmap: the pair is busy; try again later")

// errStopping is returned by a second stopAlive or LetGo while the first runs.
var errStopping = fmt.Errorf("the kernel engine is giving this pair back already: %w", ErrBusy)

// stopAlive gives the pair back alive with every byte the engine took written or kept as peeked bytes. A pair
// that ends meanwhile gives ErrPairEnded. One that cannot be given back (a stall, no descriptor left for
// its new conns) is ended, reset, since it has left the verdict: its error says why.
func (kt *kernelTunnel) stopAlive() error {
	k, p := kt.k, kt.p
	if err := k.refuseHalfClosedPassing(kt); err != nil {
		return err
	}
	relays, err := k.leaveLoop(kt)
	switch {
	case errors.Is(err, datapath.ErrPairEnded), errors.Is(err, errStopping):
		return err
	case err != nil:
		// Out of the loop, it would not be watched: it ends rather than hang.
		p.Fail(datapath.ReasonKernelError, err, true)
		return fmt.Errorf("give the kernel pair back: %w", err)
	}
	for _, done := range relays {
		select {
		case <-done:
		case <-p.Done():
			return datapath.ErrPairEnded
		}
	}
	if k.hooks.beforeSettle != nil {
		k.hooks.beforeSettle(kt)
	}
	held, err := k.settleStopped(kt)
	if errors.Is(err, errHeldLimit) {
		if err = k.rejoin(kt, held); err == nil {
			return fmt.Errorf("give the kernel pair back: %w", errHeldLimit)
		}
	}
	if err == nil {
		err = kt.giveBack(held)
	}
	if (errors.Is(err, errTunnelEnded) || errors.Is(err, datapath.ErrPairEnded)) && k.ending(kt) {
		<-p.Done()
		return datapath.ErrPairEnded
	}
	if err != nil {
		p.Fail(datapath.ReasonKernelError, err, true)
		return fmt.Errorf("give the kernel pair back: %w", err)
	}
	return nil
}

// refuseHalfClosedPassing refuses, with ErrBusy, to give back a pair a direction of which has its
// verdict passing bytes (demoted, or passed bytes not relayed yet) while its source's write side is shut
// (the engine carried the other direction's FIN: FIN_WAIT1/2) and it has not received a FIN itself. Bytes
// passed to such a source between the last read of step 3 and StopVerdict could not be read in order: TCP
// refuses to put a socket that is not ESTABLISHED back into the verdict map. Most passed bytes come while
// a direction is demoted, so the pair stays on sockmap until it is not.
func (k *Engine) refuseHalfClosedPassing(kt *kernelTunnel) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return datapath.ErrPairEnded
	}
	for i := range kt.dirs {
		d := &kt.dirs[i]
		if d.finDone {
			continue
		}
		state, err := tcpState(d.src.fd)
		if err != nil || state == unix.BPF_TCP_ESTABLISHED || finReceived(state) {
			continue // an error is the end's, which the give-back finds
		}
		st, err := k.maps.Stats(d.src.cookie)
		if d.relaying || (err == nil && (st.Demoted || st.Passed != d.userRead)) {
			return fmt.Errorf("give the kernel pair back: a direction is demoted while its source is half-closed: %w", ErrBusy)
		}
	}
	return nil
}

// tcpState is the TCP state of the socket fd (include/net/tcp_states.h).
func tcpState(fd int) (uint8, error) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("TCP_INFO: %w", err)
	}
	return info.State, nil
}

// finReceived reports whether a socket in TCP state has received its peer's FIN: CLOSE_WAIT, LAST_ACK,
// CLOSING, TIME_WAIT or CLOSE. FIN_WAIT1 and FIN_WAIT2 have sent one and not received one.
func finReceived(state uint8) bool {
	switch state {
	case unix.BPF_TCP_CLOSE_WAIT, unix.BPF_TCP_LAST_ACK, unix.BPF_TCP_CLOSING, unix.BPF_TCP_TIME_WAIT, unix.BPF_TCP_CLOSE:
		return true
	}
	return false
}

// ending reports whether kt's pair is ending: released (its End runs), or the pair says so. errTunnelEnded
// also comes from a verdict lookup or a socket query that failed while kt was held: then the pair is not
// ending by itself, and waiting for its end would wait forever.
func (k *Engine) ending(kt *kernelTunnel) bool {
	k.mu.Lock()
	released := kt.released
	k.mu.Unlock()
	return released || kt.p.Ending()
}

// leaveLoop takes kt out of the loop's epoll and tables and asks its relaying goroutines to stop, whose
// done channels it returns (steps 1 and 2 of stopAlive).
func (k *Engine) leaveLoop(kt *kernelTunnel) ([]chan struct{}, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch {
	case kt.released:
		return nil, datapath.ErrPairEnded
	case kt.stopping:
		return nil, errStopping
	}
	kt.stopping = true
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		_ = unix.EpollCtl(k.epfd, unix.EPOLL_CTL_DEL, s.fd, nil)
		delete(k.socks, s.cookie)
	}
	k.drain = slices.DeleteFunc(k.drain, func(d *kernelDir) bool { return d.kt == kt })
	var relays []chan struct{}
	for i := range kt.dirs {
		d := &kt.dirs[i]
		if !d.relaying {
			continue
		}
		d.stop = true
		relays = append(relays, d.relayDone)
		if d.srcConn != nil {
			// Wakes it in its read or its write; relayPassed sets no deadline once stop is set.
			_ = d.srcConn.SetDeadline(time.Now())
			_ = d.dstConn.SetDeadline(time.Now())
		}
	}
	return relays, nil
}

// stopSettleGap is how long the engine waits after StopVerdict before it trusts the verdict's counters: a
// verdict run that began before may still be counting an skb. It is also how long the counters must stay
// the same, every redirected byte handed on, before the sockets leave the maps.
const stopSettleGap = 2 * time.Millisecond

// passedRereads bounds how often one round of readAllPassed reads a source again for bytes that its own
// reads had the verdict pass (readPassedOut), so that a sender that never pauses cannot keep it, and k.mu,
// for long.
const passedRereads = 4

// stopVerdictTries bounds how often step 3 of stopAlive runs again for bytes passed during it.
const stopVerdictTries = 100

// giveBackHeldLimit bounds the bytes of a direction that a give-back holds in memory (the pair's peeked
// bytes once given back): a relaying goroutine's unwritten bytes, and the passed bytes read in step 3. A
// sender that keeps its source's window full has the verdict pass its bytes however the hold is set
// (tcp_data_ready calls data_ready once the window left is under an MSS, whatever the low-water mark),
// and every read of them opens the window again, so without a bound a give-back of a demoted bulk
// direction read tens of MB (docs/datapath.md, "How a kernel pair is given back"). It is an absolute
// bound: one relative to the passed bytes unread as the hold began let retried give-backs hold 30 MB, the
// sender filling the window between them.
const giveBackHeldLimit = 8 << 20

// errHeldLimit is returned by step 3 of stopAlive when a direction has more than giveBackHeldLimit bytes
// to hold while the sockets are all in the verdict map: the pair stays on sockmap (rejoin).
var errHeldLimit = fmt.Errorf("a direction has more than %d bytes passed for the give-back to hold: %w", giveBackHeldLimit, ErrBusy)

// noHeldLimit is readAllPassed's limit where it reads every passed byte, however many.
var noHeldLimit = [2]int{math.MaxInt, math.MaxInt}

// settleStopped runs steps 3 and 4 of stopAlive. It returns, per direction, the bytes read and not written: a
// stopped goroutine's, then the passed ones.
func (k *Engine) settleStopped(kt *kernelTunnel) ([2][]byte, error) {
	var held [2][]byte
	for i := range kt.dirs {
		held[i], kt.dirs[i].heldBack = kt.dirs[i].heldBack, nil
	}
	err := k.stopVerdict(kt, &held)
	if err == nil {
		err = k.awaitHandedOn(kt)
	}
	if k.hooks.afterSettle != nil {
		k.hooks.afterSettle(held)
	}
	return held, err
}

// stopVerdict reads every passed byte of kt into held and takes kt's sockets out of the verdict map,
// again while bytes were passed meanwhile (step 3 of stopAlive). While both sources are in the verdict
// map it holds no more than giveBackHeldLimit bytes of a direction: errHeldLimit past it.
func (k *Engine) stopVerdict(kt *kernelTunnel, held *[2][]byte) error {
	socks := [2]loader.Socket{{Cookie: kt.client.cookie}, {Cookie: kt.up.cookie}} // by cookie: StopVerdict needs no descriptor
	if err := k.holdVerdict(kt); err != nil {
		return err
	}
	limit := [2]int{giveBackHeldLimit, giveBackHeldLimit}
	inVerdict := []int{0, 1} // the directions whose source is in the verdict map
	for range stopVerdictTries {
		err := k.readAllPassed(kt, held, limit)
		if errors.Is(err, errHeldLimit) {
			// Refused only with every source back in the verdict map, as the pair was. One that cannot
			// go back (it got its FIN) leaves the give-back to finish, unbounded.
			err = k.restartVerdict(kt, slices.DeleteFunc([]int{0, 1}, func(i int) bool { return slices.Contains(inVerdict, i) }))
			if err == nil {
				return errHeldLimit
			}
			if errors.Is(err, unix.EOPNOTSUPP) {
				limit = noHeldLimit
				err = k.readAllPassed(kt, held, limit)
			}
		}
		if err != nil {
			return err
		}
		unread, err := k.passedUnread(kt)
		if err != nil {
			return err
		}
		if unread[0] || unread[1] {
			continue // passed while the last were read
		}
		closing, halfClosed, err := k.sourcesClosing(kt)
		if err != nil {
			return err
		}
		if err := k.maps.StopVerdict(socks[:]...); err != nil {
			return err
		}
		inVerdict = nil
		time.Sleep(stopSettleGap)
		if unread, err = k.passedUnread(kt); err != nil {
			return err
		}
		// A source that had its FIN before StopVerdict had the verdict run over its whole receive queue
		// (TCP calls data_ready at a FIN whatever the low-water mark): its passed bytes are the last of
		// its stream, and may be read with the verdict stopped. Any other passed bytes need the verdict
		// back to be read in order.
		var again []int
		for i, u := range unread {
			switch {
			case !u || closing[i]:
			case halfClosed[i]:
				// It cannot go back into the verdict map (not ESTABLISHED), and read now its passed bytes
				// would leave the bytes behind them unreadable: reset rather than stall.
				return fmt.Errorf("bytes were passed to a half-closed source after its verdict stopped; they cannot be read in order")
			default:
				again = append(again, i)
			}
		}
		if len(again) == 0 {
			return k.readAllPassed(kt, held, noHeldLimit) // a FIN's last bytes, with the verdict stopped
		}
		err = k.restartVerdict(kt, again)
		if errors.Is(err, unix.EOPNOTSUPP) {
			// The source got its FIN since (sock_map_sk_state_allowed refuses it): most likely its
			// data_ready ran the verdict over the whole queue before StopVerdict, as above. Were it
			// after, the bytes behind the passed ones would stay unreadable to the next engine
			// (tcp_recvmsg_locked warns "TCP recvmsg seq # bug"); not seen in the move tests.
			_ = k.maps.StopVerdict(socks[:]...)
			return k.readAllPassed(kt, held, noHeldLimit)
		}
		if err != nil {
			return err
		}
		inVerdict = again
	}
	return fmt.Errorf("bytes kept being passed while the verdict was stopped, %d times", stopVerdictTries)
}

// restartVerdict puts the sources of kt's directions dirs back into the verdict map (RestartVerdict), under
// k.mu and only while kt has not been released: the map takes the socket by descriptor, and a released
// tunnel's descriptor numbers may name other sockets already, which would enter the map under its cookie.
func (k *Engine) restartVerdict(kt *kernelTunnel, dirs []int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return errTunnelEnded
	}
	socks := make([]loader.Socket, 0, len(dirs))
	for _, i := range dirs {
		src := kt.dirs[i].src
		socks = append(socks, loader.Socket{FD: src.fd, Cookie: src.cookie})
	}
	return k.maps.RestartVerdict(socks...)
}

// sourcesClosing reports, per direction of kt, whether its source has received its peer's FIN (closing),
// and whether it has sent one without receiving one (halfClosed: FIN_WAIT1/2, the engine carried the other
// direction's FIN into it): such a source cannot go back into the verdict map.
func (k *Engine) sourcesClosing(kt *kernelTunnel) (closing, halfClosed [2]bool, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return closing, halfClosed, errTunnelEnded
	}
	for i := range kt.dirs {
		state, err := tcpState(kt.dirs[i].src.fd)
		if err != nil {
			return closing, halfClosed, err
		}
		closing[i] = finReceived(state)
		halfClosed[i] = !closing[i] && state != unix.BPF_TCP_ESTABLISHED
	}
	return closing, halfClosed, nil
}

// holdVerdict keeps the verdict from running on kt's sources while the engine reads their passed bytes
// and takes them out of the verdict map: with a receive low-water mark that the queue does not reach, TCP
// does not call data_ready (tcp_data_ready), which is what runs the verdict, so a source's new bytes wait
// in its receive queue, behind every byte the verdict has seen. Reads of passed bytes open the source's
// window and the sender goes on; without the hold the verdict would pass its new bytes faster than they
// can be read before StopVerdict. TCP still calls data_ready at a FIN, under memory pressure or near a
// full window (tcp_epollin_ready); stopVerdict catches a byte passed then. While new bytes wait in the
// receive queue, passed bytes cannot be read (readPassedOut). tcp_set_rcvlowat also raises the receive
// buffer and the window clamp; detach gives the clamp and the low-water mark back. The caller holds
// nothing.
func (k *Engine) holdVerdict(kt *kernelTunnel) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return errTunnelEnded
	}
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		clamp, err := unix.GetsockoptInt(s.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP)
		if err != nil {
			return fmt.Errorf("TCP_WINDOW_CLAMP: %w", err)
		}
		if err := unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, math.MaxInt32); err != nil {
			return fmt.Errorf("SO_RCVLOWAT: %w", err)
		}
		s.clampWas = int32(clamp)
	}
	return nil
}

// releaseVerdictHold gives kt's sockets the receive low-water mark and window clamp they had before
// holdVerdict. The caller holds k.mu, and the sockets are out of the maps.
func (kt *kernelTunnel) releaseVerdictHold() {
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		if s.clampWas == 0 {
			continue
		}
		_ = unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
		_ = unix.SetsockoptInt(s.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, int(s.clampWas))
		s.clampWas = 0
	}
}

// rejoin puts kt back on the kernel engine as it was before stopAlive began, for a give-back refused with
// errHeldLimit, its sources back in the verdict map: they get their low-water mark and window clamp back
// (which runs the verdict over the bytes that waited under the hold), the tunnel re-enters the loop's epoll
// and tables, a FIN seen and not carried is drained again, and each direction's bytes read and not
// written (held) go first on a relaying goroutine (writeHeldBack), started for a direction with bytes held
// or passed. On error (the tunnel ended, or the epoll refused it) the caller ends the pair.
func (k *Engine) rejoin(kt *kernelTunnel, held [2][]byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return errTunnelEnded
	}
	kt.releaseVerdictHold()
	if err := k.enterLoop(kt); err != nil {
		return err
	}
	kt.stopping = false
	now := time.Now()
	for i := range kt.dirs {
		d := &kt.dirs[i]
		d.stop = false
		d.heldBack = held[i]
		if d.finDone {
			continue
		}
		if d.finSeen {
			d.watchDrain(now)
			k.drain = append(k.drain, d)
		}
		st, err := k.maps.Stats(d.src.cookie)
		if len(d.heldBack) > 0 || (err == nil && (st.Demoted || st.Passed != d.userRead)) {
			k.startRelayLocked(d)
		}
	}
	return nil
}

// readAllPassed reads into held every byte the verdict has passed to kt's sources so far, waiting for those
// still on their way through a psock's backlog. It holds no more than limit[i] bytes of direction i: a
// direction with passed bytes beyond it is errHeldLimit. Passed bytes that stay unreadable for
// stallTimeout, none read meanwhile and no socket of kt with bytes left to send, are an error: the pair is
// reset rather than left waiting. Bytes left to send are a slow reader's, which passed bytes can wait behind (they wait in
// the source's psock behind the bytes redirected into the source), as awaitHandedOn waits for it.
func (k *Engine) readAllPassed(kt *kernelTunnel, held *[2][]byte, limit [2]int) error {
	interval := handedOnFirstCheck
	lastRead, lastMove := kt.dirs[0].userRead+kt.dirs[1].userRead, time.Now()
	for {
		unread, err := k.readPassedRound(kt, held, limit)
		if err != nil || !unread {
			return err
		}
		now := time.Now()
		if read := kt.dirs[0].userRead + kt.dirs[1].userRead; read != lastRead {
			lastRead, lastMove, interval = read, now, handedOnFirstCheck
		} else if now.Sub(lastMove) > stallTimeout && !k.anyUnsent(kt) {
			return errors.New("passed bytes did not become readable")
		}
		select {
		case <-kt.p.Done():
			return errTunnelEnded
		case <-time.After(interval):
		}
		interval = min(2*interval, handedOnMaxCheck)
	}
}

// anyUnsent reports whether a socket of kt still has bytes to send (hasUnsent), under k.mu so that a
// release cannot close the descriptors meanwhile; false once released.
func (k *Engine) anyUnsent(kt *kernelTunnel) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return !kt.released && (hasUnsent(kt.client.fd) || hasUnsent(kt.up.fd))
}

// readPassedRound reads what kt's sources hold of their passed bytes into held, under k.mu so that a
// release cannot close the descriptors meanwhile, and reports whether passed bytes are still to come;
// errHeldLimit past limit[i] bytes of direction i.
func (k *Engine) readPassedRound(kt *kernelTunnel, held *[2][]byte, limit [2]int) (anyUnread bool, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return false, errTunnelEnded
	}
	for i := range kt.dirs {
		d := &kt.dirs[i]
		var unread bool
		for range passedRereads {
			st, err := k.maps.Stats(d.src.cookie)
			switch {
			case err != nil:
				return false, errTunnelEnded
			case st.Broken:
				return false, errBroken
			}
			ranVerdict, err := readPassedOut(d, st.Passed, &held[i], limit[i])
			if err != nil {
				return false, err
			}
			unread = d.userRead < st.Passed
			if !ranVerdict || unread {
				break
			}
			// The verdict ran over new bytes and may have passed some: they are read now too.
		}
		anyUnread = anyUnread || unread
	}
	return anyUnread, nil
}

// passedUnread reports, per direction of kt, whether its source has passed bytes not read yet.
func (k *Engine) passedUnread(kt *kernelTunnel) ([2]bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var unread [2]bool
	if kt.released {
		return unread, errTunnelEnded
	}
	for i := range kt.dirs {
		st, err := k.maps.Stats(kt.dirs[i].src.cookie)
		if err != nil {
			return unread, errTunnelEnded
		}
		unread[i] = kt.dirs[i].userRead != st.Passed
	}
	return unread, nil
}

// readPassedOut reads from d's source, nonblocking, until every one of the passed bytes is read, appending
// them to held. With the verdict attached the source's reads come from its psock's queue, where passed
// bytes wait (tcp_bpf_recvmsg_parser). Each read asks for all the bytes still to come, so that most often
// one read takes them all, before the window it opens lets new bytes in. A read that finds new bytes in
// the receive queue under holdVerdict's low-water mark returns EAGAIN: the low-water mark is lowered and
// raised again, which runs the verdict over them (tcp_set_rcvlowat calls tcp_data_ready), once per call;
// ranVerdict says it did. It reads no more than held has room for under limit: errHeldLimit when passed
// bytes are left beyond it. The caller holds k.mu.
func readPassedOut(d *kernelDir, passed uint64, held *[]byte, limit int) (ranVerdict bool, err error) {
	for d.userRead < passed {
		want := int(min(passed-d.userRead, uint64(max(limit-len(*held), 0))))
		if want == 0 {
			return ranVerdict, errHeldLimit
		}
		*held = slices.Grow(*held, want)
		n, err := unix.Read(d.src.fd, (*held)[len(*held):len(*held)+want])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN && !ranVerdict:
			ranVerdict = true
			if err := runVerdictNow(d.src.fd); err != nil {
				return ranVerdict, err
			}
			continue
		case err == unix.EAGAIN:
			return ranVerdict, nil // still on its way through the psock's backlog
		case err != nil:
			return ranVerdict, fmt.Errorf("read passed bytes: %w", err)
		case n == 0:
			return ranVerdict, nil // the FIN, read before passed bytes still in the backlog
		}
		*held = (*held)[:len(*held)+n]
		d.userRead += uint64(n)
	}
	return ranVerdict, nil
}

// runVerdictNow runs the verdict of the socket fd over what waits in its receive queue, under
// holdVerdict's low-water mark, and puts the mark back.
func runVerdictNow(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1); err != nil {
		return fmt.Errorf("SO_RCVLOWAT: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, math.MaxInt32); err != nil {
		return fmt.Errorf("SO_RCVLOWAT: %w", err)
	}
	return nil
}

// awaitHandedOn waits until every byte the verdict redirected for kt has entered its destination's send
// queue, the counters unchanged for stopSettleGap (step 4 of stopAlive). It fails as waitHandedOn does when the
// bytes stop moving while the destination has nothing left to send.
func (k *Engine) awaitHandedOn(kt *kernelTunnel) error {
	var settledMark, lastMark uint64
	var settledAt time.Time
	lastMove, interval := time.Now(), handedOnFirstCheck
	for {
		mark, done, busy, err := k.handedOnRound(kt)
		if err != nil {
			return err
		}
		now := time.Now()
		switch {
		case !done:
			settledAt = time.Time{}
		case settledAt.IsZero() || mark != settledMark:
			settledAt, settledMark = now, mark
		case now.Sub(settledAt) >= stopSettleGap:
			return nil
		}
		switch {
		case mark != lastMark:
			lastMark, lastMove, interval = mark, now, handedOnFirstCheck
		case now.Sub(lastMove) > stallTimeout && !busy:
			return errors.New("redirected bytes stopped short of their destination")
		default:
			interval = min(2*interval, handedOnMaxCheck)
		}
		if done {
			interval = min(interval, stopSettleGap)
		}
		select {
		case <-kt.p.Done():
			return errTunnelEnded
		case <-time.After(interval):
		}
	}
}

// handedOnRound is one check of awaitHandedOn, under k.mu so that a release cannot close the descriptors
// meanwhile: a mark that moves with every byte, whether every redirected byte is handed on, and whether a
// destination still has bytes to send.
func (k *Engine) handedOnRound(kt *kernelTunnel) (mark uint64, done, busy bool, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return 0, false, false, errTunnelEnded
	}
	done = true
	for i := range kt.dirs {
		d := &kt.dirs[i]
		st, handed, err := k.dirProgress(d, d.dst.fd)
		switch {
		case err != nil:
			return 0, false, false, errTunnelEnded
		case st.Broken:
			return 0, false, false, errBroken
		}
		done = done && handed >= st.Bytes
		busy = busy || hasUnsent(d.dst.fd)
		mark += st.Bytes + handed
	}
	return mark, done, busy, nil
}

// giveBack makes new conns of kt's sockets and hands them to the pair with held as peeked bytes, taking
// the sockets out of the remaining maps under the pair's lock (step 5 of stopAlive).
func (kt *kernelTunnel) giveBack(held [2][]byte) error {
	k := kt.k
	k.mu.Lock()
	if kt.released {
		k.mu.Unlock()
		return errTunnelEnded
	}
	if reason, err := kt.resetSide(); err != nil {
		k.mu.Unlock()
		kt.p.Fail(reason, err, true)
		return datapath.ErrPairEnded
	}
	client, err := pollConn(kt.client.fd)
	if err != nil {
		k.mu.Unlock()
		return fmt.Errorf("client side: %w", err)
	}
	upstream, err := pollConn(kt.up.fd)
	k.mu.Unlock()
	if err != nil {
		_ = client.Close()
		return fmt.Errorf("upstream side: %w", err)
	}
	ok, err := kt.p.GiveBack(kt, client, upstream, held, func() error { return k.detach(kt) })
	if !ok {
		_ = client.Close()
		_ = upstream.Close()
	}
	if err != nil {
		return err
	}
	if !ok {
		return datapath.ErrPairEnded
	}
	return nil
}

// resetSide finds a socket of kt that its peer reset: TCP_CLOSE while the direction writing into it has not
// carried its FIN (finReceived counts TCP_CLOSE as a FIN, which it is only once both FINs crossed). The
// loop would have ended the pair, but kt has left it, and a psock worker's write to the socket may have
// taken the reset's error, so the next engine's first read would return 0 and carry a FIN. It returns the
// reason to end the pair with, and the error; nil when neither was reset. The caller holds k.mu.
func (kt *kernelTunnel) resetSide() (string, error) {
	for i, s := range []*kernelSide{&kt.client, &kt.up} {
		into := &kt.dirs[1-i] // upstream → client writes into the client's socket, and the other way
		if into.finDone {
			continue
		}
		if state, err := tcpState(s.fd); err != nil || state != unix.BPF_TCP_CLOSE {
			continue // an error is the end's, which the give-back finds
		}
		if s.isClient {
			return datapath.ReasonClientReset, fmt.Errorf("give the kernel pair back: the client reset: %w", unix.ECONNRESET)
		}
		return datapath.ReasonUpstreamReset, fmt.Errorf("give the kernel pair back: the upstream reset: %w", unix.ECONNRESET)
	}
	return "", nil
}

// detach takes kt's sockets out of the maps once it has been given back, folding its counters into the
// pair and marking the FINs it carried, and closes the engine's descriptors. The caller holds the pair's
// lock (Pair.GiveBack).
func (k *Engine) detach(kt *kernelTunnel) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return errTunnelEnded
	}
	kt.p.AddBytes(k.counters(kt))
	for i := range kt.dirs {
		if kt.dirs[i].finDone {
			kt.dirs[i].markFinished()
		}
	}
	if err := k.maps.Remove(loader.Socket{Cookie: kt.client.cookie}, loader.Socket{Cookie: kt.up.cookie}); err != nil {
		k.log.Warn("removing a stopped tunnel from BPF maps", "id", kt.p.ID, "err", err)
	}
	kt.releaseVerdictHold()
	kt.released = true
	kt.closeSockets()
	return nil
}
