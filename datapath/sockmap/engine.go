package sockmap

import (
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/settings"
	"github.com/sockrelay/sockrelay/loader"
)

// Engine is the sockmap datapath: after the handshake both sockets of a tunnel go into the BPF
// sockhash and the verdict program redirects each side's bytes to the other inside the kernel. Userspace
// keeps no goroutine and no buffer per tunnel: one epoll loop watches every kernel tunnel's sockets for
// FIN, hang-up and error, and carries the FIN across once every byte before it has been handed on. The
// engine owns the sockets' descriptors while it carries them, out of Go's poller (docs/datapath.md, "The
// kernel engine owns the sockets' descriptors").
type Engine struct {
	maps *loader.Sockmap
	log  *slog.Logger
	// fallback carries each pair that could not enter the sockhash; onFallback is told of it.
	fallback   datapath.Engine
	onFallback func(p *datapath.Pair, reason string)
	// heldLimit is the most bytes the kernel may hold per direction before the verdict demotes it and
	// userspace relays it until it can resume (docs/datapath.md, "Backpressure").
	heldLimit uint64
	// demotions, resumes and repeatsCut are what Stats reports.
	demotions, resumes, repeatsCut atomic.Uint64
	// lostSeen is the events_lost count last acted on; only the loop touches it.
	lostSeen uint64
	// hooks are the knobs of this package's tests (export_test.go); zero in every other use.
	hooks testHooks
	// relays counts the relaying goroutines started, for the self-test; relayWG waits for them at Close.
	relays  atomic.Uint64
	relayWG sync.WaitGroup
	// sharers counts the other processes that may read the mode-change ring buffer too: the one this
	// engine adopted its objects from (StartAdopted) and each one it exported them to (Export), until
	// Unshare says that one stopped. An event another reader read for one of this engine's tunnels is
	// lost to this one, so while any may read, the loop rechecks every tunnel each sharedSweep (adopt.go).
	sharers atomic.Int32
	// lastSweep asks the loop for one last recheck of every tunnel: the last other reader stopped.
	lastSweep atomic.Bool
	// sweptAt is when the loop last rechecked every tunnel because the objects are shared; only the loop
	// touches it.
	sweptAt time.Time

	// counted are every socket's counts as the last ReadCounts read them, by cookie; nil until a sampler
	// first calls ReadCounts, and a tunnel's Counts then come from them, not from a map lookup per socket.
	countsMu sync.Mutex
	counted  map[uint64]datapath.DirCounts

	epfd   int
	wakefd int // eventfd that wakes the loop to stop

	mu sync.Mutex
	// socks are the sides by socket cookie, the token of their epoll events: a descriptor number is
	// reused as soon as release closes it, and an event read before the release would then name
	// another tunnel's socket; a cookie is never reused. The eventfd's token is 0, which no cookie is.
	socks  map[uint64]*kernelSide
	drain  []*kernelDir // directions whose source sent FIN, waiting for their bytes to be handed on
	done   chan struct{}
	events chan struct{} // closed when readModeChanges has returned

	closeOnce sync.Once
}

// testHooks alter the engine for this package's tests and benchmarks only; export_test.go sets them.
type testHooks struct {
	// carryFINEarly breaks the datapath on purpose, for the test that the self-test catches it: a FIN is
	// carried as soon as it is seen, without waiting for the bytes before it.
	carryFINEarly bool
	// sndbuf, when nonzero, is set as both sockets' send buffer (SO_SNDBUFFORCE) before insertion; zero
	// leaves TCP's autotuning. Only the throughput benchmark sets it (docs/datapath.md, "Measured").
	sndbuf int
	// dropModeEvents is for the test of recoverLostEvents: readModeChanges then drops every event and
	// counts it in droppedModeEvents, which the loop adds to the ring buffer's own count of lost events,
	// as a full ring buffer would count it.
	dropModeEvents    atomic.Bool
	droppedModeEvents atomic.Uint64
	// stealModeEvents makes readModeChanges drop every event uncounted, as another process reading the
	// shared ring buffer takes it; pauseSweeps stops the periodic sweeps of a shared engine (not the
	// last one, once sharing ends), so that only that last one can find what the stolen events said.
	stealModeEvents, pauseSweeps atomic.Bool
	// beforeLateEnd, when set, runs in handle between its pick of a tunnel to end for a socket error,
	// under k.mu, and the end, after k.mu: where a LetGo or Stop may give the pair back meanwhile.
	beforeLateEnd func(kt *kernelTunnel)
	// beforeSettle, when set, runs in stopAlive once kt has left the loop, before its bytes are settled and
	// it is given back: where a peer's reset goes unseen by the loop.
	beforeSettle func(kt *kernelTunnel)
	// afterSettle, when set, is given the bytes a give-back read and did not write, per direction, once
	// steps 3 and 4 of stopAlive are done or failed: what becomes the pair's peeked bytes, or goes back
	// to its relaying goroutines when the give-back is refused.
	afterSettle func(held [2][]byte)
}

// kernelTunnel is a pair's state on the kernel path, and the engine's hold on the pair (its Carrier).
type kernelTunnel struct {
	k      *Engine
	p      *datapath.Pair
	client kernelSide
	up     kernelSide
	dirs   [2]kernelDir // client → upstream, upstream → client
	// released is set once the tunnel has left the maps; stopping once Stop has begun to give the pair
	// back. Both guarded by Engine.mu.
	released, stopping bool
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
	isClient bool // (beside owned: a kernel tunnel then fits a smaller allocation size class)
	// clampWas is the socket's window clamp before Stop raised its receive low-water mark (holdVerdict);
	// 0 otherwise. An int32 (TCP_WINDOW_CLAMP is an int), beside the bools, for the same size class.
	clampWas int32
	cookie   uint64
	// sentBase is how many bytes had entered this socket's send path (acked + queued) before insertion:
	// what the kernel redirects into it is counted from there.
	sentBase uint64
	// folded is how many of the bytes the verdict redirected from this socket the pair counts already:
	// those of an engine that let go of the tunnel (adopt.go); 0 for a tunnel that entered here.
	folded uint64
}

// srcDir is the direction s is the source of: the direction its verdict counters and demotions are of.
func (s *kernelSide) srcDir() *kernelDir {
	if s.isClient {
		return &s.kt.dirs[0]
	}
	return &s.kt.dirs[1]
}

// dirFrom is the direction of a tunnel the engine carries whose source has the given cookie, for demotion
// events. One map, by socket, serves both: a second one, by source, cost every idle tunnel two entries.
// The caller holds k.mu.
func (k *Engine) dirFrom(cookie uint64) (*kernelDir, bool) {
	s, ok := k.socks[cookie]
	if !ok {
		return nil, false
	}
	return s.srcDir(), true
}

// pairDir is the pair's record of d (its byte counter and FIN mark), made when it is used: a kernel tunnel
// keeps none for its life.
func (d *kernelDir) pairDir() datapath.Direction {
	if d.src.isClient {
		return d.kt.p.Direction(0)
	}
	return d.kt.p.Direction(1)
}

// count adds n bytes userspace relayed to the pair's counter of d.
func (d *kernelDir) count(n int) {
	pd := d.pairDir()
	pd.Count(n)
}

// markFinished records on the pair that d carried its FIN.
func (d *kernelDir) markFinished() {
	pd := d.pairDir()
	pd.MarkFinished()
}

// kernelDir is one direction of a kernel tunnel: bytes of src redirected into dst.
type kernelDir struct {
	kt       *kernelTunnel
	src, dst *kernelSide
	// finSeen: src sent FIN; finDone: dst's write side is shut, after every byte before the FIN.
	finSeen, finDone bool
	// drainWatch is the drain polling of a direction whose source sent FIN, made then (watchDrain): an idle
	// tunnel would otherwise keep 72 bytes of it a direction (its fields are promoted: d.nextCheck).
	*drainWatch

	// limit is src's held limit (loader.Socket.HeldLimit).
	limit uint64
	// relaying is set while a goroutine relays src's passed bytes (relayPassed); guarded by
	// Engine.mu. userRead and userWritten belong to that goroutine while it runs, and are read by
	// others only under Engine.mu while it does not.
	relaying              bool
	userRead, userWritten uint64
	resumeGen             uint64 // the demotion after which resuming was last asked for
	// demoted is what only a direction's relaying goroutines use, made by startRelayLocked before the
	// first starts: most directions are never demoted, and every idle tunnel would otherwise keep it
	// twice (its fields are promoted: d.overflow, d.maxPassedRead). Nil until then.
	*demoted
	// srcConn and dstConn are the relaying goroutine's conns on src and dst (pollConn): readModeChanges
	// wakes it through srcConn, and release closes both so that the sockets close with the tunnel.
	// Guarded by Engine.mu; nil while no goroutine relays.
	srcConn, dstConn *net.TCPConn
	// stop asks the relaying goroutine to return at a byte boundary (Stop); guarded by Engine.mu.
	// relayDone is closed when that goroutine has returned; heldBack are bytes it read but, stopped in
	// its write, did not write, written before relayDone is closed.
	stop      bool
	relayDone chan struct{}
	heldBack  []byte
}

// drainWatch is the part of a kernelDir that only the drain polling uses (checkDrains), from its FIN on.
type drainWatch struct {
	// Drain polling: the next check and the interval to it, doubled while nothing moves.
	nextCheck time.Time
	interval  time.Duration
	// settled is the redirected count at the previous check if every byte of it had been handed on then;
	// the FIN is carried only when a second check finds the same (see checkDrains). Zero otherwise.
	settled uint64
	// lastHanded and lastMove detect a stall: redirected bytes that never reach dst.
	lastHanded uint64
	lastMove   time.Time
}

// watchDrain starts d's drain polling, as of now: its first check is due at once. A direction that was
// polled before (a Stop that failed, then rejoined) keeps what its polling had learned.
func (d *kernelDir) watchDrain(now time.Time) {
	if d.drainWatch == nil {
		d.drainWatch = &drainWatch{}
	}
	d.interval, d.nextCheck, d.lastMove = drainFirstCheck, now, now
}

// demoted is the part of a kernelDir that its relaying goroutines use and nothing else does.
type demoted struct {
	// maxPassedRead is the largest read of passed bytes so far, for tests; written by the goroutine only.
	maxPassedRead atomic.Int64
	// overflow belongs to the relaying goroutine, as userRead does.
	overflow overflowWatch
	// counted is how many of the source's demotions (the verdict's count) the engine has counted in
	// Stats, under Engine.mu: each once, whether its event or a recheck found it.
	counted uint64
}

var (
	_ datapath.Engine      = (*Engine)(nil)
	_ datapath.SocketOwner = (*kernelTunnel)(nil)
)

// Start probes the kernel, loads the BPF objects and runs the self-test on them: the engine is trusted only
// once the self-test passes on this kernel (an error wrapping ErrSelfTest when it does not). heldLimit is
// the most bytes the kernel may hold per tunnel direction for a slow reader (docs/datapath.md,
// "Backpressure"); onFallback, when set, is told of each pair that could not enter the kernel and runs on
// copy instead, with the reason.
func Start(log *slog.Logger, onFallback func(p *datapath.Pair, reason string), heldLimit uint64) (*Engine, error) {
	if err := loader.Probe().Err(); err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k, err := newEngine(log, onFallback)
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	if err := k.selfTest(); err != nil {
		k.Close()
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	k.resetStats() // after the self-test: its demotions are not the users'
	k.heldLimit = heldLimit
	return k, nil
}

// newEngine loads the BPF objects and starts the engine's loops, with the default held limit; it runs no
// self-test.
func newEngine(log *slog.Logger, onFallback func(*datapath.Pair, string)) (*Engine, error) {
	maps, err := loader.Open(loader.Options{})
	if err != nil {
		return nil, err
	}
	return newEngineOver(log, onFallback, maps)
}

// newEngineOver starts an engine over BPF objects already open (loaded or adopted), which it closes on
// an error.
func newEngineOver(log *slog.Logger, onFallback func(*datapath.Pair, string), maps *loader.Sockmap) (*Engine, error) {
	var err error
	k := &Engine{maps: maps, log: log, fallback: datapath.Copier{}, onFallback: onFallback, heldLimit: settings.DefaultKernelHeldLimit,
		socks: make(map[uint64]*kernelSide),
		done:  make(chan struct{}), events: make(chan struct{})}
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
	k.lostSeen, _ = maps.EventsLost() // adopted maps count the other process's losses, acted on there
	go k.loop()
	go k.readModeChanges()
	return k, nil
}

// closeFDs closes the epoll and event descriptors and unloads the BPF objects, which ends readModeChanges.
func (k *Engine) closeFDs() {
	unix.Close(k.wakefd)
	unix.Close(k.epfd)
	k.maps.Close()
}

// Kind is datapath.Sockmap.
func (k *Engine) Kind() datapath.Kind { return datapath.Sockmap }

// Stats are the kernel engine's counts since its last resetStats: directions demoted for a slow
// reader and resumed, and skbs whose repeated head the verdict cut (counted as their pair ends).
type Stats struct {
	Demotions, Resumes, RepeatsCut uint64
}

// Stats returns the engine's counts, for a collector to read at scrape time.
func (k *Engine) Stats() Stats {
	return Stats{Demotions: k.demotions.Load(), Resumes: k.resumes.Load(), RepeatsCut: k.repeatsCut.Load()}
}

// resetStats starts the counts again from 0: after the self-test, whose demotions are not the users'.
func (k *Engine) resetStats() {
	k.demotions.Store(0)
	k.resumes.Store(0)
	k.repeatsCut.Store(0)
}

// Entries returns how many entries each of the engine's BPF maps holds, by map name: all are empty once
// every pair the engine carried has ended, which the relay's tests check after each tunnel.
func (k *Engine) Entries() (map[string]int, error) { return k.maps.Entries() }

// Accepts refuses TLS endpoints: without kernel TLS the bytes must be decrypted in userspace.
func (k *Engine) Accepts(a, b datapath.Endpoint) bool { return a.TLS == nil && b.TLS == nil }

// Close stops the loop and unloads the BPF objects; later calls do nothing. Tunnels must have been closed
// first.
func (k *Engine) Close() error {
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

// counters returns the bytes the kernel has redirected each way for kt; zero once it has left the maps.
func (k *Engine) counters(kt *kernelTunnel) (toUpstream, toClient uint64) {
	if st, err := k.maps.Stats(kt.client.cookie); err == nil {
		toUpstream = st.Bytes - kt.client.folded
	}
	if st, err := k.maps.Stats(kt.up.cookie); err == nil {
		toClient = st.Bytes - kt.up.folded
	}
	return toUpstream, toClient
}

// lastSkb returns when kt's verdict last saw a segment either way, from the BPF program's per-socket
// last_ns (CLOCK_MONOTONIC), as wall time; zero before the first segment.
func (k *Engine) lastSkb(kt *kernelTunnel) time.Time {
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
func (k *Engine) release(kt *kernelTunnel) {
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

// Counts returns the verdict's counts of kt's two sockets (datapath.Counter), each the direction it reads:
// as the last ReadCounts read them once a sampler calls it (a socket inserted since is looked up), else a
// map lookup per socket. The caller holds the pair's lock, so kt is not released meanwhile (its counters
// are zero once it has left the maps).
func (kt *kernelTunnel) Counts() datapath.Counts {
	var c datapath.Counts
	for i, s := range []*kernelSide{&kt.client, &kt.up} {
		sc, ok := kt.k.countedOf(s.cookie)
		if !ok {
			st, err := kt.k.maps.Stats(s.cookie)
			if err != nil {
				continue
			}
			sc = countsOf(st)
		}
		c.Dirs[i] = sc
	}
	return c
}

// countsOf is what auto's policy reads of one socket's counters: the direction it reads.
func countsOf(st loader.Stats) datapath.DirCounts {
	return datapath.DirCounts{Bytes: st.Bytes + st.Passed, Segments: st.Skbs, Demotions: st.Demotions}
}

// ReadCounts reads every socket's counters in one batched read of the state map (a system call per 4096
// sockets, loader.StatsAll), for the Counts of every tunnel until the next call:
// auto's sampler calls it once a sample, so that a sample of thousands of idle tunnels costs a few system
// calls, not two per tunnel.
func (k *Engine) ReadCounts() error {
	k.countsMu.Lock()
	defer k.countsMu.Unlock()
	if k.counted == nil {
		k.counted = map[uint64]datapath.DirCounts{}
	}
	clear(k.counted) // keeps its buckets: the next read fills them again
	err := k.maps.StatsAll(func(cookie uint64, st loader.Stats) { k.counted[cookie] = countsOf(st) })
	if err != nil {
		clear(k.counted) // Counts looks each socket up again
		return fmt.Errorf("read the counts of every kernel tunnel: %w", err)
	}
	return nil
}

// countedOf is a socket's counts as the last ReadCounts read them; false when it did not read the socket,
// or was never called.
func (k *Engine) countedOf(cookie uint64) (datapath.DirCounts, bool) {
	k.countsMu.Lock()
	defer k.countsMu.Unlock()
	c, ok := k.counted[cookie]
	return c, ok
}

var _ datapath.Counter = (*kernelTunnel)(nil)
