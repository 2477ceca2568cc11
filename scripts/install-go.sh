#!/usr/bin/env bash
# Makes Go 1.26 available as /usr/local/go/bin/go when it is missing or older. The toolchain comes from the
# Go module proxy (the same zip the go command's GOTOOLCHAIN download uses), because go.dev is not reachable
# from our machines. Prints the directory to put on PATH.
set -euo pipefail

want=1.26
toolchain=go1.26.8
have=$(PATH="/usr/local/go/bin:$PATH" go env GOVERSION 2>/dev/null || true)
if [[ "$have" =~ ^go([0-9]+)\.([0-9]+) ]] && { [ "${BASH_REMATCH[1]}" -gt 1 ] || [ "${BASH_REMATCH[2]}" -ge 26 ]; }; then
	dirname "$(PATH="/usr/local/go/bin:$PATH" command -v go)"
	exit 0
fi
echo "scripts/install-go.sh: found '${have:-no go}', need go$want; fetching $toolchain from the module proxy" >&2
. "$(dirname "$0")/lib/packages.sh"
command -v unzip >/dev/null 2>&1 || install_packages scripts/install-go.sh unzip
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL -o "$tmp/go.zip" "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-$toolchain.linux-amd64.zip"
unzip -q "$tmp/go.zip" -d "$tmp"
rm -rf /usr/local/go
mv "$tmp/golang.org/toolchain@v0.0.1-$toolchain.linux-amd64" /usr/local/go
echo /usr/local/go/bin
