package loader

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/bpf"
)

// TestAdoptCarriesOnAfterExporterCloses: objects exported by one Sockmap and adopted by another are the
// same objects: the adopter sees the tunnel's counters go on from where they were, and after the exporter
// closed, the verdict still runs on a tunnel the adopter inserts then (Close left it attached: a psock
// keeps the programs it was created with, so only a later insertion shows a detach); the adopter takes
// the tunnels out and every map is empty.
func TestAdoptCarriesOnAfterExporterCloses(t *testing.T) {
	tn := openTunnel(t, 4<<20)
	msg, got := bytes.Repeat([]byte{'a'}, 100), make([]byte, 100)
	mustWrite(t, tn.client, msg)
	mustReadFull(t, tn.upstream, got)

	files, err := tn.s.Export()
	if err != nil {
		t.Fatal(err)
	}
	s2, err := Adopt(files)
	if err != nil {
		t.Fatalf("adopt the objects just exported: %v", err)
	}
	t.Cleanup(func() { s2.Close() })
	if err := tn.s.Close(); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, tn.client, msg)
	mustReadFull(t, tn.upstream, got)
	mustWrite(t, tn.upstream, msg)
	mustReadFull(t, tn.client, got)
	st, err := s2.Stats(tn.a.Cookie)
	if err != nil {
		t.Fatal(err)
	}
	if st.Bytes != 200 {
		t.Errorf("the adopter counts %d bytes redirected from the client, want 200 (100 before the export)", st.Bytes)
	}
	if err := s2.SetControl(tn.a.Cookie, Control{Peer: tn.b.Cookie, HeldLimit: 4 << 20}); err != nil {
		t.Errorf("set_control over adopted maps: %v", err)
	}
	if _, err := s2.EventsLost(); err != nil {
		t.Errorf("events_lost over the adopted .bss: %v", err)
	}
	client, a := loopbackPair(t)
	upstream, b := loopbackPair(t)
	later := testTunnel{s: s2, client: client, upstream: upstream, a: socketOf(t, a, 4<<20), b: socketOf(t, b, 4<<20)}
	if err := s2.Insert(later.a, later.b); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, later.client, msg)
	waitRedirected(t, s2, later.a.Cookie)
	mustReadFull(t, later.upstream, got)
	if err := s2.Remove(tn.a, tn.b, later.a, later.b); err != nil {
		t.Fatal(err)
	}
	n, err := s2.Entries()
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range n {
		if c != 0 {
			t.Errorf("map %s holds %d entries after the tunnel left, want 0", name, c)
		}
	}
}

// TestAdoptRefusesOtherObjects: objects that are not the ones this binary loads are refused with
// ErrIncompatible, naming what differs, and every file given is closed.
func TestAdoptRefusesOtherObjects(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, files map[string]*os.File)
		want   string
	}{
		{"a map of another size", func(t *testing.T, files map[string]*os.File) {
			replace(t, files, bpf.SockrelayMapTargets, newMapFile(t, &ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 8, ValueSize: 8, MaxEntries: 1 << 10}))
		}, "MaxEntries"},
		{"a map of another type", func(t *testing.T, files map[string]*os.File) {
			replace(t, files, bpf.SockrelayMapSocks, newMapFile(t, &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}))
		}, "Type"},
		{"a program of another build", func(t *testing.T, files map[string]*os.File) {
			replace(t, files, bpf.SockrelayProgSetControl, newSyscallProgFile(t))
		}, "tag"},
		{"the programs swapped", func(t *testing.T, files map[string]*os.File) {
			files[bpf.SockrelayProgSetControl], files[bpf.SockrelayProgSockrelayVerdict] =
				files[bpf.SockrelayProgSockrelayVerdict], files[bpf.SockrelayProgSetControl]
		}, "type"},
		{"a map missing", func(t *testing.T, files map[string]*os.File) {
			files[bpf.SockrelayMapEvents].Close()
			delete(files, bpf.SockrelayMapEvents)
		}, "events is missing"},
		{"an unknown object", func(t *testing.T, files map[string]*os.File) {
			files["extra"] = newMapFile(t, &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
		}, `unknown object "extra"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(Options{})
			if err != nil {
				requireBPF(t, err)
			}
			t.Cleanup(func() { s.Close() })
			files, err := s.Export()
			if err != nil {
				t.Fatal(err)
			}
			tc.change(t, files)
			s2, err := Adopt(files)
			if err == nil {
				s2.Close()
				t.Fatal("adopted objects that are not this binary's")
			}
			if !errors.Is(err, ErrIncompatible) || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Errorf("error %q: want ErrIncompatible naming %q", err, tc.want)
			}
			for name, f := range files {
				if _, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); err == nil {
					t.Errorf("file %s left open", name)
				}
			}
		})
	}
}

// waitRedirected waits up to a second for the verdict to count an skb of the socket cookie.
func waitRedirected(t *testing.T, s *Sockmap, cookie uint64) {
	t.Helper()
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if st, err := s.Stats(cookie); err == nil && st.Skbs > 0 {
			return
		}
	}
	t.Fatalf("no verdict ran on socket %d's bytes: the verdict is no longer attached", cookie)
}

// replace puts f in files under name, closing the file it replaces.
func replace(t *testing.T, files map[string]*os.File, name string, f *os.File) {
	t.Helper()
	files[name].Close()
	files[name] = f
}

// newMapFile creates a map of spec and returns a file of its descriptor.
func newMapFile(t *testing.T, spec *ebpf.MapSpec) *os.File {
	t.Helper()
	m, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return dupFile(t, m.FD())
}

// newSyscallProgFile loads a syscall program that returns 0, set_control's type with other instructions,
// and returns a file of its descriptor.
func newSyscallProgFile(t *testing.T) *os.File {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.Syscall, Flags: unix.BPF_F_SLEEPABLE, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	return dupFile(t, p.FD())
}

func dupFile(t *testing.T, fd int) *os.File {
	t.Helper()
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(d), "bpf-test")
}
