#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: every package, with the race detector.
set -euo pipefail
cd "$(dirname "$0")/.."

"$(dirname "$0")/deps.sh"
go version
go vet ./...
# Progress: go test alone prints a package's results only once all its tests have run (minutes for relay),
# so its -json events go through a small formatter that prints each top-level test as it ends, with the
# time since the start; the whole output of a test that fails or is skipped; and each package's ok/FAIL
# line. Failures still fail the script (pipefail).
progress=$(cat <<'EOF'
import json, sys, time

start = time.monotonic()
held = {}  # (package, top-level test) -> its output lines, shown only if it fails or is skipped
result = {}  # package -> its "ok" or "FAIL" line, shown when it ends, after what its tests left open


def say(line):
    m, s = divmod(int(time.monotonic() - start), 60)
    print(f"[{m:2d}:{s:02d}] {line}", flush=True)


def short(pkg):
    return pkg.split("/", 3)[-1] if pkg.count("/") >= 3 else pkg


def show(lines):
    for line in lines:
        if not line.startswith(("=== RUN", "=== PAUSE", "=== CONT", "=== NAME")):
            sys.stdout.write(line)
    sys.stdout.flush()


for raw in sys.stdin:
    try:
        ev = json.loads(raw)
    except ValueError:
        sys.stdout.write(raw)  # not an event: pass it on as it is
        continue
    action, pkg, test = ev.get("Action"), ev.get("Package", ""), ev.get("Test")
    out = ev.get("Output", "")
    if action == "build-output":
        sys.stdout.write(out)
    elif action == "start":
        say(f"{short(pkg)}: running its tests")
    elif test:
        top = test.split("/")[0]
        if action == "output":
            held.setdefault((pkg, top), []).append(out)
        elif test == top and action in ("pass", "fail", "skip"):
            lines = held.pop((pkg, top), [])
            if action != "pass":
                show(lines)
            say(f"--- {action.upper()}: {short(pkg)}.{test} ({ev.get('Elapsed', 0):.1f}s)")
    elif action == "output":
        if out.startswith(("ok  ", "FAIL\t", "?   ")):
            result[pkg] = out.rstrip("\n")
        elif out.strip() not in ("PASS", "FAIL"):
            sys.stdout.write(out)  # the package's own output: TestMain's notes, a panic
            sys.stdout.flush()
    elif action in ("pass", "fail", "skip"):
        # A test still open when its package ended (a panic, a timeout) never reported: show all it said.
        for key in [k for k in held if k[0] == pkg]:
            if action == "fail":
                show(held[key])
            del held[key]
        say(result.pop(pkg, f"{action} {pkg}"))
EOF
)
echo "go test -race: compiling the test binaries (minutes on a cold build cache), then one line per test"
go test -race -count=1 -timeout 15m -json "$@" ./... | python3 -u -c "$progress"

# The fuzz targets of the two parsers that face the network, briefly: the handshake path (request
# parsing and header handling) and the PROXY protocol reader. A crasher found here is written under
# testdata/fuzz/ and, committed, becomes a regression case of the normal run above.
if [ $# -eq 0 ]; then
	go test -run '^$' -fuzz '^FuzzHandshake$' -fuzztime 5s ./relay/
	go test -run '^$' -fuzz '^FuzzRead$' -fuzztime 5s ./proxyproto/
fi
