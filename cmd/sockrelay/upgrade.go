package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sockrelay/sockrelay/handover"
	"github.com/sockrelay/sockrelay/relay"
)

// handoverFDEnv names, in a new relay process's environment, the descriptor of its end of the handover
// socket pair: the process is an upgrade's, and adopts the listeners the running relay offers on it.
const handoverFDEnv = "SOCKRELAY_HANDOVER_FD"

// defaultUpgradeTimeout is how long a new process may take to start (probe, self-test, pools) and
// confirm that it serves, when the request does not say.
const defaultUpgradeTimeout = time.Minute

// upgrader is the running relay's side of an upgrade: it starts the new process, offers it the
// listeners, and waits for its word that it serves. Until then this process keeps everything.
type upgrader struct {
	log          *slog.Logger
	runArgs      []string // this process's `sockrelay run` flags, which the new one gets by default
	drainTimeout time.Duration
	tunnels      func() int
	movable      func() int    // the tunnels that can be handed over
	lastTunnelID func() uint64 // the registry's latest id, which the offer carries

	mu         sync.Mutex
	listeners  []offered // set by serve once every listener is bound
	letGo      func()    // stops this process's accepting on the admin listener, before the answer goes out
	busy       bool
	accepts    []string // what the new process of the upgrade in progress said it accepts
	stopping   bool     // the relay was told to stop: it drains, and starts no successor
	handedTo   int      // the process that took over; 0 until one did
	handedOver chan int // gets that process's pid, once: serve then drains and exits
	// successor is the socket pair's end to the process that took over, when it adopts tunnels
	// (Ready.Accepts); serve hands them over on it. Nil otherwise.
	successor *handover.Conn
}

// offered is a listener this process hands over, and what identifies it.
type offered struct {
	desc handover.Listener
	ln   net.Listener
}

func newUpgrader(log *slog.Logger, runArgs []string, drainTimeout time.Duration) *upgrader {
	return &upgrader{log: log, runArgs: runArgs, drainTimeout: drainTimeout, tunnels: func() int { return 0 },
		movable: func() int { return 0 }, lastTunnelID: func() uint64 { return 0 }, handedOver: make(chan int, 1)}
}

// serving gives the upgrader what it hands over, once the relay serves.
func (u *upgrader) serving(listeners []offered, tunnels *relay.Registry, letGo func()) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.listeners, u.tunnels, u.movable, u.lastTunnelID, u.letGo = listeners, tunnels.Len, tunnels.Movable, tunnels.LastID, letGo
}

// takeSuccessor returns the socket pair's end to the process that took over, when it adopts tunnels;
// the caller closes it.
func (u *upgrader) takeSuccessor() *handover.Conn {
	u.mu.Lock()
	defer u.mu.Unlock()
	c := u.successor
	u.successor = nil
	return c
}

// handedOff says whether a new process has taken over.
func (u *upgrader) handedOff() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.handedTo != 0
}

// upgrade starts the new process and hands it the listeners; it returns once the new process serves, or
// why it did not take over (this process then keeps serving). One upgrade at a time.
func (u *upgrader) upgrade(_ context.Context, req relay.UpgradeRequest) (relay.UpgradeResult, error) {
	started := time.Now()
	binary, args, timeout, err := u.resolve(req)
	if err != nil {
		return relay.UpgradeResult{}, err
	}
	if err := u.begin(); err != nil {
		return relay.UpgradeResult{}, err
	}
	u.log.Info("upgrade: starting the new process", "binary", binary, "args", strings.Join(args, " "), "timeout", timeout)
	// Not bound to the request: a client that gives up waiting must not leave a half-started process.
	pid, successor, err := u.handOver(binary, args, timeout)
	if err != nil {
		u.end(0)
		u.log.Error("upgrade failed: this process keeps serving", "binary", binary, "err", err)
		return relay.UpgradeResult{}, err
	}
	res := relay.UpgradeResult{PID: pid, OldPID: os.Getpid(), DrainingTunnels: u.tunnels(),
		DrainTimeout: u.drainTimeout.String(), TookMS: time.Since(started).Milliseconds()}
	if successor != nil {
		res.HandingOver = min(u.movable(), res.DrainingTunnels)
		res.DrainingTunnels -= res.HandingOver
	}
	u.log.Info("upgrade: the new process serves; this one stops accepting and drains its tunnels",
		"pid", pid, "took_ms", res.TookMS, "tunnels", res.DrainingTunnels, "handing_over", res.HandingOver,
		"drain_timeout", u.drainTimeout)
	notifyMainPID(pid, u.log)
	u.mu.Lock()
	u.successor = successor
	u.mu.Unlock()
	u.end(pid)
	return res, nil
}

// resolve checks what req asks for and fills in the defaults.
func (u *upgrader) resolve(req relay.UpgradeRequest) (binary string, args []string, timeout time.Duration, err error) {
	binary, timeout, args = req.Binary, defaultUpgradeTimeout, req.Args
	if binary == "" {
		// /proc/self/exe read again: a binary installed over this one's path is the one started.
		if binary, err = os.Executable(); err != nil {
			return "", nil, 0, fmt.Errorf("%w: this process's own binary: %v; give one with --binary", relay.ErrUpgradeBadRequest, err)
		}
	}
	if err := checkUpgradeBinary(binary); err != nil {
		return "", nil, 0, fmt.Errorf("%w: binary %s: %v", relay.ErrUpgradeBadRequest, binary, err)
	}
	if req.Timeout != "" {
		if timeout, err = time.ParseDuration(req.Timeout); err != nil || timeout <= 0 {
			return "", nil, 0, fmt.Errorf("%w: timeout %q: accepted a positive duration, e.g. 30s", relay.ErrUpgradeBadRequest, req.Timeout)
		}
	}
	if len(args) == 0 {
		args = u.runArgs
	}
	return binary, args, timeout, nil
}

// checkUpgradeBinary refuses a binary that someone other than this process's user or root could have
// put there: the admin API would otherwise run whatever a less privileged user wrote.
func checkUpgradeBinary(path string) error {
	if !filepath.IsAbs(path) {
		return errors.New("not an absolute path")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.Mode().IsRegular():
		return errors.New("not a regular file")
	case fi.Mode().Perm()&0o111 == 0:
		return fmt.Errorf("not executable (mode %v)", fi.Mode().Perm())
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("writable by group or others (mode %v): accepted only a binary its owner alone may change", fi.Mode().Perm())
	case !ok || (st.Uid != 0 && int(st.Uid) != os.Geteuid()):
		return fmt.Errorf("owned by uid %d: accepted root's or this process's user's (uid %d)", st.Uid, os.Geteuid())
	}
	return nil
}

// begin claims the one upgrade at a time.
func (u *upgrader) begin() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.handedTo != 0:
		return fmt.Errorf("%w: this process (pid %d) has handed over to pid %d and is draining; upgrade that one", relay.ErrUpgradeRefused, os.Getpid(), u.handedTo)
	case u.stopping:
		return fmt.Errorf("%w: the relay is stopping and drains its tunnels; start a new one instead", relay.ErrUpgradeRefused)
	case u.busy:
		return fmt.Errorf("%w: an upgrade is in progress; wait for its answer", relay.ErrUpgradeRefused)
	case u.listeners == nil:
		return fmt.Errorf("%w: the relay is still starting", relay.ErrUpgradeRefused)
	}
	u.busy = true
	return nil
}

// stop refuses the upgrades asked for from now on: the relay stops. One in progress goes on; the
// process it started serves on if it confirms.
func (u *upgrader) stop() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.stopping = true
}

// end releases the claim; pid, when not 0, is the process that took over: this one lets go of its
// listeners and serve drains it.
func (u *upgrader) end(pid int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.busy = false
	if pid == 0 {
		return
	}
	u.handedTo = pid
	if u.letGo != nil {
		u.letGo()
	}
	u.handedOver <- pid
}

// handOver starts binary with args, offers it the listeners, and waits at most timeout for its answer.
// When the new process adopts tunnels it returns the socket pair's end to it too, for the tunnels.
func (u *upgrader) handOver(binary string, args []string, timeout time.Duration) (int, *handover.Conn, error) {
	conn, theirs, err := handover.Pair()
	if err != nil {
		return 0, nil, err
	}
	pid, err := u.startAndOffer(conn, theirs, binary, args, timeout)
	if err != nil || !slices.Contains(u.accepts, handover.AcceptTunnels) {
		conn.Close()
		return pid, nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return pid, conn, nil
}

// startAndOffer is handOver on the socket pair conn, theirs.
func (u *upgrader) startAndOffer(conn *handover.Conn, theirs *os.File, binary string, args []string, timeout time.Duration) (int, error) {
	u.accepts = nil
	cmd := exec.Command(binary, append([]string{"run"}, args...)...)
	cmd.Env = append(withoutEnv(os.Environ(), handoverFDEnv), handoverFDEnv+"=3") // ExtraFiles[0] is fd 3
	cmd.ExtraFiles = []*os.File{theirs}
	// The same files, not pipes through this process: the new one logs where this one did, and goes on
	// after this one exits.
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	err := cmd.Start()
	theirs.Close()
	if err != nil {
		return 0, fmt.Errorf("start %s: %w", binary, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps the new process whenever it ends, even after it took over
	kill := func() {
		_ = cmd.Process.Kill()
		<-exited
	}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if err := u.offer(conn); err != nil {
		if peerGone(err) {
			return 0, fmt.Errorf("the new process (pid %d) ended before it took the listeners%s", cmd.Process.Pid, exitOf(exited))
		}
		kill()
		return 0, err
	}
	m, files, err := conn.Receive()
	for _, f := range files {
		f.Close()
	}
	switch {
	case err == nil && m.Type == handover.TypeReady:
		if m.Ready.PID != cmd.Process.Pid {
			kill()
			return 0, fmt.Errorf("the new process (pid %d) answered for pid %d", cmd.Process.Pid, m.Ready.PID)
		}
		u.accepts = m.Ready.Accepts
		return m.Ready.PID, nil
	case err == nil && m.Type == handover.TypeFailed:
		return 0, fmt.Errorf("the new process (pid %d) could not start: %s%s", cmd.Process.Pid, m.Failed.Reason, exitOf(exited))
	case peerGone(err):
		return 0, fmt.Errorf("the new process (pid %d) ended before it served%s", cmd.Process.Pid, exitOf(exited))
	case errors.Is(err, os.ErrDeadlineExceeded):
		kill()
		return 0, fmt.Errorf("the new process (pid %d) did not confirm that it serves within %s; killed it", cmd.Process.Pid, timeout)
	case err == nil:
		kill()
		return 0, fmt.Errorf("the new process (pid %d) answered %q, not ready or failed; killed it", cmd.Process.Pid, m.Type)
	default:
		kill()
		return 0, fmt.Errorf("the new process (pid %d): %w; killed it", cmd.Process.Pid, err)
	}
}

// peerGone says whether err is the new process's end of the socket pair closed: it exited (a reset,
// when it left a message unread).
func peerGone(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// exitOf says how the new process ended, when it ends within a few seconds.
func exitOf(exited <-chan error) string {
	select {
	case err := <-exited:
		if err == nil {
			return " (it exited with status 0)"
		}
		return " (" + err.Error() + ")"
	case <-time.After(5 * time.Second):
		return " (it is still running)"
	}
}

// offer sends the listeners, each a descriptor of its own that the new process gets a copy of.
func (u *upgrader) offer(conn *handover.Conn) error {
	u.mu.Lock()
	listeners := u.listeners
	u.mu.Unlock()
	o := &handover.Offer{PID: os.Getpid(), LastTunnelID: u.lastTunnelID()}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, l := range listeners {
		fl, ok := l.ln.(interface{ File() (*os.File, error) })
		if !ok {
			return fmt.Errorf("listener %q (%s): %T has no descriptor to hand over", l.desc.Name, l.desc.Bound, l.ln)
		}
		f, err := fl.File()
		if err != nil {
			return fmt.Errorf("listener %q (%s): %w", l.desc.Name, l.desc.Bound, err)
		}
		d := l.desc
		d.FD = len(files)
		files = append(files, f)
		o.Listeners = append(o.Listeners, d)
	}
	return conn.Send(handover.Message{Type: handover.TypeOffer, Offer: o}, files)
}

// withoutEnv returns env without the variable name.
func withoutEnv(env []string, name string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, name+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// inheritance is the new process's side: the listeners the running relay offered, which it adopts
// instead of binding.
type inheritance struct {
	conn      *handover.Conn
	from      int    // the old process
	lastID    uint64 // the old process's latest tunnel id
	listeners []handover.Listener
	files     []*os.File // by listener; nil once adopted or closed
	log       *slog.Logger
}

// inherit returns the handover this process was started for, or nil when it was not started by an
// upgrade. It takes the offer at once, so that an old process that is not a relay is found before the
// start.
func inherit() (*inheritance, error) {
	v := os.Getenv(handoverFDEnv)
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(handoverFDEnv) // not for a process this one starts later
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: accepted a descriptor number from 3", handoverFDEnv, v)
	}
	syscall.CloseOnExec(fd)
	conn, err := handover.FromFile(os.NewFile(uintptr(fd), "handover"))
	if err != nil {
		return nil, err
	}
	h := &inheritance{conn: conn}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	m, files, err := conn.Receive()
	if err == nil && m.Type != handover.TypeOffer {
		err = fmt.Errorf("first message %q, want %q", m.Type, handover.TypeOffer)
		closeAllFiles(files)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("handover from the running relay: %w", err)
	}
	_ = conn.SetDeadline(time.Time{})
	h.from, h.listeners, h.lastID = m.Offer.PID, m.Offer.Listeners, m.Offer.LastTunnelID
	h.files = make([]*os.File, len(h.listeners))
	for i, l := range h.listeners {
		h.files[i] = files[l.FD]
	}
	return h, nil
}

func closeAllFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// listen adopts the offered listener of the address the configuration gives, when there is one, or
// binds it with bind. The admin listener and the client listeners are matched apart: by the address as
// configured, which names one socket whatever listener kind serves it (a kind changed by the new
// configuration is logged); matching the kind too would have the new process bind the address the old
// one still holds.
func (h *inheritance) listen(want handover.Listener, bind func() (net.Listener, error)) (net.Listener, error) {
	if h == nil {
		return bind()
	}
	for i, l := range h.listeners {
		if h.files[i] == nil || l.Address != want.Address || (l.Kind == handover.KindAdmin) != (want.Kind == handover.KindAdmin) {
			continue
		}
		f := h.files[i]
		h.files[i] = nil
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("adopt listener %s from pid %d: %w", l.Bound, h.from, err)
		}
		if ul, ok := ln.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(true) // as one this process bound: its socket file goes when it stops
		}
		attrs := []any{"listener", want.Name, "address", want.Address, "bound", l.Bound, "from_pid", h.from}
		if l.Kind != want.Kind || l.TLS != want.TLS || l.ProxyProtocol != want.ProxyProtocol {
			attrs = append(attrs, "was", describeListener(l), "now", describeListener(want))
		}
		h.log.Info("listener adopted from the running relay", attrs...)
		return ln, nil
	}
	return bind()
}

func describeListener(l handover.Listener) string {
	s := string(l.Kind)
	if l.TLS {
		s += "+tls"
	}
	if l.ProxyProtocol {
		s += "+proxy_protocol"
	}
	return s
}

// continueIDs numbers srv's tunnels past the old process's, so that the tunnels it hands over keep their
// ids.
func (h *inheritance) continueIDs(srv *relay.Server) {
	if h != nil {
		srv.Tunnels().ContinueIDs(h.lastID)
	}
}

// confirm closes the offered listeners the configuration no longer has and tells the old process that
// this one serves, and that it adopts tunnels: it takes them on srv, on a goroutine of its own.
func (h *inheritance) confirm(srv *relay.Server) {
	if h == nil {
		return
	}
	for i, f := range h.files {
		if f != nil {
			h.log.Info("listener not in the configuration: closed here; the old process closes its own",
				"listener", h.listeners[i].Name, "address", h.listeners[i].Address, "bound", h.listeners[i].Bound)
			f.Close()
			h.files[i] = nil
		}
	}
	ready := &handover.Ready{PID: os.Getpid(), Accepts: []string{handover.AcceptTunnels}}
	err := h.conn.Send(handover.Message{Type: handover.TypeReady, Ready: ready}, nil)
	if err != nil {
		// The old process gave up waiting (timeout) and killed this one, or is gone: nothing to tell.
		h.log.Warn("upgrade: could not tell the old process that this one serves", "pid", h.from, "err", err)
		h.conn.Close()
		h.conn = nil
		return
	}
	a := &adopter{conn: h.conn, srv: srv, from: h.from, log: h.log}
	h.conn = nil
	go a.run()
}

// fail tells the old process why this one cannot take over; it keeps serving.
func (h *inheritance) fail(reason string) {
	if h == nil || h.conn == nil {
		return
	}
	closeAllFiles(h.files)
	_ = h.conn.Send(handover.Message{Type: handover.TypeFailed, Failed: &handover.Failed{Reason: reason}}, nil)
	h.conn.Close()
	h.conn = nil
}
