package loader

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestProbeDecisions(t *testing.T) {
	const all = 1<<capBPF | 1<<capNetAdmin | 1<<capPerfmon
	ok := func() error { return nil }
	fail := func(msg string) func() error { return func() error { return errors.New(msg) } }
	base := func() hostFacts {
		return hostFacts{
			kernel:       func() string { return "6.1.0-test" },
			effective:    func() (uint64, error) { return all, nil },
			btf:          ok,
			removeMemlck: ok,
			haveSockhash: ok,
			haveSkSKB:    ok,
			haveKfunc:    func(string) error { return nil },
			load:         ok,
		}
	}
	for _, tc := range []struct {
		name   string
		change func(*hostFacts)
		// wantErr lists substrings of Report.Err; empty means the probe passes.
		wantErr []string
		// loaded says whether the probe went as far as loading the objects.
		loaded bool
	}{
		{"everything present", func(*hostFacts) {}, nil, true},
		{"root via CAP_SYS_ADMIN", func(h *hostFacts) {
			h.effective = func() (uint64, error) { return 1<<capSysAdmin | 1<<capNetAdmin, nil }
		}, nil, true},
		{"unprivileged", func(h *hostFacts) { h.effective = func() (uint64, error) { return 0, nil } },
			[]string{"kernel 6.1.0-test", "capabilities: missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON", "run as root"}, false},
		{"no CAP_NET_ADMIN", func(h *hostFacts) {
			h.effective = func() (uint64, error) { return 1<<capBPF | 1<<capPerfmon, nil }
		}, []string{"missing CAP_NET_ADMIN"}, false},
		{"no BTF", func(h *hostFacts) { h.btf = fail("stat /sys/kernel/btf/vmlinux: no such file") },
			[]string{"btf: stat /sys/kernel/btf/vmlinux", "CONFIG_DEBUG_INFO_BTF"}, true},
		{"memlock", func(h *hostFacts) { h.removeMemlck = fail("operation not permitted") },
			[]string{"memlock: operation not permitted", "RLIMIT_MEMLOCK"}, true},
		{"kernel without sockmap", func(h *hostFacts) { h.haveSockhash = fail("sockhash not supported") },
			[]string{"sockhash: sockhash not supported", "CONFIG_BPF_STREAM_PARSER"}, false},
		// A container runtime's default seccomp profile: bpf(2) fails with EPERM whatever the capabilities.
		{"seccomp forbids bpf", func(h *hostFacts) {
			h.haveSockhash = func() error { return fmt.Errorf("detect support for SockHash: %w", unix.EPERM) }
			h.haveSkSKB = func() error { return fmt.Errorf("detect support for SkSKB: load program: %w", unix.EPERM) }
		}, []string{"sockhash: detect support for SockHash: operation not permitted; bpf(2) was refused although the capabilities are present: a seccomp filter",
			"sk_skb: detect support for SkSKB: load program: operation not permitted; bpf(2) was refused"}, false},
		// Debian 12's 6.1: sockmap works, but without bpf_cast_to_kern_ctx the verdict cannot cut repeats.
		{"kernel without bpf_cast_to_kern_ctx", func(h *hostFacts) {
			h.haveKfunc = func(name string) error { return errors.New("kernel has no " + name) }
		}, []string{"repeat cut: kernel has no bpf_cast_to_kern_ctx", "Linux 6.2"}, false},
		{"verifier refuses", func(h *hostFacts) { h.load = fail("load BPF objects: verifier: invalid access") },
			[]string{"load: load BPF objects: verifier"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := base()
			tc.change(&h)
			loaded := false
			load := h.load
			h.load = func() error { loaded = true; return load() }
			err := probe(h).Err()
			if len(tc.wantErr) == 0 && err != nil {
				t.Fatalf("probe failed: %v", err)
			}
			if len(tc.wantErr) > 0 && err == nil {
				t.Fatal("probe passed, want a failure")
			}
			for _, want := range tc.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			if loaded != tc.loaded {
				t.Errorf("objects loaded: %v, want %v", loaded, tc.loaded)
			}
		})
	}
}

// TestProbeLive runs the real probe: CI runs as root on a kernel with sockmap, where it must pass.
func TestProbeLive(t *testing.T) {
	r := Probe()
	for _, c := range r.Checks {
		t.Logf("%-12s ok=%v %s", c.Name, c.OK, c.Detail)
	}
	if err := r.Err(); err != nil {
		requireBPF(t, err)
	}
}

// TestProbeDecisionsPerKernel: the probe's verdict on each kernel the project is tested on, from the facts
// recorded there (docs/kernels.md, scripts/vmtest.sh): Debian 12's 6.1 has sockhash, sk_skb and BTF but
// not the kfunc the verdict needs to cut repeated bytes, so sockmap is refused there and only there.
func TestProbeDecisionsPerKernel(t *testing.T) {
	const all = 1<<capBPF | 1<<capNetAdmin | 1<<capPerfmon
	ok := func() error { return nil }
	for _, tc := range []struct {
		release string
		kfuncs  []string // the kfuncs the kernel's BTF has, of those the probe asks about
		wantErr string   // "" when sockmap is available
	}{
		{"6.1.0-56-amd64", nil, "repeat cut: kernel has no bpf_cast_to_kern_ctx"},
		{"6.12.117+deb12-amd64", []string{"bpf_cast_to_kern_ctx"}, ""},
		{"6.18.44-fc-v595", []string{"bpf_cast_to_kern_ctx"}, ""},
	} {
		t.Run(tc.release, func(t *testing.T) {
			h := hostFacts{
				kernel:       func() string { return tc.release },
				effective:    func() (uint64, error) { return all, nil },
				btf:          ok,
				removeMemlck: ok,
				haveSockhash: ok,
				haveSkSKB:    ok,
				haveKfunc: func(name string) error {
					if slices.Contains(tc.kfuncs, name) {
						return nil
					}
					return errors.New("kernel has no " + name)
				},
				load: ok,
			}
			err := probe(h).Err()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("probe refused sockmap: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("probe error %v, want one saying %q", err, tc.wantErr)
			case err != nil && !strings.Contains(err.Error(), "kernel "+tc.release):
				t.Errorf("probe error %q does not name the kernel", err)
			}
		})
	}
}
