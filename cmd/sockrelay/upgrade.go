package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/handover"
	"github.com/sockrelay/sockrelay/relay"
)

// handoverFDEnv names, in a new relay process's environment, the descriptor of its end of the handover
// socket pair: the process is an upgrade's, and adopts the listeners the running relay offers on it.
const handoverFDEnv = "SOCKRELAY_HANDOVER_FD"

// upgradeExeFDEnv names, in a new relay process's environment, the descriptor of the binary the old one
// opened, checked and started it from (/proc/self/fd/N), which the new process closes.
const upgradeExeFDEnv = "SOCKRELAY_UPGRADE_EXE_FD"

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
	fixedBinary  string        // --upgrade-binary: the only binary an upgrade starts; "" for this process's own
	movable      func() int    // the tunnels that can be handed over
	lastTunnelID func() uint64 // the registry's latest id, which the offer carries
	// exportBPF returns the kernel datapath's BPF objects, which the offer carries (none when the relay
	// runs no kernel engine); bpfAdopted is told whether the new process adopted them. Set before serving.
	exportBPF  func() (map[string]*os.File, error)
	bpfAdopted func(bool)

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
		movable: func() int { return 0 }, lastTunnelID: func() uint64 { return 0 }, handedOver: make(chan int, 1),
		exportBPF: func() (map[string]*os.File, error) { return nil, nil }, bpfAdopted: func(bool) {}}
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
	exe, args, timeout, err := u.resolve(req)
	if err != nil {
		return relay.UpgradeResult{}, err
	}
	defer exe.Close()
	binary := exe.Name()
	if err := u.begin(); err != nil {
		return relay.UpgradeResult{}, err
	}
	u.log.Info("upgrade: starting the new process", "binary", binary, "args", strings.Join(args, " "), "timeout", timeout)
	// Not bound to the request: a client that gives up waiting must not leave a half-started process.
	pid, successor, err := u.handOver(exe, args, timeout)
	u.bpfAdopted(err == nil && slices.Contains(u.accepts, handover.AcceptBPF))
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

// resolve checks what req asks for, fills in the defaults and opens the binary to start. The admin token
// grants an upgrade to this relay's own binary (or the path fixed at its start), not the running of any
// program with the relay's capabilities: a binary other than that one is refused, and so are arguments
// that are not `sockrelay run` flags (another program's options, such as ssh's -oProxyCommand).
func (u *upgrader) resolve(req relay.UpgradeRequest) (exe *os.File, args []string, timeout time.Duration, err error) {
	binary, why := u.fixedBinary, "the relay's --upgrade-binary (admin.upgrade_binary)"
	if binary == "" {
		// /proc/self/exe read again: a binary installed over this one's path is the one started.
		if binary, err = os.Executable(); err != nil {
			return nil, nil, 0, fmt.Errorf("%w: this process's own binary: %v; start the relay with --upgrade-binary PATH", relay.ErrUpgradeBadRequest, err)
		}
		why = "this relay's own executable; another needs the relay started with --upgrade-binary PATH"
	}
	if req.Binary != "" && filepath.Clean(req.Binary) != binary {
		return nil, nil, 0, fmt.Errorf("%w: binary %s: accepted only %s, %s", relay.ErrUpgradeBadRequest, req.Binary, binary, why)
	}
	timeout, args = defaultUpgradeTimeout, req.Args
	if req.Timeout != "" {
		if timeout, err = time.ParseDuration(req.Timeout); err != nil || timeout <= 0 {
			return nil, nil, 0, fmt.Errorf("%w: timeout %q: accepted a positive duration, e.g. 30s", relay.ErrUpgradeBadRequest, req.Timeout)
		}
	}
	if len(args) == 0 {
		args = u.runArgs
	} else if err := checkNewRunFlags(args, binary); err != nil {
		return nil, nil, 0, fmt.Errorf("%w: args: %v; accepted: `sockrelay run` flags", relay.ErrUpgradeBadRequest, err)
	}
	if exe, err = openUpgradeBinary(binary); err != nil {
		return nil, nil, 0, fmt.Errorf("%w: binary %s: %v", relay.ErrUpgradeBadRequest, binary, err)
	}
	return exe, args, timeout, nil
}

// checkNewRunFlags checks that args are `sockrelay run` flags and that they fix no binary for the new
// process's own upgrades other than binary, the one this upgrade starts (--upgrade-binary, or
// admin.upgrade_binary in the file they name): else the token would choose what the next upgrade runs.
func checkNewRunFlags(args []string, binary string) error {
	o, err := parseRunFlags(args, io.Discard)
	if err != nil {
		return err
	}
	if o.loadConfig() != nil {
		return nil // the new process says what is wrong with its file, as it starts
	}
	if o.upgradeBinary != "" && filepath.Clean(o.upgradeBinary) != binary {
		return fmt.Errorf("--upgrade-binary %s: accepted only %s, the binary this upgrade starts", o.upgradeBinary, binary)
	}
	return nil
}

// openUpgradeBinary opens the binary an upgrade starts and refuses it if someone other than this process's
// user or root could have put it there: the admin API would otherwise run whatever a less privileged user
// wrote. The checks are of the open file, which is the one started (startCommand): replacing the path
// after them changes nothing.
func openUpgradeBinary(path string) (*os.File, error) {
	if !filepath.IsAbs(path) {
		return nil, errors.New("not an absolute path")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	if err := checkUpgradeBinary(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// checkUpgradeBinary checks the open binary f (fstat): a regular executable file that only its owner, root
// or this process's user, may change.
func checkUpgradeBinary(f *os.File) error {
	fi, err := f.Stat()
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

// handOver starts exe with args, offers it the listeners, and waits at most timeout for its answer.
// When the new process adopts tunnels it returns the socket pair's end to it too, for the tunnels.
func (u *upgrader) handOver(exe *os.File, args []string, timeout time.Duration) (int, *handover.Conn, error) {
	conn, theirs, err := handover.Pair()
	if err != nil {
		return 0, nil, err
	}
	pid, err := u.startAndOffer(conn, theirs, exe, args, timeout)
	if err != nil || !slices.Contains(u.accepts, handover.AcceptTunnels) {
		conn.Close()
		return pid, nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return pid, conn, nil
}

// startAndOffer is handOver on the socket pair conn, theirs.
func (u *upgrader) startAndOffer(conn *handover.Conn, theirs *os.File, exe *os.File, args []string, timeout time.Duration) (int, error) {
	binary := exe.Name()
	u.accepts = nil
	cmd := startCommand(exe, theirs, args)
	// The same files, not pipes through this process: the new one logs where this one did, and goes on
	// after this one exits.
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	err := cmd.Start()
	theirs.Close()
	if err != nil {
		return 0, fmt.Errorf("start %s: %w", binary, err)
	}
	exited, tookOver := reapUnlessTookOver(cmd)
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
		if !tookOver() {
			return 0, fmt.Errorf("the new process (pid %d) ended right after it said that it serves%s", cmd.Process.Pid, exitOf(exited))
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

// startCommand is `exe run args...` with theirs, the new process's end of the handover pair, as descriptor 3.
// It starts the file exe, which openUpgradeBinary checked, not what its path names at exec time: exe is
// the child's descriptor 4 (not close-on-exec, so that a script's interpreter can read it too), and the
// child executes /proc/self/fd/4. argv[0] is exe's path, as ps shows it.
func startCommand(exe, theirs *os.File, args []string) *exec.Cmd {
	cmd := exec.Command("/proc/self/fd/4", append([]string{"run"}, args...)...)
	cmd.Args[0] = exe.Name()
	cmd.Env = append(withoutEnv(withoutEnv(os.Environ(), handoverFDEnv), upgradeExeFDEnv),
		handoverFDEnv+"=3", upgradeExeFDEnv+"=4") // ExtraFiles[0] is fd 3
	cmd.ExtraFiles = []*os.File{theirs, exe}
	return cmd
}

// reapUnlessTookOver waits for cmd's process to end and reaps it (exited gets cmd.Wait's answer), unless
// tookOver was called first and said true: the process has taken over. From then on this process does not
// wait for it: under systemd it is the unit's main process (MAINPID), and only its reaper learns how it
// ended. Reaped here, a crash while this process drains would be hidden from systemd; left alone, it stays
// a zombie until this process exits, and is then reparented to systemd (or init), which reaps it and sees
// the exit. The goroutine that waits without reaping (waitid WNOWAIT) returns once the process ends, or
// ends with this process. tookOver reports false when the process has already been reaped.
func reapUnlessTookOver(cmd *exec.Cmd) (exited <-chan error, tookOver func() bool) {
	ch := make(chan error, 1)
	var mu sync.Mutex
	took, reaped := false, false
	go func() {
		var info unix.Siginfo
		for unix.Waitid(unix.P_PID, cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil) == unix.EINTR {
		}
		mu.Lock()
		defer mu.Unlock()
		if took {
			return
		}
		reaped = true
		ch <- cmd.Wait()
	}()
	return ch, func() bool {
		mu.Lock()
		defer mu.Unlock()
		took = !reaped
		return took
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
	bpf, err := u.exportBPF()
	if err != nil {
		// The new process loads its own objects; the kernel tunnels stay here.
		u.log.Warn("upgrade: cannot hand over the BPF objects; kernel tunnels stay here and drain", "err", err)
	}
	for _, name := range slices.Sorted(maps.Keys(bpf)) {
		o.BPF = append(o.BPF, handover.BPFObject{Name: name, FD: len(files)})
		files = append(files, bpf[name])
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
	// bpf are the old process's BPF objects by name, until kernelObjects hands them to the relay.
	bpf map[string]*os.File
	log *slog.Logger
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
	closeUpgradeExe()
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
	for _, o := range m.Offer.BPF {
		if h.bpf == nil {
			h.bpf = map[string]*os.File{}
		}
		h.bpf[o.Name] = files[o.FD]
	}
	return h, nil
}

// closeUpgradeExe closes the descriptor of this process's binary that the old process started it from.
func closeUpgradeExe() {
	if fd, err := strconv.Atoi(os.Getenv(upgradeExeFDEnv)); err == nil && fd > 3 {
		syscall.Close(fd)
	}
	os.Unsetenv(upgradeExeFDEnv)
}

func closeAllFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// listen adopts the offered listener of the address the configuration gives, when there is one, or
// binds it with bind. The admin listener and the client listeners are matched apart: by the address as
// configured, or the socket it resolves to (sameSocket), which names one socket whatever listener kind
// serves it (a kind changed by the new configuration is logged); matching the kind too would have the new
// process bind the address the old one still holds.
func (h *inheritance) listen(want handover.Listener, bind func() (net.Listener, error)) (net.Listener, error) {
	if h == nil {
		return bind()
	}
	for i, l := range h.listeners {
		if h.files[i] == nil || !sameSocket(l, want.Address) || (l.Kind == handover.KindAdmin) != (want.Kind == handover.KindAdmin) {
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

// sameSocket says whether the offered listener l is the socket that the configured address addr names: the
// same spelling, or, for TCP, the same port on the same address once resolved (localhost and 127.0.0.1,
// :8080 and 0.0.0.0:8080): binding addr while the old process holds l would fail with EADDRINUSE.
func sameSocket(l handover.Listener, addr string) bool {
	if l.Address == addr {
		return true
	}
	if _, isUnix := config.AdminSocket(addr); isUnix {
		return false
	}
	bound, err := netip.ParseAddrPort(l.Bound)
	if err != nil {
		return false // a Unix socket's path
	}
	want, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil || want.Port == 0 || want.Port != int(bound.Port()) {
		return false
	}
	ip, _ := netip.AddrFromSlice(want.IP)
	if !ip.IsValid() || ip.IsUnspecified() {
		return bound.Addr().IsUnspecified()
	}
	return ip.Unmap() == bound.Addr().Unmap()
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
	var dropped []handover.Listener
	for i, f := range h.files {
		if f != nil {
			h.log.Info("listener not in the configuration: closed here; the old process closes its own",
				"listener", h.listeners[i].Name, "address", h.listeners[i].Address, "bound", h.listeners[i].Bound)
			f.Close()
			h.files[i] = nil
			dropped = append(dropped, h.listeners[i])
		}
	}
	ready := &handover.Ready{PID: os.Getpid(), Accepts: []string{handover.AcceptTunnels}}
	if srv.KernelAdopted() {
		ready.Accepts = append(ready.Accepts, handover.AcceptBPF)
	}
	err := h.conn.Send(handover.Message{Type: handover.TypeReady, Ready: ready}, nil)
	if err != nil {
		// The old process gave up waiting (timeout) and killed this one, or is gone: nothing to tell.
		h.log.Warn("upgrade: could not tell the old process that this one serves", "pid", h.from, "err", err)
		h.conn.Close()
		h.conn = nil
		return
	}
	h.removeDroppedAdminSocket(dropped)
	a := &adopter{conn: h.conn, srv: srv, from: h.from, log: h.log}
	h.conn = nil
	// Until the old process is done, its tunnels may still come: a drain (this process upgraded in turn,
	// or stopped) waits for them rather than end with none and exit while they are on the way.
	release := srv.HoldDrain()
	go func() {
		defer release()
		a.run()
	}()
}

// removeDroppedAdminSocket removes the file of an offered Unix-socket admin that this process did not adopt
// (dropped: its configuration has no admin there). The old process lets go of its admin socket without removing the
// file, which a new process that adopted it serves on; so the process that knows the file is no longer
// served removes it, once it has told the old one that it serves (before, the old one might keep serving).
func (h *inheritance) removeDroppedAdminSocket(dropped []handover.Listener) {
	for _, l := range dropped {
		path, isUnix := config.AdminSocket(l.Address)
		if l.Kind != handover.KindAdmin || !isUnix {
			continue
		}
		if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != os.ModeSocket {
			continue // gone, or no longer the socket: not this process's to remove
		}
		if err := os.Remove(path); err != nil {
			h.log.Warn("upgrade: could not remove the admin socket the configuration no longer has", "path", path, "err", err)
			continue
		}
		h.log.Info("admin socket not in the configuration: its file removed", "path", path)
	}
}

// kernelObjects hands the old process's BPF objects to the relay this process starts
// (relay.Config.KernelObjects); nil when it offered none.
func (h *inheritance) kernelObjects() map[string]*os.File {
	if h == nil {
		return nil
	}
	objs := h.bpf
	h.bpf = nil
	return objs
}

// fail tells the old process why this one cannot take over; it keeps serving.
func (h *inheritance) fail(reason string) {
	if h == nil || h.conn == nil {
		return
	}
	closeAllFiles(h.files)
	closeAllFiles(slices.Collect(maps.Values(h.bpf)))
	_ = h.conn.Send(handover.Message{Type: handover.TypeFailed, Failed: &handover.Failed{Reason: reason}}, nil)
	h.conn.Close()
	h.conn = nil
}
