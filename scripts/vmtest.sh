#!/usr/bin/env bash
# Runs sockrelay's privileged tests on other kernels: boots each KERNEL under qemu with an initramfs that
# holds busybox and the compiled test binaries, runs scripts/vmtest/guest.sh inside, and reads the verdict
# from the serial console. Prints pass or fail per kernel; exits 1 if any kernel failed.
#
#   scripts/vmtest.sh 6.1 6.12          Debian 12's kernel and the 6.12 that bookworm also ships
#   scripts/vmtest.sh host              the same checks on the running kernel, without a VM (needs root)
#   scripts/vmtest.sh linux-image-6.1.0-56-amd64 /boot/vmlinuz-...   a Debian package, or a bzImage file
#
# Environment (all optional):
#   VMTEST_FLAVOR   Debian kernel flavor, amd64 (default: what a Debian 12 server runs) or cloud-amd64
#   VMTEST_EXPECT   sockmap or no-sockmap, for every KERNEL; default: from the table below
#   VMTEST_STEPS    guest.sh's steps to run (default "doctor auto loader sockmap relay sockrelay dmesg"); the step
#                   "failing" runs a test that fails on purpose (scripts/vmtest_test.sh)
#   VMTEST_TIMEOUT  seconds one kernel may take, boot to power-off (default 420)
#   VMTEST_KVM=1    use KVM (-enable-kvm -cpu host) instead of software emulation (TCG, the default:
#                   nested KVM guests crash on our 2-core cloud VMs, see docs/kernels.md)
#   VMTEST_CPU      qemu's -cpu model (default: max under TCG, host under KVM)
#   VMTEST_MEM, VMTEST_SMP   guest memory in MiB (default 4096) and vCPUs (default 2)
#   VMTEST_APPEND   extra kernel command line words
#   VMTEST_VERBOSE=1 stream the whole console here (it always goes to $VMTEST_LOGS/KERNEL.log)
#   VMTEST_CACHE    where kernels and the initramfs go (default .cache/vmtest, ignored by git)
#   VMTEST_LOGS     where each kernel's console log goes (default $VMTEST_CACHE/logs)
#
# Kernels come from Debian's archive with `apt-get download`: a Debian 12 machine's own sources have both
# (bookworm and bookworm-security; 6.1 is its kernel, 6.12 the newer one it also ships). Only the package's /boot is unpacked: the checks need no
# module, because every option they rely on is built in (checked below, from the package's config).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# What each kernel must do. A kernel before 6.2 has no bpf_cast_to_kern_ctx, which the verdict needs to cut
# bytes TCP hands it twice (docs/datapath.md), so the probe must refuse sockmap there and `auto` must run
# splice; from 6.2 on sockmap must run, with SOCKRELAY_REQUIRE_BPF=1. docs/kernels.md records the results.
#   alias  metapackage (FLAVOR is VMTEST_FLAVOR)   expected
kernel_table='
6.1    linux-image-FLAVOR                        no-sockmap
6.12   linux-image-6.12-FLAVOR                   sockmap
'

flavor=${VMTEST_FLAVOR:-amd64}
cache=${VMTEST_CACHE:-$root/.cache/vmtest}
logs=${VMTEST_LOGS:-$cache/logs}
timeout_s=${VMTEST_TIMEOUT:-420}
mem=${VMTEST_MEM:-4096}
smp=${VMTEST_SMP:-2}
steps=${VMTEST_STEPS:-}

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}
[ $# -gt 0 ] || usage
case "$1" in -h | --help) usage ;; esac

# The host tools, installed from Debian when missing and we are root (as scripts/deps.sh does).
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
. "$(dirname "$0")/lib/packages.sh"
install_packages scripts/vmtest.sh ${need[@]+"${need[@]}"}

mkdir -p "$cache/debs" "$cache/kernels" "$logs"

# expect_for VERSION: sockmap from 6.2 on, else no-sockmap (VMTEST_EXPECT overrides).
expect_for() {
	if [ -n "${VMTEST_EXPECT:-}" ]; then
		echo "$VMTEST_EXPECT"
		return
	fi
	local major minor
	IFS=. read -r major minor _ <<<"$1"
	minor=${minor%%[!0-9]*}
	if ! [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]]; then
		echo "no kernel version in '$1': set VMTEST_EXPECT to sockmap or no-sockmap" >&2
		return 1
	fi
	if [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 2 ]; }; then echo sockmap; else echo no-sockmap; fi
}

# resolve KERNEL: sets pkg (Debian package, or empty), image (bzImage path, or empty) and expect.
resolve() {
	local arg=$1 meta want
	pkg='' image='' expect=''
	if [ -f "$arg" ]; then
		image=$arg
		expect=$(expect_for "$(basename "$arg" | sed 's/^vmlinuz-//')") || return 1
		return
	fi
	case "$arg" in
	linux-image-*) pkg=$arg ;;
	*)
		read -r meta want < <(awk -v k="$arg" '$1 == k { print $2, $3 }' <<<"$kernel_table")
		if [ -z "${meta:-}" ]; then
			echo "unknown kernel '$arg': give an alias ($(awk 'NF { printf "%s ", $1 }' <<<"$kernel_table")), host, a linux-image-* package or a bzImage file" >&2
			return 1
		fi
		meta=${meta//FLAVOR/$flavor}
		pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
		if [ -z "$pkg" ]; then
			echo "apt knows no $meta: kernel $arg comes from Debian 12 (bookworm and bookworm-security); add those sources and run apt-get update" >&2
			return 1
		fi
		;;
	esac
	expect=$(expect_for "${pkg#linux-image-}") || return 1
	if [ -n "${want:-}" ] && [ -z "${VMTEST_EXPECT:-}" ] && [ "$want" != "$expect" ]; then
		echo "kernel $arg: the table expects $want but $pkg's version says $expect; fix kernel_table" >&2
		return 1
	fi
}

first() { echo "$1"; }

# fetch: downloads $pkg once and unpacks its /boot; sets image and checks the config.
fetch() {
	local dir=$cache/kernels/$pkg deb cfg missing=()
	if [ ! -d "$dir/boot" ]; then
		deb=$(first "$cache/debs/${pkg}_"*.deb)
		if [ ! -f "$deb" ]; then
			echo "downloading $pkg" >&2
			(cd "$cache/debs" && apt-get download "$pkg" 2>&1 | grep -v 'unsandboxed as root' >&2) || true
			deb=$(first "$cache/debs/${pkg}_"*.deb)
			[ -f "$deb" ] || { echo "apt-get download $pkg failed" >&2; return 1; }
		fi
		rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
		dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir.tmp" ./boot
		mv "$dir.tmp" "$dir"
	fi
	image=$(first "$dir"/boot/vmlinuz-*)
	cfg=$(first "$dir"/boot/config-*)
	# Built in, not modules: the initramfs carries none.
	for opt in BPF_SYSCALL BPF_STREAM_PARSER NET_SOCK_MSG DEBUG_INFO_BTF BLK_DEV_INITRD DEVTMPFS \
		SERIAL_8250_CONSOLE INET UNIX; do
		grep -qx "CONFIG_$opt=y" "$cfg" || missing+=("CONFIG_$opt")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "$pkg: not built in: ${missing[*]} (this runner boots without modules)" >&2
		return 1
	fi
}

# The initramfs: busybox, /init, guest.sh and the test binaries, built from the working tree once per run.
build() {
	local r=$cache/initramfs a
	rm -rf "$r" && mkdir -p "$r/bin" "$r/vmtest/bin" "$r/proc" "$r/sys" "$r/dev" "$r/tmp"
	echo "building the test binaries (static, CGO_ENABLED=0, no -race)" >&2
	export CGO_ENABLED=0
	go test -c -o "$r/vmtest/bin/loader.test" ./loader
	go test -c -o "$r/vmtest/bin/sockmap.test" ./datapath/sockmap
	go test -c -o "$r/vmtest/bin/relay.test" ./relay
	go test -c -o "$r/vmtest/bin/sockrelay.test" ./cmd/sockrelay
	go build -o "$r/vmtest/bin/sockrelay" ./cmd/sockrelay
	go test -c -o "$r/vmtest/bin/failing.test" ./scripts/vmtest/testdata/failing
	cp /bin/busybox "$r/bin/busybox"
	for a in $(/bin/busybox --list); do
		# busybox's setpriv lacks --bounding-set, which TestRunSockmapRefusedSaysWhy needs; without any
		# setpriv that test skips where sockmap runs, as it says.
		[ "$a" = busybox ] || [ "$a" = setpriv ] || ln -s busybox "$r/bin/$a"
	done
	cp scripts/vmtest/init "$r/init"
	cp scripts/vmtest/guest.sh "$r/vmtest/guest.sh"
	chmod 755 "$r/init" "$r/vmtest/guest.sh"
	(cd "$r" && find . | cpio -o -H newc --quiet) >"$cache/initramfs.cpio"
}

# show NAME: passes on the console lines worth seeing while a kernel runs (all with VMTEST_VERBOSE=1).
show() {
	local filter='^(VMTEST |--- [a-z]+: |--- FAIL|panic: |.*Kernel panic|.*(BUG|WARNING): )'
	[ "${VMTEST_VERBOSE:-}" = 1 ] && filter=''
	grep --line-buffered -E "$filter" | sed -u "s/^/  $1| /"
}

# boot NAME: runs guest.sh in a VM on $image; sets version and verdict.
boot() {
	local name=$1 log accel cmdline rc
	log=$logs/$(basename "$1").log
	if [ "${VMTEST_KVM:-}" = 1 ]; then
		accel=(-enable-kvm -cpu "${VMTEST_CPU:-host}")
	else
		# TCG. -cpu max offers every instruction set extension QEMU emulates (the Go binaries need none).
		accel=(-accel tcg -cpu "${VMTEST_CPU:-max}")
	fi
	# mitigations=off: no page-table isolation or retpolines, which cost much more under emulation than
	# on hardware and change nothing the relay relies on. tsc=reliable: time from the TSC (vDSO), not
	# from emulated HPET reads, which TCG's timing would otherwise make the clocksource watchdog pick.
	cmdline="console=ttyS0 panic=-1 loglevel=4 mitigations=off tsc=reliable vmtest_expect=$expect"
	[ -n "$steps" ] && cmdline+=" vmtest_steps=${steps// /,}"
	[ -n "${VMTEST_APPEND:-}" ] && cmdline+=" $VMTEST_APPEND"
	echo "== $name: $(basename "$image"), expect $expect, $( [ "${VMTEST_KVM:-}" = 1 ] && echo KVM || echo TCG), log $log"
	set +e
	timeout -k 10 "$timeout_s" qemu-system-x86_64 "${accel[@]}" -m "$mem" -smp "$smp" -nodefaults \
		-display none -serial stdio -monitor none -no-reboot \
		-kernel "$image" -initrd "$cache/initramfs.cpio" -append "$cmdline" </dev/null 2>&1 |
		tr -d '\r' | tee "$log" | show "$name"
	rc=${PIPESTATUS[0]}
	set -e
	version=$(sed -n 's/^VMTEST START kernel \([^,]*\),.*/\1/p' "$log" | head -n 1)
	verdict=$(sed -n 's/^VMTEST RESULT //p' "$log" | tail -n 1)
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		verdict="fail (timed out after ${timeout_s}s${verdict:+; $verdict})"
	elif [ -z "$verdict" ]; then
		verdict="fail (no VMTEST RESULT line; qemu exit $rc)"
	fi
	if [ "${verdict%% *}" != pass ]; then
		echo "  $name| last lines of $log:"
		tail -n 40 "$log" | sed "s/^/  $name|   /"
	fi
}

# host: the same checks on the running kernel, with the same binaries.
run_host() {
	local log=$logs/host.log rc
	version=$(uname -r)
	expect=$(expect_for "$version")
	if [ "$(id -u)" -ne 0 ]; then
		verdict="fail (host: the privileged tests need root)"
		return
	fi
	echo "== host: $version, expect $expect, log $log"
	set +e
	VMTEST_BIN=$cache/initramfs/vmtest/bin VMTEST_EXPECT=$expect VMTEST_STEPS=$steps TMPDIR=${TMPDIR:-/tmp} \
		sh scripts/vmtest/guest.sh 2>&1 | tee "$log" | show host
	rc=${PIPESTATUS[0]}
	set -e
	verdict=$(sed -n 's/^VMTEST RESULT //p' "$log" | tail -n 1)
	[ -n "$verdict" ] || verdict="fail (no VMTEST RESULT line; exit $rc)"
}

build
summary=()
failed=0
for k in "$@"; do
	start=$(date +%s)
	version='' verdict='' expect=''
	if [ "$k" = host ]; then
		run_host
	elif ! resolve "$k" || { [ -n "$pkg" ] && ! fetch; }; then
		verdict="fail (no kernel to boot)"
	else
		boot "$k"
	fi
	took=$(($(date +%s) - start))
	summary+=("$(printf '%-6s %-26s %-11s %4ss  %s' "$k" "${version:-?}" "${expect:-?}" "$took" "$verdict")")
	[ "${verdict%% *}" = pass ] || failed=1
done

echo
echo "vmtest: kernel version expect time result"
printf '%s\n' "${summary[@]}"
exit "$failed"
