package eventloop

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// maxEvents is how many ready descriptors one epoll_wait may return: at a thousand busy tunnels one wakeup
// serves many of them, which is where the loop saves the scheduler hop per message.
const maxEvents = 256

// passBytes and passReads bound what one direction reads in a pass before the loop turns to other tunnels,
// so a bulk tunnel cannot hold up the rest: once a direction has read passBytes, or made passReads reads, it
// is queued (loop.again) and runs again after the next wait's events. A chatty message waits on the loop for
// about one budget of each bulk direction sharing it: measured with two bulk streams on one loop, a budget of
// 16 reads of 64 KiB made a pass 2–3 ms; one of 64 KiB makes it about a tenth of that.
const (
	passBytes = 64 << 10
	passReads = 16
)

// epollCtl is unix.EpollCtl, replaced by tests to inject a failure of EPOLL_CTL_ADD.
var epollCtl = unix.EpollCtl

type commandKind int8

const (
	cmdAdd commandKind = iota
	cmdClose
	cmdStop
	cmdQueued // answer on reply whether the tunnel's sockets have unsent bytes (Handle.Queued)
	cmdDetach // give the tunnel back alive (Handle.Detach)

	cmdProgress // answer on progress what TCP has moved on the tunnel's sockets (Handle.Progress)
)

// command is work handed to a loop from another thread.
type command struct {
	kind  commandKind
	t     *tunnel
	abort bool
	reply chan<- bool // cmdQueued's answer
	// take and detached are cmdDetach's: what takes the descriptors, and the answer.
	take     func(afd, bfd int) error
	detached chan<- detachResult

	progress chan<- uint64 // cmdProgress's answer
}

type detachResult struct {
	d   Detached
	err error
}

// loop is one event loop. Everything but the atomics and the command queue belongs to its thread.
type loop struct {
	id       int
	epfd     int
	wakefd   int // eventfd: a write wakes the loop to read the command queue
	bufSize  int
	keepFree int

	mu           sync.Mutex // guards queue and done
	queue        []command
	done         bool // the loop has stopped; wakefd is closed
	stopped      chan struct{}
	tunnels      atomic.Int64
	events       atomic.Int64
	wakeups      atomic.Int64
	yields       atomic.Int64 // passes through Go's scheduler (yield)
	buffersInUse atomic.Int64
	pipesInUse   atomic.Int64
	pipesFree    atomic.Int64
	pipeFailures atomic.Int64

	byFD  map[int32]*tunnel
	free  []*[]byte // drained buffers kept for reuse; the loop is single-threaded, so no sync.Pool is needed
	again []*tunnel // tunnels that stopped a pass with work left (passBytes or passReads), run in the next pass
	now   int64     // the loop's clock, read once per wakeup, in Unix nanoseconds
	// lastYield is when the loop last passed through Go's scheduler (yield), to its clock.
	lastYield int64

	pipeSize  int
	keepPipes int
	newPipe   func(size int) (r, w int, err error) // Options.NewPipe; nil: pipe2
	pipes     []*pipe                              // empty pipes kept for reuse
}

func newLoop(id int, opts Options) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// The eventfd is level-triggered: the loop reads it to zero before it reads the queue, so a wakeup is never
	// lost between the two.
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(wakefd)
		unix.Close(epfd)
		return nil, fmt.Errorf("add eventfd to epoll: %w", err)
	}
	return &loop{
		id: id, epfd: epfd, wakefd: wakefd, bufSize: opts.BufSize, keepFree: opts.KeepFree,
		stopped: make(chan struct{}), byFD: make(map[int32]*tunnel),
		pipeSize: opts.PipeSize, keepPipes: opts.KeepPipes, newPipe: opts.NewPipe,
	}, nil
}

// send queues c for the loop and wakes it. After the loop has stopped, commands are dropped (false): its
// tunnels are already ended.
func (l *loop) send(c command) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return false
	}
	wake := len(l.queue) == 0 // a non-empty queue has already written to the eventfd
	l.queue = append(l.queue, c)
	if wake {
		var one = [8]byte{1}
		_, _ = unix.Write(l.wakefd, one[:]) // only EAGAIN at a counter near 2^64 can fail; the loop is awake then
	}
	return true
}

// run is the loop's thread: run passes until cmdStop.
func (l *loop) run() {
	// The tunnels' state is touched by this goroutine only. It is not locked to its OS thread: yield (below)
	// then costs a trip through the run queue, where a locked goroutine would hand its P and thread to
	// another thread and back (four futex calls instead of about two, measured).
	defer close(l.stopped)
	events := make([]unix.EpollEvent, maxEvents)
	for {
		if l.pass(events) {
			l.stop()
			return
		}
	}
}

// pass waits for readiness (not at all while tunnels wait in again), handles every ready descriptor, then
// gives the tunnels in again the pass they were promised, then runs the commands; it reports whether one was
// cmdStop.
//
// The tunnels that stopped the last pass early (a bulk direction that spent its passBytes) run after this
// wait's events, not before: a chatty tunnel's message that arrived meanwhile is carried ahead of them, so it
// waits behind at most one budget of each bulk direction, not two. Tunnels that spend their budget in this
// pass go to the next one.
func (l *loop) pass(events []unix.EpollEvent) (stop bool) {
	timeout := -1
	if len(l.again) > 0 {
		timeout = 0
	}
	l.yield()
	n, err := unix.EpollWait(l.epfd, events, timeout)
	if err != nil {
		if err == unix.EINTR {
			return false
		}
		// epoll_wait fails otherwise only on a bad epfd or events buffer: a bug, not a peer's doing.
		panic(fmt.Sprintf("eventloop: epoll_wait: %v", err))
	}
	l.now = time.Now().UnixNano()
	l.wakeups.Add(1)
	l.events.Add(int64(n))
	again := l.again
	l.again = nil
	commands := false
	for _, ev := range events[:n] {
		if ev.Fd == int32(l.wakefd) {
			commands = true
			continue
		}
		if t := l.byFD[ev.Fd]; t != nil {
			t.ready(ev.Fd, ev.Events)
		}
	}
	l.runAgain(again)
	// Commands run after the batch, so no event left in it can name a descriptor a command reused.
	return commands && l.runCommands()
}

// yieldEvery is how often a busy loop gives way in Go's scheduler (yield): under the scheduler's 10 ms, after
// which sysmon counts a goroutine that has not been rescheduled as hogging its P.
const yieldEvery = 5 * time.Millisecond

// yield passes through Go's scheduler once yieldEvery has gone by on the loop's clock. The loop goroutine
// never parks (it blocks in epoll_wait), so without this its P's scheduling tick would never move: sysmon
// would then preempt it and take its P at every tick it found the loop inside epoll_wait, staying awake at
// its shortest (20 µs) interval to do so. Measured at 100 tunnels and 10 000 messages/s: 0.23 nanosleep
// and 0.07 P hand-offs per message from sysmon before, 0.01 and none after, for about 200 yields a second.
func (l *loop) yield() {
	if l.now-l.lastYield < int64(yieldEvery) {
		return
	}
	l.lastYield = l.now
	l.yields.Add(1)
	runtime.Gosched()
}

// runAgain gives the tunnels that stopped their last pass early (again, taken before this pass's events)
// another pass. A tunnel an event of this pass already found queued was not pumped for it (ready): it runs
// here once.
func (l *loop) runAgain(again []*tunnel) {
	for _, t := range again {
		t.queued = false
		if !t.ended {
			t.pump()
		}
	}
}

// runCommands takes the queued commands and runs them; it reports whether one was cmdStop.
func (l *loop) runCommands() (stop bool) {
	var counter [8]byte
	_, _ = unix.Read(l.wakefd, counter[:])
	l.mu.Lock()
	queue := l.queue
	l.queue = nil
	l.mu.Unlock()
	for _, c := range queue {
		switch c.kind {
		case cmdAdd:
			l.add(c.t)
		case cmdClose:
			if !c.t.ended {
				reason := ReasonLocalClose
				if c.abort {
					reason = ReasonLocalAbort
				}
				c.t.end(SideNone, reason, nil, c.abort)
			}
		case cmdQueued:
			c.reply <- !c.t.ended && c.t.hasUnsent()
		case cmdDetach:
			d, err := c.t.detach(c.take)
			c.detached <- detachResult{d, err}
		case cmdProgress:
			c.progress <- c.t.tcpProgress()
		case cmdStop:
			stop = true
		}
	}
	return stop
}

// watch adds a tunnel's descriptors to the loop's epoll set. CarryWith calls it, before the Go connections are
// closed, so that a failure (ENOSPC at fs.epoll.max_user_watches, ENOMEM: the relay's, not a peer's) leaves the
// connections to the caller. On error nothing stays in the set.
//
// Edge-triggered (EPOLLET): each descriptor is added once with EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLPRI and never
// modified.
// The tunnel keeps its own readable/writable flags, set by an edge and cleared by EAGAIN, so stopping a source
// for backpressure is not reading it, and resuming is reading it again when the destination's EPOLLOUT edge
// comes: no epoll_ctl per stall and resume, as level-triggered interest would need to avoid busy wakeups.
// Edges that come before the loop's thread adds the tunnel are dropped (byFD does not name it yet): add
// re-arms the descriptors.
func (l *loop) watch(fds [2]int) error {
	for i, fd := range fds {
		ev := unix.EpollEvent{Events: tunnelEvents, Fd: int32(fd)}
		if err := epollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			if i == 1 {
				// Closing the duplicate alone would not take it out: the Go connection's descriptor still
				// refers to the socket.
				_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fds[0], nil)
			}
			return fmt.Errorf("add side %s to epoll: %w", Side(i), err)
		}
	}
	return nil
}

// tunnelEvents is the interest of a tunnel's descriptors (watch).
// EPOLLPRI tells a spliced source that urgent data arrived, whose mark stops a splice (atUrgentMark).
const tunnelEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLPRI | unix.EPOLLET

// add takes t, whose descriptors watch added, and makes its first pass, which sends the peeked bytes.
func (l *loop) add(t *tunnel) {
	for i := range t.ends {
		fd := int(t.ends[i].fd)
		l.byFD[int32(fd)] = t
		// The edges that came since watch were dropped, a FIN's RDHUP among them, which the first pass's
		// short read would then miss (it clears readable, waiting for an edge). EPOLL_CTL_MOD re-arms the
		// descriptor: its readiness is reported again, now to t. Should it fail, the socket is read to
		// EAGAIN or EOF on every pass, which misses nothing.
		ev := unix.EpollEvent{Events: tunnelEvents, Fd: int32(fd)}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, fd, &ev); err != nil {
			t.ends[i].hup = true
		}
	}
	l.tunnels.Add(1)
	t.added = true
	t.pump()
}

// stop resets every tunnel the loop still carries and closes the loop's descriptors.
func (l *loop) stop() {
	l.mu.Lock()
	l.done = true
	queue := l.queue
	l.queue = nil
	l.mu.Unlock()
	// Tunnels queued for adding after cmdStop were never registered; they end here like the rest.
	for _, c := range queue {
		switch c.kind {
		case cmdAdd:
			c.t.end(SideNone, ReasonLoopsClosed, nil, true)
		case cmdQueued:
			c.reply <- false
		case cmdDetach:
			c.detached <- detachResult{err: ErrEnded}
		case cmdProgress:
			c.progress <- c.t.writtenBoth()
		}
	}
	for _, t := range l.byFD {
		if !t.ended {
			t.end(SideNone, ReasonLoopsClosed, nil, true)
		}
	}
	for _, p := range l.pipes {
		p.close()
	}
	l.pipes = nil
	l.pipesFree.Store(0)
	unix.Close(l.wakefd)
	unix.Close(l.epfd)
}

// borrow lends a buffer to a direction that is about to read.
func (l *loop) borrow() *[]byte {
	l.buffersInUse.Add(1)
	if n := len(l.free); n > 0 {
		b := l.free[n-1]
		l.free = l.free[:n-1]
		return b
	}
	b := make([]byte, l.bufSize)
	return &b
}

// giveBack takes a buffer back once its direction has sent everything it held.
func (l *loop) giveBack(b *[]byte) {
	l.buffersInUse.Add(-1)
	if len(l.free) < l.keepFree {
		l.free = append(l.free, b)
	}
}
