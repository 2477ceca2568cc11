// Package loader owns the BPF objects of the kernel datapath: it loads them, attaches the verdict program,
// optionally pins the maps, inserts and removes tunnel sockets in the right order, reads their counters,
// and closes everything. It is the only package that imports cilium/ebpf.
package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/sockrelay/sockrelay/bpf"
)

// Options configure Open.
type Options struct {
	// PinPath, when set, pins the maps there (e.g. /sys/fs/bpf/sockrelay) so bpftool can show them. The
	// pins are removed by Close.
	PinPath string
}

// Sockmap is the loaded kernel datapath: two sockhashes, the per-socket state map (what userspace tells the
// verdict and the verdict's counters, one entry per socket), the ring buffer of demotion events, the
// verdict program attached to one of the sockhashes, and the program that updates a socket's control. One
// Sockmap serves every kernel tunnel of a process.
type Sockmap struct {
	objs     sockrelayObjects
	attached bool
	// shared is set once another process may hold these objects (Export, Adopt): Close then leaves the
	// verdict attached, since the other process's tunnels still need it.
	shared  bool
	pinPath string
	events  *ringbuf.Reader

	mu     sync.Mutex
	closed bool
}

// Open loads the BPF objects and attaches the verdict program. On any failure it closes what it opened.
func Open(opts Options) (_ *Sockmap, err error) {
	s := &Sockmap{}
	if err := loadObjects(&s.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load BPF objects: verifier: %w", err)
		}
		return nil, fmt.Errorf("load BPF objects: %w", err)
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	// The stream verdict without a stream parser (kernel 5.13+): a parser only adds a copy. RawAttachProgram
	// works on every kernel we support; the bpf_link form for sockmaps needs 6.10.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  s.objs.VerdictMap.FD(),
		Program: s.objs.SockrelayVerdict,
		Attach:  ebpf.AttachSkSKBVerdict,
	}); err != nil {
		return nil, fmt.Errorf("attach verdict program to sockhash: %w", err)
	}
	s.attached = true
	if s.events, err = ringbuf.NewReader(s.objs.Events); err != nil {
		return nil, fmt.Errorf("open demotion event ring buffer: %w", err)
	}
	if opts.PinPath != "" {
		if err := s.pin(opts.PinPath); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func (s *Sockmap) pin(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pin maps: %w", err)
	}
	s.pinPath = dir
	for name, m := range s.maps() {
		if err := m.Pin(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("pin map %s under %s: %w", name, dir, err)
		}
	}
	return nil
}

func (s *Sockmap) maps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		bpf.SockrelayMapTargets:    s.objs.Targets,
		bpf.SockrelayMapVerdictMap: s.objs.VerdictMap,
		bpf.SockrelayMapSocks:      s.objs.Socks,
		bpf.SockrelayMapEvents:     s.objs.Events,
	}
}

// Close detaches the program, unpins and closes every object. Sockets still in the maps leave them when the
// maps are freed. It is safe to call more than once.
func (s *Sockmap) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var errs []error
	if s.events != nil {
		// First: a ReadModeChange blocked in another goroutine returns ErrClosed.
		if err := s.events.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close demotion event reader: %w", err))
		}
	}
	if s.attached && !s.shared {
		if err := link.RawDetachProgram(link.RawDetachProgramOptions{
			Target:  s.objs.VerdictMap.FD(),
			Program: s.objs.SockrelayVerdict,
			Attach:  ebpf.AttachSkSKBVerdict,
		}); err != nil {
			errs = append(errs, fmt.Errorf("detach verdict program: %w", err))
		}
	}
	if s.pinPath != "" {
		for _, m := range s.maps() {
			if err := m.Unpin(); err != nil {
				errs = append(errs, err)
			}
		}
		_ = os.Remove(s.pinPath)
	}
	if err := s.objs.close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Socket is one tunnel socket as the kernel datapath knows it.
type Socket struct {
	FD     int
	Cookie uint64
	// HeldLimit is the most bytes the kernel may hold for this socket's direction (redirected, not yet in
	// the peer's send queue) before the verdict demotes the socket to pass mode; 0 means no limit.
	HeldLimit uint64
}

// Control is what userspace tells the verdict about a socket whose passed bytes it relays.
type Control struct {
	Peer        uint64 // cookie of the peer socket
	HeldLimit   uint64 // see Socket.HeldLimit
	UserRead    uint64 // passed bytes userspace has read from the socket and written to the peer
	UserWritten uint64 // bytes userspace has written into the peer since the insertion
	// ResumeGen asks the verdict to return to redirecting after the demotion with this number, at the
	// first skb that finds UserRead equal to the bytes it passed; 0 asks nothing.
	ResumeGen uint64
}

// Insert hands a tunnel's two sockets to the kernel. Order matters (docs/datapath.md, "How a tunnel enters
// the kernel"): each socket's state (its info and zeroed counters) first, then both sockets into the program-less target map,
// and only then into the verdict map, so that no verdict runs before its peer can be redirected to. On
// failure everything inserted is removed again.
func (s *Sockmap) Insert(a, b Socket) (err error) {
	defer func() {
		if err != nil {
			s.Remove(a, b)
		}
	}()
	for _, p := range [][2]Socket{{a, b}, {b, a}} {
		state := bpf.SockrelayTunnelSock{Ctl: bpf.SockrelaySockInfo{Peer: p[1].Cookie, Limit: p[0].HeldLimit}}
		if err := s.objs.Socks.Update(p[0].Cookie, state, ebpf.UpdateNoExist); err != nil {
			return fmt.Errorf("add socket %d to state map: %w", p[0].Cookie, err)
		}
	}
	for _, m := range []struct {
		name string
		m    *ebpf.Map
	}{{"target", s.objs.Targets}, {"verdict", s.objs.VerdictMap}} {
		for _, sk := range []Socket{a, b} {
			if err := m.m.Update(sk.Cookie, uint64(sk.FD), ebpf.UpdateNoExist); err != nil {
				return fmt.Errorf("insert socket %d into %s sockhash: %w", sk.Cookie, m.name, err)
			}
		}
	}
	return nil
}

// Remove takes a tunnel's sockets out of every map: the verdict map first, so no verdict runs for them
// while their targets go. Entries that are already gone are not an error.
func (s *Sockmap) Remove(socks ...Socket) error {
	var errs []error
	for _, m := range []*ebpf.Map{s.objs.VerdictMap, s.objs.Targets, s.objs.Socks} {
		for _, sk := range socks {
			if err := m.Delete(sk.Cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("remove socket %d from %s: %w", sk.Cookie, m, err))
			}
		}
	}
	return errors.Join(errs...)
}

// StopVerdict takes sockets out of the verdict map only: the verdict stops running on their bytes
// (sock_map_del_link restores their data_ready), which then stay in each socket's receive queue, while the
// sockets stay targets and keep their counters, so that bytes already redirected into them are still sent.
// Passed bytes a socket's psock still queues must be read before: once out of the verdict map the socket
// reads them without advancing its copied_seq (tcp_bpf_recvmsg, not tcp_bpf_recvmsg_parser), and TCP then
// never finds the bytes after them (tcp_recvmsg_locked warns "TCP recvmsg seq # bug"). RestartVerdict puts
// them back. Remove takes them out of the rest. Entries that are already gone are not an error.
func (s *Sockmap) StopVerdict(socks ...Socket) error {
	var errs []error
	for _, sk := range socks {
		if err := s.objs.VerdictMap.Delete(sk.Cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("remove socket %d from the verdict map: %w", sk.Cookie, err))
		}
	}
	return errors.Join(errs...)
}

// RestartVerdict puts sockets that StopVerdict took out back into the verdict map (sockets given by FD and
// Cookie), which runs the verdict on their bytes again from the next data_ready.
func (s *Sockmap) RestartVerdict(socks ...Socket) error {
	for _, sk := range socks {
		if err := s.objs.VerdictMap.Update(sk.Cookie, uint64(sk.FD), ebpf.UpdateNoExist); err != nil {
			return fmt.Errorf("insert socket %d into verdict sockhash again: %w", sk.Cookie, err)
		}
	}
	return nil
}

// ErrNotInMaps is returned for a socket that has left the maps (its tunnel is ending).
var ErrNotInMaps = errors.New("socket not in the maps")

// SetControl replaces what the verdict reads about a socket in the maps. It fails with ErrNotInMaps once
// the socket has left them, and never puts it back. The socket's entry also holds the verdict's counters,
// which a map update would overwrite, so the set_control program writes the control fields in place.
func (s *Sockmap) SetControl(cookie uint64, c Control) error {
	args := bpf.SockrelayControlArgs{Cookie: cookie, Ctl: bpf.SockrelaySockInfo{Peer: c.Peer,
		Limit: c.HeldLimit, UserRead: c.UserRead, UserWritten: c.UserWritten, ResumeGen: c.ResumeGen}}
	ret, err := s.objs.SetControl.Run(&ebpf.RunOptions{Context: args})
	switch {
	case err != nil:
		return fmt.Errorf("update info of socket %d: run set_control: %w", cookie, err)
	case ret == controlNotInMap:
		return fmt.Errorf("update info of socket %d: %w", cookie, ErrNotInMaps)
	case ret != 0:
		return fmt.Errorf("update info of socket %d: set_control returned %d", cookie, ret)
	}
	return nil
}

// controlNotInMap is what set_control returns for a socket that is not in the state map.
const controlNotInMap = 1

// Stats are a socket's counters as the verdict program keeps them.
type Stats struct {
	Bytes     uint64 // bytes redirected to the peer
	Skbs      uint64 // skbs redirected
	LastNs    uint64 // CLOCK_MONOTONIC time of the last skb in ns, from the coarse clock (≤ 1 tick early)
	Dropped   uint64 // skbs dropped because the peer was not a target
	Passed    uint64 // bytes passed to the socket's own receive queue while demoted
	Demotions uint64 // times the socket was demoted
	Demoted   bool   // the verdict passes this socket's skbs now instead of redirecting them
	// Broken: an skb repeated bytes already delivered and could not be cut; the verdict drops every
	// later skb, and the tunnel must be reset.
	Broken bool
	// Overlaps counts skbs that began before the byte the verdict expected next (TCP queued a segment
	// overlapping bytes already delivered); OverlapBytes, the bytes they repeated.
	Overlaps, OverlapBytes uint64
}

// Stats reads the counters of a socket.
func (s *Sockmap) Stats(cookie uint64) (Stats, error) {
	var state bpf.SockrelayTunnelSock
	if err := s.objs.Socks.Lookup(cookie, &state); err != nil {
		return Stats{}, fmt.Errorf("read counters of socket %d: %w", cookie, err)
	}
	return statsOf(state.St), nil
}

// statsOf is the verdict's counters of a socket as Stats.
func statsOf(v bpf.SockrelaySockStats) Stats {
	return Stats{Bytes: v.Bytes, Skbs: v.Skbs, LastNs: v.LastNs, Dropped: v.Dropped, Passed: v.Passed,
		Demotions: v.Demotions, Demoted: v.Mode != 0, Broken: v.Broken != 0, Overlaps: v.Overlaps,
		OverlapBytes: v.OverlapBytes}
}

// statsBatch is how many sockets one batched read of the state map returns at most: a hash map's batch
// returns whole buckets, and fails with ENOSPC only when a bucket holds more than this.
const statsBatch = 4096

// StatsAll reads the counters of every socket in the state map, statsBatch sockets a system call, and calls
// fn with each: a sampler that wants every tunnel's counters pays one system call per statsBatch sockets,
// not one per socket (Stats). The map may change while it is read (a batch read of a hash map walks it
// bucket by bucket): a socket inserted meanwhile may be missed, one removed may be seen, none twice.
// Where the objects are shared with another process, its sockets are in the map too.
func (s *Sockmap) StatsAll(fn func(cookie uint64, st Stats)) error {
	return s.statsAll(statsBatch, fn)
}

// statsAll is StatsAll with batch sockets a system call (a test's smaller batches cover the cursor).
func (s *Sockmap) statsAll(batch int, fn func(cookie uint64, st Stats)) error {
	keys := make([]uint64, batch)
	vals := make([]bpf.SockrelayTunnelSock, batch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := s.objs.Socks.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			fn(keys[i], statsOf(vals[i].St))
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil // the end of the map, whatever this batch held
		case err != nil:
			return fmt.Errorf("read counters of every socket: %w", err)
		}
	}
}

// ModeChange is the verdict's notice that a socket changed mode.
type ModeChange struct {
	Cookie    uint64
	Demotions uint64 // the socket's demotion count, the last one included
	Kind      ModeChangeKind
}

// ModeChangeKind says what became of a socket.
type ModeChangeKind uint64

const (
	// Demoted: from now on the socket's bytes are passed, for userspace to relay.
	Demoted ModeChangeKind = 0
	// Resumed: the socket's bytes are redirected in the kernel again.
	Resumed ModeChangeKind = 1
	// Broken: an skb repeated bytes already delivered and could not be cut; the verdict drops every
	// later skb of the socket, whose tunnel must be reset.
	Broken ModeChangeKind = 2
)

// ReadModeChange waits for the next mode change. After Close it returns an error that wraps os.ErrClosed.
func (s *Sockmap) ReadModeChange() (ModeChange, error) {
	rec, err := s.events.Read()
	if err != nil {
		return ModeChange{}, fmt.Errorf("read mode event: %w", err)
	}
	if len(rec.RawSample) < 24 {
		return ModeChange{}, fmt.Errorf("mode event of %d bytes, want 24", len(rec.RawSample))
	}
	return ModeChange{
		Cookie:    binary.NativeEndian.Uint64(rec.RawSample[0:8]),
		Demotions: binary.NativeEndian.Uint64(rec.RawSample[8:16]),
		Kind:      ModeChangeKind(binary.NativeEndian.Uint64(rec.RawSample[16:24])),
	}, nil
}

// EventsLost counts mode events the ring buffer had no room for. Userspace finds such demotions on its
// own (see relay's kernel datapath), but a nonzero count means the ring buffer is too small.
func (s *Sockmap) EventsLost() (uint64, error) {
	var n uint64
	if err := s.objs.EventsLost.Get(&n); err != nil {
		return 0, fmt.Errorf("read events_lost: %w", err)
	}
	return n, nil
}

// Entries counts the entries in each map, by map name; tests use it to prove nothing is left behind.
func (s *Sockmap) Entries() (map[string]int, error) {
	out := make(map[string]int)
	for name, m := range s.maps() {
		if m.Type() == ebpf.RingBuf {
			continue // a ring buffer has no keys
		}
		n := 0
		var key uint64
		var prev any // nil: start from the first key
		for {
			err := m.NextKey(prev, &key)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("count entries of %s: %w", name, err)
			}
			n++
			k := key
			prev = &k
		}
		out[name] = n
	}
	return out, nil
}
