#!/usr/bin/env bash
# The .deb tested for real, as root (CI runs it after make test): builds the package for this machine's
# architecture, installs it with dpkg, runs the packaged binary as the user sockrelay with exactly the
# capabilities its unit grants (setpriv, as systemd would), shows that `sockrelay doctor` finds sockmap
# usable and that `sockrelay run` with the packaged configuration (its datapath forced to sockmap) relays a WebSocket on sockmap to an
# echo upstream, then purges the package and checks that nothing of it is left. Every step that cannot
# be done is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "scripts/pkgtest.sh: FAIL: $*" >&2; exit 1; }
step() { echo "pkgtest: $*"; }
[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs a package)"
for cmd in dpkg dpkg-query setpriv systemd-analyze curl getent; do
	command -v "$cmd" >/dev/null 2>&1 || fail "$cmd is missing"
done
/usr/bin/python3 -c 'import websockets' 2>/dev/null || fail "python3-websockets is missing (scripts/deps.sh installs it)"
if dpkg-query -W -f='${Status}' sockrelay 2>/dev/null | grep -q installed || getent passwd sockrelay >/dev/null; then
	fail "sockrelay is already installed, or its user exists: this test needs a machine without them (dpkg --purge sockrelay)"
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	dpkg-query -W sockrelay >/dev/null 2>&1 && dpkg --purge sockrelay >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT

arch=$(dpkg --print-architecture)
step "make release for $arch"
ARCHES=$arch scripts/release.sh >"$tmp/release.log" 2>&1 || { cat "$tmp/release.log"; fail "make release"; }
debs=(dist/sockrelay_*_"$arch".deb)
[ ${#debs[@]} -eq 1 ] && [ -f "${debs[0]}" ] || fail "expected one .deb for $arch in dist/, found: ${debs[*]}"
(cd dist && sha256sum --quiet -c SHA256SUMS) || fail "dist/SHA256SUMS does not match"

step "dpkg -i ${debs[0]}"
dpkg -i "${debs[0]}" || fail "dpkg -i"
for f in /usr/bin/sockrelay /lib/systemd/system/sockrelay.service /etc/sockrelay/sockrelay.yaml; do
	[ -f "$f" ] || fail "$f not installed"
done
dpkg-query -W -f='${Conffiles}\n' sockrelay | grep -q ' /etc/sockrelay/sockrelay.yaml ' ||
	fail "/etc/sockrelay/sockrelay.yaml is not a conffile"
uid=$(id -u sockrelay) || fail "postinst created no user sockrelay"
[ "$uid" -lt 1000 ] || fail "user sockrelay has uid $uid, not a system user's"
getent group sockrelay >/dev/null || fail "postinst created no group sockrelay"
/usr/bin/sockrelay version | grep -q "^sockrelay $(git describe --tags --always --dirty) ($(git rev-parse --short=12 HEAD)) " ||
	fail "sockrelay version says '$(/usr/bin/sockrelay version)', not this checkout's version and commit"

step "systemd-analyze verify sockrelay.service"
systemd-analyze verify /lib/systemd/system/sockrelay.service || fail "systemd-analyze verify"

# Exactly the capabilities the unit grants: its AmbientCapabilities, which must equal its bounding set.
unit_caps() { sed -n "s/^$1=//p" /lib/systemd/system/sockrelay.service; }
ambient=$(unit_caps AmbientCapabilities)
[ -n "$ambient" ] && [ "$ambient" = "$(unit_caps CapabilityBoundingSet)" ] ||
	fail "the unit's AmbientCapabilities ($ambient) and CapabilityBoundingSet differ"
caps=-all
for c in $ambient; do
	c=${c#CAP_}
	caps+=",+${c,,}"
done
# setpriv execs the command, so a command started in the background with it has its own PID.
as_unit=(setpriv --reuid sockrelay --regid sockrelay --init-groups --no-new-privs
	--inh-caps="$caps" --ambient-caps="$caps" --bounding-set="$caps")
step "running as sockrelay with $caps"

"${as_unit[@]}" /usr/bin/sockrelay doctor >"$tmp/doctor.txt" || { cat "$tmp/doctor.txt"; fail "sockrelay doctor"; }
grep -Eq '^ +sockmap +available' "$tmp/doctor.txt" && grep -q '^sockmap self-test: ok' "$tmp/doctor.txt" ||
	{ cat "$tmp/doctor.txt"; fail "sockrelay doctor does not find sockmap usable with the unit's capabilities"; }

# The packaged configuration relays 127.0.0.1:8080 to 127.0.0.1:9000, with the admin listener on 9180.
go build -o "$tmp/wsecho" ./cmd/wsecho
"$tmp/wsecho" -listen 127.0.0.1:9000 >"$tmp/wsecho.log" 2>&1 &
pids+=($!)
notify=sockrelay-pkgtest-$$
/usr/bin/python3 -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + sys.argv[1])
print("bound", flush=True)
while True:
    print(s.recv(4096).decode(), flush=True)
' "$notify" >"$tmp/notify.log" &
pids+=($!)
for _ in $(seq 50); do grep -q bound "$tmp/notify.log" && break; sleep 0.1; done
grep -q bound "$tmp/notify.log" || fail "no notify socket to listen on"
# --datapath sockmap: under the packaged `auto` a tunnel starts on whichever engine the start measurement
# finds cheaper on this host (the event loop, on the CI machines), and this test is about the kernel
# datapath running with the unit's capabilities.
NOTIFY_SOCKET=@$notify "${as_unit[@]}" /usr/bin/sockrelay run --config /etc/sockrelay/sockrelay.yaml --datapath sockmap \
	>"$tmp/relay.log" 2>&1 &
relay=$!
pids+=("$relay")
# Readiness as the unit's Type=notify gets it: READY=1 on $NOTIFY_SOCKET, here an abstract socket (which
# the user sockrelay may write to), once the listeners accept.
for _ in $(seq 100); do
	grep -qx 'READY=1' "$tmp/notify.log" && break
	kill -0 "$relay" 2>/dev/null || { cat "$tmp/relay.log"; fail "sockrelay run exited before serving"; }
	sleep 0.1
done
grep -qx 'READY=1' "$tmp/notify.log" || { cat "$tmp/relay.log"; fail "no READY=1 on NOTIFY_SOCKET 10s after the start"; }
grep -q 'msg="datapath chosen" datapath=sockmap' "$tmp/relay.log" ||
	{ cat "$tmp/relay.log"; fail "sockrelay run did not choose sockmap"; }
status=/proc/$relay/status
[ "$(awk '/^Uid:/ {print $3}' "$status")" = "$uid" ] || fail "the relay does not run as sockrelay"
effective=$(awk '/^CapEff:/ {print $2}' "$status")
granted=$("${as_unit[@]}" awk '/^CapEff:/ {print $2}' /proc/self/status)
[ "$effective" = "$granted" ] || fail "the relay's effective capabilities $effective are not the unit's $granted"

step "a WebSocket through the packaged relay"
/usr/bin/python3 - <<'PY' || { cat "$tmp/relay.log"; fail "no WebSocket through the relay on sockmap"; }
import asyncio, json, urllib.request
import websockets

async def main():
    async with websockets.connect("ws://127.0.0.1:8080/", max_size=None) as ws:
        for msg in ["hello through the .deb", bytes(range(256)) * 400]:
            await ws.send(msg)
            echo = await ws.recv()
            assert echo == msg, f"echo of a {len(msg)}-byte message differs"
        with urllib.request.urlopen("http://127.0.0.1:9180/debug/tunnels", timeout=5) as r:
            tunnels = json.load(r)
        if isinstance(tunnels, dict):
            tunnels = tunnels.get("tunnels", [])
        paths = [t["datapath"] for t in tunnels]
        assert paths == ["sockmap"], f"/debug/tunnels: datapaths {paths}, want one sockmap tunnel"
    print("pkgtest: text and a 100 KiB binary message echoed over a sockmap tunnel")

asyncio.run(main())
PY

step "systemctl reload's SIGHUP: RELOADING=1, then READY=1 with the outcome"
kill -HUP "$relay"
for _ in $(seq 100); do grep -q '^STATUS=' "$tmp/notify.log" && break; sleep 0.1; done
grep -qx 'RELOADING=1' "$tmp/notify.log" && grep -q '^MONOTONIC_USEC=[0-9]' "$tmp/notify.log" &&
	grep -qx 'STATUS=configuration reloaded' "$tmp/notify.log" ||
	{ cat "$tmp/notify.log" "$tmp/relay.log"; fail "no RELOADING=1, MONOTONIC_USEC and READY=1 with STATUS=configuration reloaded on SIGHUP"; }

kill -TERM "$relay"
code=0
wait "$relay" || code=$?
[ "$code" -eq 0 ] || { cat "$tmp/relay.log"; fail "sockrelay run exited $code on SIGTERM"; }
grep -q 'reason=closed' "$tmp/relay.log" || { cat "$tmp/relay.log"; fail "the tunnel did not end cleanly"; }
grep -qx 'STOPPING=1' "$tmp/notify.log" || fail "no STOPPING=1 on NOTIFY_SOCKET when the relay drained"

step "dpkg --purge sockrelay"
dpkg --purge sockrelay || fail "dpkg --purge"
for f in /usr/bin/sockrelay /lib/systemd/system/sockrelay.service /etc/sockrelay /usr/share/doc/sockrelay; do
	[ ! -e "$f" ] || fail "$f is left after purge"
done
! getent passwd sockrelay >/dev/null || fail "user sockrelay is left after purge"
! getent group sockrelay >/dev/null || fail "group sockrelay is left after purge"
! dpkg-query -W sockrelay >/dev/null 2>&1 || fail "dpkg still knows the package"
echo "scripts/pkgtest.sh: passed"
