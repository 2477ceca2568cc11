#!/usr/bin/env bash
# Checks, and as root installs from Debian, what the test suite needs besides Go: gcc (for the race
# detector), python3-websockets (the interop peer) and chromium (the browser test, TestChromium).
# Without root it only says what is missing.
set -euo pipefail

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
/usr/bin/python3 -c 'import websockets' >/dev/null 2>&1 || missing+=(python3-websockets)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
. "$(dirname "$0")/lib/packages.sh"
install_packages scripts/deps.sh ${missing[@]+"${missing[@]}"}
