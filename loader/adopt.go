package loader

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/bpf"
)

// Handing the BPF objects to another process (docs/upgrade.md, "Kernel tunnels"). The sockets of a kernel
// tunnel live in the sockhashes, and the verdict program stays attached to the verdict map as long as the
// map lives, whoever holds it: a process that adopts the maps' descriptors carries on every tunnel in them
// without a byte leaving the kernel. The old process then closes its descriptors without detaching anything.

// sockrelayObjects are bpf2go's objects and the .bss map that holds events_lost, which Export hands over
// with them: the adopting process reads the same lost-event count.
type sockrelayObjects struct {
	bpf.SockrelayObjects
	Bss *ebpf.Map `ebpf:".bss"`
}

// bssMap is the name of the map of the programs' zero-initialised globals (events_lost).
const bssMap = ".bss"

// loadObjects loads the embedded BPF objects into objs; opts may replace maps (Adopt).
func loadObjects(objs *sockrelayObjects, opts *ebpf.CollectionOptions) error {
	spec, err := bpf.LoadSockrelay()
	if err != nil {
		return err
	}
	return spec.LoadAndAssign(objs, opts)
}

// close closes every object.
func (o *sockrelayObjects) close() error {
	err := o.SockrelayObjects.Close()
	if o.Bss != nil {
		err = errors.Join(err, o.Bss.Close())
	}
	return err
}

// ExportedMaps and ExportedPrograms name the objects Export hands over and Adopt wants, each once.
var (
	ExportedMaps     = []string{bpf.SockrelayMapTargets, bpf.SockrelayMapVerdictMap, bpf.SockrelayMapSocks, bpf.SockrelayMapEvents, bssMap}
	ExportedPrograms = []string{bpf.SockrelayProgSockrelayVerdict, bpf.SockrelayProgSetControl}
)

// ErrIncompatible marks BPF objects that Adopt refuses: not the objects this binary would load (another
// BPF build), or not a whole set.
var ErrIncompatible = errors.New("the BPF objects are not the ones this binary loads")

// Export returns a duplicate descriptor of each map and program, by name (ExportedMaps, ExportedPrograms),
// for another process to Adopt; the caller closes the files. From here on Close leaves the verdict
// attached: the other process's tunnels may need it after this one has gone.
func (s *Sockmap) Export() (map[string]*os.File, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("export BPF objects: %w", os.ErrClosed)
	}
	objs := map[string]interface{ FD() int }{
		bpf.SockrelayMapTargets: s.objs.Targets, bpf.SockrelayMapVerdictMap: s.objs.VerdictMap,
		bpf.SockrelayMapSocks: s.objs.Socks, bpf.SockrelayMapEvents: s.objs.Events, bssMap: s.objs.Bss,
		bpf.SockrelayProgSockrelayVerdict: s.objs.SockrelayVerdict, bpf.SockrelayProgSetControl: s.objs.SetControl,
	}
	out := make(map[string]*os.File, len(objs))
	for name, o := range objs {
		fd, err := unix.FcntlInt(uintptr(o.FD()), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			for _, f := range out {
				f.Close()
			}
			return nil, fmt.Errorf("export BPF object %s: F_DUPFD_CLOEXEC: %w", name, err)
		}
		out[name] = os.NewFile(uintptr(fd), "bpf-"+name)
	}
	s.shared = true
	return out, nil
}

// CloseEvents stops this process's reading of the mode-change ring buffer, which it shares with the
// process it handed its objects to: from here on only that process reads the events. While both read,
// an event may be read by either or, rarely, by both (the reader advances the consumer position with a
// load, then a store). A ReadModeChange blocked meanwhile returns an error wrapping os.ErrClosed.
func (s *Sockmap) CloseEvents() error {
	if err := s.events.Close(); err != nil {
		return fmt.Errorf("close demotion event reader: %w", err)
	}
	return nil
}

// Adopt opens the BPF objects another process exported (Export), by name, instead of loading new ones:
// the maps with the sockets already in them and the verdict program attached. It closes every file in
// files. It refuses, with an error wrapping ErrIncompatible that names the first difference, objects
// this binary would not load: a map of another type, key or value size, size or flags, or a program
// whose kernel tag differs from the one this binary's program gets on this kernel (loaded for the
// comparison over the adopted maps, then kept: it is the same program). Nothing is attached: the
// verdict is attached already, and stays so when the adopted Sockmap is closed.
func Adopt(files map[string]*os.File) (_ *Sockmap, err error) {
	adopted, progs, err := openExported(files)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, m := range adopted {
			m.Close() // the loaded collection holds clones
		}
		for _, p := range progs {
			p.Close()
		}
	}()
	s := &Sockmap{shared: true}
	if err := loadObjects(&s.objs, &ebpf.CollectionOptions{MapReplacements: adopted}); err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("adopt BPF objects: %w: %w", ErrIncompatible, err)
		}
		return nil, fmt.Errorf("adopt BPF objects: load this binary's programs over them: %w", err)
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	for name, mine := range map[string]*ebpf.Program{bpf.SockrelayProgSockrelayVerdict: s.objs.SockrelayVerdict,
		bpf.SockrelayProgSetControl: s.objs.SetControl} {
		if err := sameProgram(name, progs[name], mine); err != nil {
			return nil, fmt.Errorf("adopt BPF objects: %w", err)
		}
	}
	if s.events, err = ringbuf.NewReader(s.objs.Events); err != nil {
		return nil, fmt.Errorf("adopt BPF objects: open demotion event ring buffer: %w", err)
	}
	return s, nil
}

// openExported makes maps and programs of the exported files, closing every file; it refuses a set that
// lacks one of the names Export gives or has one more.
func openExported(files map[string]*os.File) (maps map[string]*ebpf.Map, progs map[string]*ebpf.Program, err error) {
	defer func() {
		for _, f := range files {
			f.Close()
		}
		if err != nil {
			for _, m := range maps {
				m.Close()
			}
			for _, p := range progs {
				p.Close()
			}
		}
	}()
	for name := range files {
		if !slices.Contains(ExportedMaps, name) && !slices.Contains(ExportedPrograms, name) {
			return nil, nil, fmt.Errorf("adopt BPF objects: %w: unknown object %q; accepted %s", ErrIncompatible, name,
				strings.Join(append(slices.Clone(ExportedMaps), ExportedPrograms...), ", "))
		}
	}
	maps, progs = map[string]*ebpf.Map{}, map[string]*ebpf.Program{}
	for _, name := range append(slices.Clone(ExportedMaps), ExportedPrograms...) {
		f, ok := files[name]
		if !ok {
			return nil, nil, fmt.Errorf("adopt BPF objects: %w: %s is missing", ErrIncompatible, name)
		}
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("adopt BPF object %s: F_DUPFD_CLOEXEC: %w", name, err)
		}
		if slices.Contains(ExportedMaps, name) {
			m, err := ebpf.NewMapFromFD(fd)
			if err != nil {
				return nil, nil, fmt.Errorf("adopt BPF map %s: %w", name, err)
			}
			maps[name] = m
			continue
		}
		p, err := ebpf.NewProgramFromFD(fd)
		if err != nil {
			return nil, nil, fmt.Errorf("adopt BPF program %s: %w", name, err)
		}
		progs[name] = p
	}
	return maps, progs, nil
}

// sameProgram checks that the adopted program is this binary's: the same type and the same kernel tag (a
// hash of its instructions as the kernel verified them, map descriptors left out) as mine, the same
// program loaded here on the same kernel.
func sameProgram(name string, adopted, mine *ebpf.Program) error {
	a, err := adopted.Info()
	if err != nil {
		return fmt.Errorf("program %s: read the adopted one's info: %w", name, err)
	}
	m, err := mine.Info()
	if err != nil {
		return fmt.Errorf("program %s: read this binary's info: %w", name, err)
	}
	switch {
	case a.Type != m.Type:
		return fmt.Errorf("%w: program %s is of type %s, this binary's of type %s", ErrIncompatible, name, a.Type, m.Type)
	case a.Tag != m.Tag:
		return fmt.Errorf("%w: program %s has tag %s, this binary's has tag %s (another BPF build)", ErrIncompatible, name, a.Tag, m.Tag)
	}
	return nil
}
