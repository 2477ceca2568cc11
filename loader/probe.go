package loader

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Check is one thing the kernel datapath needs, and whether this host has it.
type Check struct {
	Name   string // what was checked, e.g. "capabilities"
	OK     bool
	Detail string // what was found; when not OK, why and what to do
}

// Report is what Probe found, in the order it checked.
type Report struct {
	Kernel string // release, as uname -r prints it
	Checks []Check
}

// Err returns nil when every check passed, or an error naming each one that failed and why.
func (r Report) Err() error {
	var failed []string
	for _, c := range r.Checks {
		if !c.OK {
			failed = append(failed, c.Name+": "+c.Detail)
		}
	}
	if len(failed) == 0 {
		return nil
	}
	return fmt.Errorf("kernel %s: %s", r.Kernel, strings.Join(failed, "; "))
}

// Capability numbers from linux/capability.h; x/sys/unix has them too, but not CAP_BPF on every version.
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

// hostFacts are what Probe reads from the running system; tests substitute recorded ones.
type hostFacts struct {
	kernel       func() string
	effective    func() (uint64, error) // effective capability set, bit n = capability n
	btf          func() error
	removeMemlck func() error
	haveSockhash func() error
	haveSkSKB    func() error
	haveKfunc    func(name string) error
	load         func() error
}

var liveHost = hostFacts{
	kernel:       kernelRelease,
	effective:    effectiveCaps,
	btf:          func() error { _, err := os.Stat("/sys/kernel/btf/vmlinux"); return err },
	removeMemlck: rlimit.RemoveMemlock,
	haveSockhash: func() error { return features.HaveMapType(ebpf.SockHash) },
	haveSkSKB:    func() error { return features.HaveProgramType(ebpf.SkSKB) },
	haveKfunc:    kernelHasFunc,
	load: func() error {
		s, err := Open(Options{})
		if err != nil {
			return err
		}
		return s.Close()
	},
}

// Probe checks, in order, everything the kernel datapath needs, and says precisely what is missing: the
// privileges, BTF, the memlock limit, sockhash maps and sk_skb programs in this kernel, and finally that
// the sockrelay objects load and attach. A failed step stops the steps that depend on it.
func Probe() Report { return probe(liveHost) }

func probe(h hostFacts) Report {
	r := Report{Kernel: h.kernel()}
	add := func(name string, err error, okDetail, fix string) bool {
		if err != nil {
			r.Checks = append(r.Checks, Check{Name: name, Detail: fmt.Sprintf("%v%s", err, fix)})
			return false
		}
		r.Checks = append(r.Checks, Check{Name: name, OK: true, Detail: okDetail})
		return true
	}

	caps, err := h.effective()
	if err == nil {
		err = missingCaps(caps)
	}
	privileged := add("capabilities", err, "CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
		"; run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (e.g. systemd AmbientCapabilities=)")
	add("btf", h.btf(), "/sys/kernel/btf/vmlinux present", "; the kernel needs CONFIG_DEBUG_INFO_BTF=y")
	if !privileged {
		return r
	}
	add("memlock", h.removeMemlck(), "BPF memory is accounted to the cgroup or the limit was lifted",
		"; raise RLIMIT_MEMLOCK (ulimit -l unlimited, or LimitMEMLOCK=infinity in the unit)")
	err = h.haveSockhash()
	kernelOK := add("sockhash", err, "BPF_MAP_TYPE_SOCKHASH supported", streamParserFix(err))
	err = h.haveSkSKB()
	kernelOK = add("sk_skb", err, "BPF_PROG_TYPE_SK_SKB supported", streamParserFix(err)) && kernelOK
	// Without it the verdict cannot see an skb's sequence number, so it cannot cut bytes TCP hands it a
	// second time (bpf/sockrelay.c); it would pass them on. The program still loads (the kfunc is weak),
	// so this is checked on its own: a kernel that would corrupt streams is refused.
	kernelOK = add("repeat cut", h.haveKfunc("bpf_cast_to_kern_ctx"), "bpf_cast_to_kern_ctx present: the verdict cuts bytes TCP repeats",
		"; the kernel datapath needs Linux 6.2 or later here, or TCP's repeated bytes could reach the peer twice") && kernelOK
	if kernelOK {
		add("load", h.load(), "sockrelay's BPF objects load and attach", "")
	}
	return r
}

// streamParserFix is the advice for a failed sockhash or sk_skb check: the kernel option they need, unless
// bpf(2) itself was refused (EPERM) although the capabilities are present, which is a seccomp filter's
// doing or a security module's: container runtimes' default seccomp profiles allow bpf(2) only with
// CAP_SYS_ADMIN.
func streamParserFix(err error) string {
	if errors.Is(err, unix.EPERM) {
		return "; bpf(2) was refused although the capabilities are present: a seccomp filter forbids it (a container runtime's default profile allows it only with CAP_SYS_ADMIN: docs/deploy.md, \"Kubernetes\") or a security module does"
	}
	return "; the kernel needs CONFIG_BPF_STREAM_PARSER=y"
}

// missingCaps says which capabilities the kernel datapath lacks in set. CAP_SYS_ADMIN stands in for
// CAP_BPF and CAP_PERFMON on every kernel; CAP_PERFMON is needed for the helpers that read the peer's
// TCP state.
func missingCaps(set uint64) error {
	has := func(c int) bool { return set&(1<<c) != 0 }
	var missing []string
	if !has(capBPF) && !has(capSysAdmin) {
		missing = append(missing, "CAP_BPF")
	}
	if !has(capNetAdmin) {
		missing = append(missing, "CAP_NET_ADMIN")
	}
	if !has(capPerfmon) && !has(capSysAdmin) {
		missing = append(missing, "CAP_PERFMON")
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s", strings.Join(missing, ", "))
	}
	return nil
}

// kernelHasFunc reports whether the running kernel's BTF has a function of that name (a kfunc).
func kernelHasFunc(name string) error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("read kernel BTF: %w", err)
	}
	var fn *btf.Func
	if err := spec.TypeByName(name, &fn); err != nil {
		return fmt.Errorf("kernel has no %s: %w", name, err)
	}
	return nil
}

func effectiveCaps() (uint64, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, fmt.Errorf("capget: %w", err)
	}
	return uint64(data[0].Effective) | uint64(data[1].Effective)<<32, nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}
