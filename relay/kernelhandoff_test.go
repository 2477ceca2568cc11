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
			old, err := sockmap.Start(slog.New(slog.DiscardHandler), nil, 0) // as the old process's engine
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { old.Close() })
			files, err := old.Export()
			if err != nil {
				t.Fatal(err)
			}
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

// dupOf returns a file of a duplicate of f's descriptor.
func dupOf(t *testing.T, f *os.File) *os.File {
	t.Helper()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fd), f.Name())
}
