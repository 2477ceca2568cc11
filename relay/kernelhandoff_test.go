package relay

import (
	"log/slog"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath/sockmap"
)

// TestNewServerAdoptsKernelObjects: a relay given another process's BPF objects (an upgrade) runs its
// kernel engine over them when they are this binary's; objects of another build, or a datapath other
// than sockmap, leave it on objects of its own (or none), its log saying why.
func TestNewServerAdoptsKernelObjects(t *testing.T) {
	requireSockmap(t)
	for _, tc := range []struct {
		name       string
		datapath   Datapath
		otherBuild bool
		adopted    bool
		log        string
	}{
		{"this binary's objects", DatapathSockmap, false, true, "adopted the old process's BPF objects"},
		{"objects of another build", DatapathSockmap, true, false, "BPF objects were not adopted; its kernel tunnels stay there and drain\" err=\"sockmap: adopt BPF objects: the BPF objects are not the ones this binary loads"},
		{"another datapath", DatapathCopy, false, false, "this process's datapath is not sockmap"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := oldEngineObjects(t)
			if tc.otherBuild { // the events map where the state map belongs: another layout
				files["socks"].Close()
				files["socks"] = dupOf(t, files["events"])
			}
			r := startRelay(t, tc.datapath, []string{"127.0.0.1:1"}, func(c *Config) { c.KernelObjects = files })
			if r.KernelAdopted() != tc.adopted {
				t.Errorf("KernelAdopted() = %v, want %v", r.KernelAdopted(), tc.adopted)
			}
			if r.Datapath() != tc.datapath {
				t.Errorf("datapath %s, want %s", r.Datapath(), tc.datapath)
			}
			if log := r.Log.String(); !strings.Contains(log, tc.log) {
				t.Errorf("the log does not say %q:\n%s", tc.log, log)
			}
		})
	}
}

// oldEngineObjects starts a kernel engine, as the old process's, closed when t ends, and returns the files
// of the BPF objects it exports.
func oldEngineObjects(t *testing.T) map[string]*os.File {
	t.Helper()
	old, err := sockmap.Start(slog.New(slog.DiscardHandler), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Close() })
	files, err := old.Export()
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// dupOf returns a file of a duplicate of f's descriptor.
func dupOf(t *testing.T, f *os.File) *os.File {
	t.Helper()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fd), f.Name())
}

// TestKernelSharingEndsWithEveryReader: a relay that adopted its kernel engine's objects from a live old
// process (A) and exported them to a newer one (C) shares them with both; the end of one leaves the
// engine sharing (its sweeps on) while the other may still read the ring buffer, each end counts once,
// and only the last one ends the sharing.
func TestKernelSharingEndsWithEveryReader(t *testing.T) {
	requireSockmap(t)
	for _, tc := range []struct {
		name  string
		steps []string // "export", "withdraw", "unshare"; the engine must stay shared until the last
	}{
		{"the new process failed, the old one reads on", []string{"export", "withdraw", "withdraw"}},
		{"the old process stopped, the new one reads on", []string{"export", "unshare", "unshare"}},
		{"a failed upgrade, then a second one that took the objects", []string{"export", "withdraw", "export", "unshare"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := oldEngineObjects(t)
			r := startRelay(t, DatapathSockmap, []string{"127.0.0.1:1"}, func(c *Config) { c.KernelObjects = files })
			if !r.KernelAdopted() {
				t.Fatal("the relay did not adopt the objects")
			}
			for i, step := range tc.steps {
				switch step {
				case "export":
					exported, err := r.ExportKernel()
					if err != nil {
						t.Fatal(err)
					}
					for _, f := range exported {
						f.Close()
					}
				case "withdraw":
					r.WithdrawKernelExport()
				case "unshare":
					r.UnshareKernel()
				}
				if !r.kernel.Shared() {
					t.Fatalf("after %v the engine no longer shares its objects, while another process may still read them", tc.steps[:i+1])
				}
			}
			switch tc.steps[len(tc.steps)-1] {
			case "withdraw":
				r.UnshareKernel()
			default:
				r.WithdrawKernelExport()
			}
			if r.kernel.Shared() {
				t.Error("the engine still shares its objects once both other processes stopped reading")
			}
		})
	}
}
