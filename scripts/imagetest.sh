#!/usr/bin/env bash
# The container image tested for real, as root (CI runs it after fleettest.sh): packaging/Containerfile
# built with podman on a Debian 12 base made here with debootstrap (no container registry needed), then
# run as its non-root user with exactly the unit's four capabilities: the binary carries them as file
# capabilities, `sockrelay doctor` finds sockmap usable and its self-test passing; without one of the
# four in the bounding set the kernel refuses to start it; under the runtime's default seccomp profile
# (Podman 4.3's allows bpf(2) only with CAP_SYS_ADMIN) doctor says why sockmap is refused and splice is
# left (docs/deploy.md, "Kubernetes"). Every step that cannot be done is a failure. About a minute, most
# of it debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "scripts/imagetest.sh: FAIL: $*" >&2; exit 1; }
step() { echo "imagetest: $*"; }
[ "$(id -u)" -eq 0 ] || fail "must run as root (debootstrap, podman)"

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v getcap >/dev/null 2>&1 || need+=(libcap2-bin)
. scripts/lib/packages.sh
install_packages scripts/imagetest.sh ${need[@]+"${need[@]}"}
start=$(date +%s)

tmp=$(mktemp -d)
base=localhost/sockrelay-imagetest-base:$$ image=localhost/sockrelay-imagetest:$$
cleanup() {
	podman rmi -f "$image" "$base" >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT

arch=$(dpkg --print-architecture)
version=$(git describe --tags --always --dirty)
step "make release for $arch ($version)"
ARCHES=$arch scripts/release.sh >"$tmp/release.log" 2>&1 || { cat "$tmp/release.log"; fail "make release"; }

# The Containerfile's default base is debian:bookworm-slim from a registry; the same release made from
# Debian's archive stands in for it (BASE), so that the build needs only Debian's mirror.
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
step "debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 ||
	{ tail -n 20 "$tmp/debootstrap.log"; fail "debootstrap"; }
rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb
tar -C "$tmp/rootfs" -c . | podman import - "$base" >"$tmp/import.log" 2>&1 || { cat "$tmp/import.log"; fail "podman import of the base"; }
rm -rf "$tmp/rootfs"

step "podman build -f packaging/Containerfile"
# chroot isolation: the RUN steps need no OCI runtime (crun refuses this machine's hybrid cgroups).
podman build --isolation=chroot -f packaging/Containerfile --build-arg BASE="$base" \
	--build-arg VERSION="$version" --build-arg TARGETARCH="$arch" -t "$image" . >"$tmp/build.log" 2>&1 ||
	{ tail -n 30 "$tmp/build.log"; fail "podman build"; }

mnt=$(podman image mount "$image")
getcap "$mnt/usr/bin/sockrelay" | grep -q 'cap_net_bind_service,cap_net_admin,cap_perfmon,cap_bpf=ep' ||
	{ getcap "$mnt/usr/bin/sockrelay"; podman image unmount "$image" >/dev/null; fail "the image's binary lacks the unit's four file capabilities"; }
podman image unmount "$image" >/dev/null
[ "$(podman image inspect -f '{{.Config.User}}' "$image")" = "65532:65532" ] || fail "the image's user is not 65532:65532"

# runc rather than crun (hybrid cgroups); the rlimits podman would copy from itself are refused here.
run=(podman --runtime runc --cgroup-manager=cgroupfs run --rm --network host
	--ulimit nofile=20000:20000 --ulimit nproc=4096:4096 --cap-drop ALL)
four=(--cap-add BPF,NET_ADMIN,PERFMON,NET_BIND_SERVICE)

step "doctor as 65532 with the four capabilities (seccomp unconfined)"
"${run[@]}" "${four[@]}" --security-opt seccomp=unconfined "$image" doctor >"$tmp/doctor.txt" 2>&1 ||
	{ cat "$tmp/doctor.txt"; fail "sockrelay doctor in the image"; }
grep -Eq '^ +sockmap +available' "$tmp/doctor.txt" && grep -q '^sockmap self-test: ok' "$tmp/doctor.txt" ||
	{ cat "$tmp/doctor.txt"; fail "doctor in the image does not find sockmap usable"; }

step "without CAP_PERFMON in the bounding set the kernel refuses to run the binary"
if "${run[@]}" --cap-add BPF,NET_ADMIN,NET_BIND_SERVICE --security-opt seccomp=unconfined "$image" version >"$tmp/three.txt" 2>&1; then
	cat "$tmp/three.txt"
	fail "the binary started without one of its file capabilities"
fi
grep -q 'operation not permitted' "$tmp/three.txt" || { cat "$tmp/three.txt"; fail "not refused with EPERM"; }

step "under the runtime's default seccomp profile"
"${run[@]}" "${four[@]}" "$image" doctor >"$tmp/doctor-seccomp.txt" 2>&1 || true
grep -Eq '^ +splice +available' "$tmp/doctor-seccomp.txt" || { cat "$tmp/doctor-seccomp.txt"; fail "splice unavailable in the image"; }
# Which datapath is left is the runtime's choice (Podman 4.3's profile allows bpf(2) only with
# CAP_SYS_ADMIN); when sockmap is refused, doctor must say that seccomp refused it, not the kernel.
if grep -Eq '^ +sockmap +unavailable' "$tmp/doctor-seccomp.txt"; then
	grep -q 'sockhash .*bpf(2) was refused although the capabilities are present: a seccomp filter' "$tmp/doctor-seccomp.txt" ||
		{ cat "$tmp/doctor-seccomp.txt"; fail "doctor does not blame the seccomp filter for sockmap"; }
	echo "imagetest: the default seccomp profile refuses bpf(2); doctor says so, and auto runs splice"
else
	echo "imagetest: the default seccomp profile allows bpf(2): sockmap available"
fi

echo "scripts/imagetest.sh: passed in $(($(date +%s) - start))s"
