#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: every package, with the race detector.
set -euo pipefail
cd "$(dirname "$0")/.."

"$(dirname "$0")/deps.sh"
go version
go vet ./...
go test -race -count=1 -timeout 15m "$@" ./...
