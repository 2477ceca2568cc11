#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: every package, with the race detector.
set -euo pipefail
cd "$(dirname "$0")/.."

"$(dirname "$0")/deps.sh"
go version
go vet ./...
go test -race -count=1 -timeout 15m "$@" ./...

# The fuzz targets of the two parsers that face the network, briefly: the handshake path (request
# parsing and header handling) and the PROXY protocol reader. A crasher found here is written under
# testdata/fuzz/ and, committed, becomes a regression case of the normal run above.
if [ $# -eq 0 ]; then
	go test -run '^$' -fuzz '^FuzzHandshake$' -fuzztime 5s ./relay/
	go test -run '^$' -fuzz '^FuzzRead$' -fuzztime 5s ./proxyproto/
fi
