package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/loader"
)

// kernelPath is the sockmap datapath: after the handshake both sockets of a tunnel go into the BPF
// sockhash and the verdict program redirects each side's bytes to the other inside the kernel. Userspace
// keeps no goroutine and no buffer per tunnel: one epoll loop watches every kernel tunnel's sockets for
// FIN, hang-up and error, and carries the FIN across once every byte before it has been handed on. The
// engine owns the sockets' descriptors while it carries them, out of Go's poller (docs/datapath.md, "The
// kernel engine owns the sockets' descriptors").
type kernelPath struct {
	maps *loader.Sockmap
	log  *slog.Logger
	// fallback carries each pair that could not enter the sockhash; onFallback is told of it.
	fallback   datapath.Engine
	onFallback func(p *datapath.Pair, reason string)
	// carryFINEarly breaks the datapath on purpose, for the test that the self-test catches it: a FIN is
	// carried as soon as it is seen, without waiting for the bytes before it.
	carryFINEarly bool
	// heldLimit is the most bytes the kernel may hold per direction before the verdict demotes it and
	// userspace relays it until it can resume (docs/datapath.md, "Backpressure").
	heldLimit uint64
	// sndbuf, when nonzero, is set as both sockets' send buffer (SO_SNDBUFFORCE) before insertion; zero
	// leaves TCP's autotuning. Only the throughput benchmark sets it (docs/datapath.md, "Measured").
	sndbuf int
	// demotions, resumes and repeatsCut are what Stats reports.
	demotions, resumes, repeatsCut atomic.Uint64
	// lostSeen is the events_lost count last acted on; only the loop touches it.
	lostSeen uint64
	// dropModeEvents is for the test of recoverLostEvents: readModeChanges then drops every event and
	// counts it in droppedModeEvents, which the loop adds to the ring buffer's own count of lost events,
	// as a full ring buffer would count it.
	dropModeEvents    atomic.Bool
	droppedModeEvents atomic.Uint64
	// relays counts the relaying goroutines started, for the self-test; relayWG waits for them at Close.
	relays  atomic.Uint64
	relayWG sync.WaitGroup

	epfd   int
	wakefd int // eventfd that wakes the loop to stop

	mu sync.Mutex
	// socks are the sides by socket cookie, the token of their epoll events: a descriptor number is
	// reused as soon as release closes it, and an event read before the release would then name
	// another tunnel's socket; a cookie is never reused. The eventfd's token is 0, which no cookie is.
	socks  map[uint64]*kernelSide
	bySrc  map[uint64]*kernelDir // by the cookie of the direction's source, for demotion events
	drain  []*kernelDir          // directions whose source sent FIN, waiting for their bytes to be handed on
	done   chan struct{}
	events chan struct{} // closed when readModeChanges has returned

	closeOnce sync.Once
}

// kernelTunnel is a pair's state on the kernel path, and the engine's hold on the pair (its Carrier).
type kernelTunnel struct {
	k      *kernelPath
	p      *datapath.Pair
	client kernelSide
	up     kernelSide
	dirs   [2]kernelDir // client → upstream, upstream → client
	// released is set once the tunnel has left the maps; guarded by kernelPath.mu.
	released bool
}

// Sockets returns the engine's descriptors of the client's and the upstream's socket (datapath.SocketOwner).
func (kt *kernelTunnel) Sockets() (client, upstream int) { return kt.client.fd, kt.up.fd }

// closeSockets closes the engine's descriptors, each once: at release, or when the pair never entered the
// kernel. Whoever calls it is the only one that still uses them.
func (kt *kernelTunnel) closeSockets() {
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		if s.owned {
			s.owned = false
			unix.Close(s.fd)
		}
	}
}

// kernelSide is one socket of a kernel tunnel.
type kernelSide struct {
	kt *kernelTunnel
	// conn is the side's conn, used until the tunnel enters the kernel, then closed: Go's poller then
	// forgets the socket, which stays open through fd, the engine's own duplicate of its descriptor.
	conn     *net.TCPConn
	fd       int
	owned    bool // fd is open and the engine's to close
	cookie   uint64
	isClient bool
	// sentBase is how many bytes had entered this socket's send path (acked + queued) before insertion:
	// what the kernel redirects into it is counted from there.
	sentBase uint64
}

// kernelDir is one direction of a kernel tunnel: bytes of src redirected into dst.
type kernelDir struct {
	kt       *kernelTunnel
	src, dst *kernelSide
	// finSeen: src sent FIN; finDone: dst's write side is shut, after every byte before the FIN.
	finSeen, finDone bool
	// Drain polling: the next check and the interval to it, doubled while nothing moves.
	nextCheck time.Time
	interval  time.Duration
	// settled is the redirected count at the previous check if every byte of it had been handed on then;
	// the FIN is carried only when a second check finds the same (see checkDrains). Zero otherwise.
	settled uint64
	// lastHanded and lastMove detect a stall: redirected bytes that never reach dst.
	lastHanded uint64
	lastMove   time.Time

	// limit is src's held limit (loader.Socket.HeldLimit); dir counts the bytes userspace relays.
	limit uint64
	dir   *datapath.Direction
	// relaying is set while a goroutine relays src's passed bytes (relayPassed); guarded by
	// kernelPath.mu. userRead and userWritten belong to that goroutine while it runs, and are read by
	// others only under kernelPath.mu while it does not.
	relaying              bool
	userRead, userWritten uint64
	resumeGen             uint64 // the demotion after which resuming was last asked for
	// srcConn and dstConn are the relaying goroutine's conns on src and dst (pollConn): readModeChanges
	// wakes it through srcConn, and release closes both so that the sockets close with the tunnel.
	// Guarded by kernelPath.mu; nil while no goroutine relays.
	srcConn, dstConn *net.TCPConn
	// overflow belongs to the relaying goroutine, as userRead does.
	overflow overflowWatch
}

// kernelBuffers are the buffers of the handoff's drain and of relayPassed: 32 KiB, as the copy engine's.
var kernelBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

const (
	drainFirstCheck = 200 * time.Microsecond
	drainMaxCheck   = 50 * time.Millisecond
	// stallTimeout: a direction whose FIN waits on bytes the kernel redirected but that neither reach the
	// destination's send queue nor wait there for a slow reader, for this long, is broken; the tunnel is
	// reset rather than left hanging (docs/datapath.md, "FIN, RST and the end of a tunnel").
	stallTimeout = 10 * time.Second
)

var (
	_ datapath.Engine      = (*kernelPath)(nil)
	_ datapath.SocketOwner = (*kernelTunnel)(nil)
)

func newKernelPath(log *slog.Logger, onFallback func(*datapath.Pair, string)) (*kernelPath, error) {
	maps, err := loader.Open(loader.Options{})
	if err != nil {
		return nil, err
	}
	k := &kernelPath{maps: maps, log: log, fallback: datapath.Copier{}, onFallback: onFallback, heldLimit: DefaultKernelHeldLimit,
		socks: make(map[uint64]*kernelSide), bySrc: make(map[uint64]*kernelDir),
		done: make(chan struct{}), events: make(chan struct{})}
	if k.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		maps.Close()
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	if k.wakefd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		unix.Close(k.epfd)
		maps.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := unix.EpollCtl(k.epfd, unix.EPOLL_CTL_ADD, k.wakefd, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		k.closeFDs()
		return nil, fmt.Errorf("epoll add eventfd: %w", err)
	}
	go k.loop()
	go k.readModeChanges()
	return k, nil
}

// closeFDs closes the epoll and event descriptors and unloads the BPF objects, which ends readModeChanges.
func (k *kernelPath) closeFDs() {
	unix.Close(k.wakefd)
	unix.Close(k.epfd)
	k.maps.Close()
}

func (k *kernelPath) Kind() datapath.Kind { return datapath.Sockmap }

// kernelStats are the kernel engine's counts since its last resetStats: directions demoted for a slow
// reader and resumed, and skbs whose repeated head the verdict cut (counted as their pair ends).
type kernelStats struct {
	Demotions, Resumes, RepeatsCut uint64
}

// Stats returns the engine's counts, for a collector to read at scrape time.
func (k *kernelPath) Stats() kernelStats {
	return kernelStats{Demotions: k.demotions.Load(), Resumes: k.resumes.Load(), RepeatsCut: k.repeatsCut.Load()}
}

// resetStats starts the counts again from 0: after the self-test, whose demotions are not the users'.
func (k *kernelPath) resetStats() {
	k.demotions.Store(0)
	k.resumes.Store(0)
	k.repeatsCut.Store(0)
}

// Accepts refuses TLS endpoints: without kernel TLS the bytes must be decrypted in userspace.
func (k *kernelPath) Accepts(a, b datapath.Endpoint) bool { return a.TLS == nil && b.TLS == nil }

// Close stops the loop and unloads the BPF objects; later calls do nothing. Tunnels must have been closed
// first.
func (k *kernelPath) Close() error {
	k.closeOnce.Do(func() {
		var one [8]byte
		one[0] = 1
		unix.Write(k.wakefd, one[:])
		<-k.done
		k.relayWG.Wait() // they use the maps until they see their tunnel gone
		k.closeFDs()
		<-k.events
	})
	return nil
}

// dupFD returns a duplicate of c's descriptor (close-on-exec, nonblocking as c's is: they share the open
// file), which the engine owns. A raw descriptor has no finalizer, so the collector never closes the
// socket under the kernel's feet (docs/datapath.md, "The kernel engine owns the sockets' descriptors").
func dupFD(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("F_DUPFD_CLOEXEC: %w", derr)
	}
	return fd, nil
}

// sentBytes is how many bytes have entered fd's send path so far: acknowledged plus still queued. TCP_INFO
// is read before SIOCOUTQ: an ACK landing between the two then makes the sum smaller, never larger, so a
// FIN can be late but never early.
func sentBytes(fd int) (uint64, error) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("TCP_INFO: %w", err)
	}
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		return 0, fmt.Errorf("SIOCOUTQ: %w", err)
	}
	return info.Bytes_acked + uint64(outq), nil
}

func (k *kernelPath) newSide(kt *kernelTunnel, c *net.TCPConn, isClient bool) (kernelSide, error) {
	fd, err := dupFD(c)
	if err != nil {
		return kernelSide{}, fmt.Errorf("socket descriptor: %w", err)
	}
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		unix.Close(fd)
		return kernelSide{}, fmt.Errorf("SO_COOKIE: %w", err)
	}
	return kernelSide{kt: kt, conn: c, fd: fd, owned: true, cookie: cookie, isClient: isClient}, nil
}

// Carry hands p to the kernel. Userspace's leftovers go first: whatever the handshake read past the request
// and past the 101 is written to the peer, then each socket's receive queue is emptied into its peer, all
// before the sockets enter the map, so those bytes precede every byte the kernel redirects (docs/datapath.md,
// "How a tunnel enters the kernel").
func (k *kernelPath) Carry(p *datapath.Pair) { k.carryLimited(p, k.heldLimit) }

// carryLimited is Carry with the held limit of both directions given.
func (k *kernelPath) carryLimited(p *datapath.Pair, heldLimit uint64) {
	kt := &kernelTunnel{k: k, p: p}
	inKernel := false
	defer func() {
		if !inKernel {
			kt.closeSockets() // the pair's conns carry it, or it ended
		}
	}()
	var err error
	if kt.client, err = k.newSide(kt, p.Client().Conn, true); err == nil {
		kt.up, err = k.newSide(kt, p.Upstream().Conn, false)
	}
	if err != nil {
		p.Fail(ReasonClientError, err, true)
		return
	}
	pdirs := p.Directions()
	kt.dirs[0] = kernelDir{kt: kt, src: &kt.client, dst: &kt.up, limit: heldLimit, dir: pdirs[0]}
	kt.dirs[1] = kernelDir{kt: kt, src: &kt.up, dst: &kt.client, limit: heldLimit, dir: pdirs[1]}
	for i, d := range pdirs {
		if err := d.WritePeeked(); err != nil {
			p.Fail(d.Blame(err), err, true)
			return
		}
		switch err := drainQueued(d, kt.dirs[i].src.fd); {
		case errors.Is(err, errSourceClosed):
			// The source already sent its FIN: it cannot enter a sockhash (EOPNOTSUPP from
			// sock_map_sk_state_allowed).
			k.runInUserspace(p, "socket_closing")
			return
		case errors.Is(err, errSourceBusy):
			k.runInUserspace(p, "busy_at_handoff")
			return
		case err != nil:
			p.Fail(d.Blame(err), err, true)
			return
		}
	}
	// Baselines before insertion: a baseline taken after could already include redirected bytes, and the
	// FIN would then never be carried (docs/datapath.md, "What failed").
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		if k.sndbuf > 0 {
			_ = unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, k.sndbuf)
		}
		if s.sentBase, err = sentBytes(s.fd); err != nil {
			p.Fail(ReasonClientError, err, true)
			return
		}
	}

	// Inserted under the pair's lock (Hold), so that a concurrent end (a shutdown) cannot miss the release
	// of what is inserted here.
	held, err := p.Hold(datapath.Sockmap, kt, func() error { return k.attach(kt, heldLimit) })
	inKernel = held
	if !held && err == nil {
		return // the pair ended first
	}
	if err != nil {
		// A socket that already got its FIN (CLOSE_WAIT) cannot enter a sockhash (EOPNOTSUPP from
		// sock_map_sk_state_allowed);
		// such a tunnel runs in userspace instead.
		reason := "insert_failed"
		if errors.Is(err, unix.EOPNOTSUPP) {
			reason = "socket_closing"
		}
		k.log.Debug("tunnel cannot use the kernel datapath", "id", p.ID, "err", err)
		k.runInUserspace(p, reason)
		return
	}
}

// attach puts kt's sockets into the maps and the loop's epoll, then closes their conns so that Go's poller
// forgets them: from here the engine's descriptors are the only ones. It runs under the pair's lock
// (Pair.Hold); on error nothing is left in the maps or the epoll, and the conns are open.
func (k *kernelPath) attach(kt *kernelTunnel, heldLimit uint64) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	err := k.maps.Insert(loader.Socket{FD: kt.client.fd, Cookie: kt.client.cookie, HeldLimit: heldLimit},
		loader.Socket{FD: kt.up.fd, Cookie: kt.up.cookie, HeldLimit: heldLimit})
	if err != nil {
		return err
	}
	sides := []*kernelSide{&kt.client, &kt.up}
	for i, s := range sides {
		// Hang-up and error only, edge-triggered: each FIN, hang-up or error is reported once, and the
		// data_ready that ends every verdict run wakes no one (docs/datapath.md, "The kernel engine owns
		// the sockets' descriptors").
		ev := unix.EpollEvent{Events: unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR | unix.EPOLLET,
			Fd: int32(s.cookie), Pad: int32(s.cookie >> 32)}
		if err := unix.EpollCtl(k.epfd, unix.EPOLL_CTL_ADD, s.fd, &ev); err != nil {
			for _, added := range sides[:i] {
				_ = unix.EpollCtl(k.epfd, unix.EPOLL_CTL_DEL, added.fd, nil)
			}
			_ = k.maps.Remove(loader.Socket{Cookie: kt.client.cookie}, loader.Socket{Cookie: kt.up.cookie})
			return fmt.Errorf("epoll add: %w", err)
		}
	}
	k.socks[kt.client.cookie] = &kt.client
	k.socks[kt.up.cookie] = &kt.up
	k.bySrc[kt.client.cookie] = &kt.dirs[0]
	k.bySrc[kt.up.cookie] = &kt.dirs[1]
	for _, s := range sides {
		// Go's runtime takes the descriptor out of its epoll (EPOLL_CTL_DEL) and closes it; the socket
		// lives on through the engine's duplicate. The pair's own Close later finds the conn closed.
		_ = s.conn.Close()
	}
	// Bytes that arrived between the last userspace read and the insertion sit in the receive queue, and
	// the verdict runs only on data_ready. Setting SO_RCVLOWAT makes TCP call data_ready (tcp_set_rcvlowat),
	// which runs the verdict over them now instead of when the sender next speaks (docs/datapath.md,
	// "How a tunnel enters the kernel").
	for _, s := range sides {
		_ = unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
	}
	return nil
}

// runInUserspace hands a pair that cannot use the kernel datapath to the fallback engine (copy).
// Whatever the handoff already wrote is not written again: peeked bytes are written once.
func (k *kernelPath) runInUserspace(p *datapath.Pair, reason string) {
	p.SetKind(k.fallback.Kind())
	k.log.Info("tunnel falls back to the copy datapath", "id", p.ID, "reason", reason)
	if k.onFallback != nil {
		k.onFallback(p, reason)
	}
	k.fallback.Carry(p)
}

var (
	errSourceClosed = errors.New("source sent FIN before the handoff")
	errSourceBusy   = errors.New("source kept sending during the handoff")
)

// handoffDrainRounds bounds how many reads drainQueued makes before it gives up on a source that keeps its
// receive queue full: such a tunnel stays in userspace rather than hold up the handshake goroutine.
const handoffDrainRounds = 64

// drainQueued reads everything waiting in d's source and writes it to d's destination, until the receive
// queue is empty. The kernel must never see a receive queue that userspace has read part of: tcp_read_skb
// hands whole skbs to the verdict, ignoring how much of the first one recvmsg already consumed, so a
// partly read skb would be redirected again from its start. Measured here before this existed: a client
// received the first 1000 bytes of its stream twice. An empty queue has no partly read skb; what arrives
// after it does arrives in fresh ones.
func drainQueued(d *datapath.Direction, srcFD int) error {
	bp := kernelBuffers.Get().(*[]byte)
	defer kernelBuffers.Put(bp)
	for range handoffDrainRounds {
		n, err := unix.Read(srcFD, *bp) // the descriptor is nonblocking: Go set it so
		switch {
		case err == unix.EAGAIN:
			return nil
		case err == unix.EINTR:
			continue
		case err != nil:
			return datapath.ReadErr(err)
		case n == 0:
			return errSourceClosed
		}
		w, werr := d.Dst().Write((*bp)[:n])
		d.Count(w)
		if werr != nil {
			return datapath.WriteErr(werr)
		}
	}
	return errSourceBusy
}

// counters returns the bytes the kernel has redirected each way for kt; zero once it has left the maps.
func (k *kernelPath) counters(kt *kernelTunnel) (toUpstream, toClient uint64) {
	if st, err := k.maps.Stats(kt.client.cookie); err == nil {
		toUpstream = st.Bytes
	}
	if st, err := k.maps.Stats(kt.up.cookie); err == nil {
		toClient = st.Bytes
	}
	return toUpstream, toClient
}

// lastSkb returns when kt's verdict last saw a segment either way, from the BPF program's per-socket
// last_ns (CLOCK_MONOTONIC), as wall time; zero before the first segment.
func (k *kernelPath) lastSkb(kt *kernelTunnel) time.Time {
	var last uint64
	for _, c := range []uint64{kt.client.cookie, kt.up.cookie} {
		if st, err := k.maps.Stats(c); err == nil {
			last = max(last, st.LastNs)
		}
	}
	var now unix.Timespec
	if last == 0 || unix.ClockGettime(unix.CLOCK_MONOTONIC, &now) != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(now.Nano() - int64(last)))
}

// Pending returns the bytes the kernel has redirected each way for kt that its pair does not count yet.
func (kt *kernelTunnel) Pending() (toUpstream, toClient uint64) { return kt.k.counters(kt) }

// LastActive is when kt's verdict last saw a segment either way.
func (kt *kernelTunnel) LastActive() time.Time { return kt.k.lastSkb(kt) }

// Release takes kt out of epoll and the maps; Pair.End calls it under the pair's lock.
func (kt *kernelTunnel) Release() { kt.k.release(kt) }

// release takes kt out of epoll and the maps, folding its final counters into the pair, and closes the
// engine's descriptors, which closes the sockets (their conns are closed already). An explicit delete
// before close is the clean order, though closing removes a socket from every map by itself
// (sock_map_close).
func (k *kernelPath) release(kt *kernelTunnel) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if kt.released {
		return
	}
	kt.p.AddBytes(k.counters(kt))
	kt.released = true
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		if st, err := k.maps.Stats(s.cookie); err == nil && st.Overlaps > 0 {
			// Not an error of ours, and nothing was lost: TCP queued segments that repeated bytes
			// already delivered, and the verdict cut them (bpf/sockrelay.c). Worth knowing how often.
			k.log.Warn("kernel tunnel: TCP repeated bytes already delivered; the repeats were cut",
				"id", kt.p.ID, "client_side", s.isClient, "skbs", st.Overlaps, "bytes", st.OverlapBytes)
			k.repeatsCut.Add(st.Overlaps)
		}
	}
	for _, s := range []*kernelSide{&kt.client, &kt.up} {
		_ = unix.EpollCtl(k.epfd, unix.EPOLL_CTL_DEL, s.fd, nil)
		delete(k.socks, s.cookie)
		delete(k.bySrc, s.cookie)
	}
	if err := k.maps.Remove(loader.Socket{Cookie: kt.client.cookie}, loader.Socket{Cookie: kt.up.cookie}); err != nil {
		k.log.Warn("removing tunnel from BPF maps", "id", kt.p.ID, "err", err)
	}
	k.drain = slices.DeleteFunc(k.drain, func(d *kernelDir) bool { return d.kt == kt })
	for i := range kt.dirs {
		// A relaying goroutine's conns hold the sockets open too; closing them wakes it, and it finds
		// its tunnel gone.
		if d := &kt.dirs[i]; d.srcConn != nil {
			_ = d.srcConn.Close()
			_ = d.dstConn.Close()
		}
	}
	kt.closeSockets()
}

// loop waits for socket events and polls draining directions until Close.
func (k *kernelPath) loop() {
	defer close(k.done)
	events := make([]unix.EpollEvent, 256)
	lostCheck := time.Now()
	for {
		timeout := k.drainTimeout()
		if timeout < 0 || timeout > lostEventsCheckMs {
			timeout = lostEventsCheckMs
		}
		n, err := unix.EpollWait(k.epfd, events, timeout)
		if err != nil && err != unix.EINTR {
			k.log.Error("kernel datapath event loop failed", "err", err)
			return
		}
		for _, ev := range events[:max(n, 0)] {
			if eventToken(ev) == 0 {
				return
			}
			k.handle(ev)
		}
		k.checkDrains()
		if time.Since(lostCheck) >= lostEventsCheckMs*time.Millisecond {
			lostCheck = time.Now()
			k.recoverLostEvents()
		}
	}
}

// lostEventsCheckMs is how often the loop looks whether the ring buffer dropped mode events.
const lostEventsCheckMs = 1000

// recoverLostEvents does, for every kernel direction, what lost mode events would have made happen: a
// demoted direction with no goroutine relaying it would hold its sender forever, and a broken one would
// not be reset. The ring buffer is sized so that this never runs in practice; when it does, it says so.
func (k *kernelPath) recoverLostEvents() {
	lost, err := k.maps.EventsLost()
	lost += k.droppedModeEvents.Load()
	if err != nil || lost == k.lostSeen {
		return
	}
	k.log.Warn("kernel datapath: mode events were lost; checking every kernel tunnel", "lost", lost-k.lostSeen)
	k.lostSeen = lost
	var broken []*kernelTunnel
	k.mu.Lock()
	for _, d := range k.bySrc {
		st, err := k.maps.Stats(d.src.cookie)
		switch {
		case err != nil || d.relaying:
		case st.Broken:
			broken = append(broken, d.kt)
		case st.Demoted || st.Passed != d.userRead:
			k.startRelayLocked(d)
		}
	}
	k.mu.Unlock()
	for _, kt := range broken {
		kt.p.End(ReasonKernelError, true)
	}
}

// drainTimeout is how long epoll_wait may sleep: until the next drain check, or forever when none waits.
func (k *kernelPath) drainTimeout() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.drain) == 0 {
		return -1
	}
	next := k.drain[0].nextCheck
	for _, d := range k.drain[1:] {
		if d.nextCheck.Before(next) {
			next = d.nextCheck
		}
	}
	ms := int((time.Until(next) + time.Millisecond - 1) / time.Millisecond)
	return max(ms, 0)
}

// eventToken is the 64 bits of ev's data: a socket cookie, or 0 for the eventfd.
func eventToken(ev unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// handle acts on one socket's event: an error (a reset) aborts the tunnel; a FIN starts the drain of the
// direction it ends.
func (k *kernelPath) handle(ev unix.EpollEvent) {
	k.mu.Lock()
	s, ok := k.socks[eventToken(ev)]
	if !ok {
		k.mu.Unlock()
		return
	}
	kt := s.kt
	if ev.Events&unix.EPOLLERR != 0 {
		// Read under k.mu: release closes the descriptor, and its number may then name another socket.
		soErr, _ := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_ERROR)
		k.mu.Unlock()
		kt.p.Fail(datapath.Blame(s.isClient, unix.Errno(soErr)), unix.Errno(soErr), true)
		return
	}
	if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		d := &kt.dirs[1]
		if s.isClient {
			d = &kt.dirs[0]
		}
		if !d.finSeen {
			d.finSeen = true
			d.interval = drainFirstCheck
			d.nextCheck = time.Now()
			d.lastMove = time.Now()
			k.drain = append(k.drain, d)
		}
	}
	k.mu.Unlock()
}

// checkDrains carries each waiting FIN across once every byte redirected before it has entered the
// destination's send queue (docs/datapath.md, "FIN, RST and the end of a tunnel"): shutting down or removing the socket earlier drops bytes still on
// their way through the psock backlog.
func (k *kernelPath) checkDrains() {
	now := time.Now()
	var finished, stalled, broken []*kernelTunnel
	k.mu.Lock()
	keep := k.drain[:0]
	for _, d := range k.drain {
		if now.Before(d.nextCheck) {
			keep = append(keep, d)
			continue
		}
		if d.relaying {
			// The goroutine relaying the demoted source's passed bytes carries the FIN after them.
			d.nextCheck = now.Add(drainMaxCheck)
			keep = append(keep, d)
			continue
		}
		st, handed, err := k.dirProgress(d, d.dst.fd)
		redirected := st.Bytes
		switch {
		case err != nil:
			stalled = append(stalled, d.kt)
		case st.Broken:
			// The verdict dropped bytes it could not keep exact: this stream must not end cleanly.
			broken = append(broken, d.kt)
		case st.Demoted || st.Passed != d.userRead:
			// Bytes before the FIN were passed to userspace: they go first, and the FIN after them.
			// Normally a demotion event has started the relay already; this covers a lost event.
			k.startRelayLocked(d)
			d.settled = 0
			d.nextCheck = now.Add(drainMaxCheck)
			keep = append(keep, d)
		case k.carryFINEarly, handed >= redirected && d.settled == redirected+1:
			if err := unix.Shutdown(d.dst.fd, unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
				stalled = append(stalled, d.kt)
				continue
			}
			d.finDone = true
			d.kt.p.MarkHalfClosed()
			if d.kt.dirs[0].finDone && d.kt.dirs[1].finDone {
				finished = append(finished, d.kt)
			}
		case handed >= redirected:
			// Everything counted so far is handed on, but TCP reports the FIN (EPOLLRDHUP) from inside
			// the softirq that queued the segment, just before that segment's bytes go through the
			// verdict. One more check a poll interval later, with the count unchanged, makes sure
			// the last segment's bytes were counted before the peer is shut.
			d.settled = redirected + 1
			d.nextCheck = now.Add(d.interval)
			keep = append(keep, d)
		default:
			d.settled = 0
			if handed != d.lastHanded {
				d.lastHanded, d.lastMove = handed, now
				d.interval = drainFirstCheck
			} else if now.Sub(d.lastMove) > stallTimeout && !hasUnsent(d.dst.fd) {
				k.log.Error("kernel tunnel stalled: redirected bytes never reached the peer; resetting it",
					"id", d.kt.p.ID, "redirected", redirected, "handed_on", handed)
				stalled = append(stalled, d.kt)
				continue
			} else {
				d.interval = min(2*d.interval, drainMaxCheck)
			}
			d.nextCheck = now.Add(d.interval)
			keep = append(keep, d)
		}
	}
	k.drain = keep
	k.mu.Unlock()
	for _, kt := range finished {
		kt.p.End(ReasonClosed, false)
	}
	for _, kt := range stalled {
		kt.p.End(ReasonStalled, true)
	}
	for _, kt := range broken {
		kt.p.End(ReasonKernelError, true)
	}
}

// dirProgress returns the verdict's counters of d's source and how many of the bytes it redirected have
// entered its destination's send path, dstFD. The caller holds kernelPath.mu (dstFD is d.dst.fd) or is
// d's relaying goroutine (dstFD is its own conn's).
func (k *kernelPath) dirProgress(d *kernelDir, dstFD int) (loader.Stats, uint64, error) {
	st, err := k.maps.Stats(d.src.cookie)
	if err != nil {
		return loader.Stats{}, 0, err
	}
	sent, err := sentBytes(dstFD)
	if err != nil {
		return loader.Stats{}, 0, err
	}
	return st, sent - d.dst.sentBase - d.userWritten, nil
}

// hasUnsent reports whether the socket fd, a direction's destination, still has bytes to send: then the
// wait is a slow reader, not a stall.
func hasUnsent(fd int) bool {
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	return err == nil && outq > 0
}
