#!/usr/bin/env bash
# The README's first command: builds sockrelay and the bundled echo upstream, starts the echo server on
# 127.0.0.1:9000 and the relay on 127.0.0.1:8080 in front of it (admin on 127.0.0.1:9180, with the admin
# token in bin/admin.token, made at the first run), configured by the commented example file
# config/example.yaml, and stops both on Ctrl-C. Extra arguments go to `sockrelay run` and override the
# file (e.g. --datapath copy).
set -euo pipefail
cd "$(dirname "$0")/.."

# Go 1.26 or newer builds the binaries: the one on PATH, else /usr/local/go's (where scripts/install-go.sh
# puts it). Without one, root gets it installed as CI does; anyone else is told how.
go_ok() {
	[[ "$("$1" env GOVERSION 2>/dev/null)" =~ ^go([0-9]+)\.([0-9]+) ]] &&
		{ [ "${BASH_REMATCH[1]}" -gt 1 ] || [ "${BASH_REMATCH[2]}" -ge 26 ]; }
}
if ! go_ok go; then
	if go_ok /usr/local/go/bin/go; then
		PATH="/usr/local/go/bin:$PATH"
	elif [ "$(id -u)" = 0 ]; then
		echo "make run: no Go 1.26 or newer on PATH or in /usr/local/go; installing it with scripts/install-go.sh" >&2
		PATH="$(scripts/install-go.sh):$PATH"
	else
		cat >&2 <<'MSG'
make run: sockrelay is built from source and needs Go 1.26 or newer; none is on PATH or in /usr/local/go.
  Install it with   sudo scripts/install-go.sh   (go1.26.8 into /usr/local/go, from the Go module proxy)
  or from https://go.dev/dl/, then run make run again.
MSG
		exit 1
	fi
fi

mkdir -p bin
go build -o bin/sockrelay ./cmd/sockrelay
go build -o bin/wsecho ./cmd/wsecho

# The admin API's changes (reload included) need a token; the demo keeps one beside its binaries.
if [ ! -s bin/admin.token ]; then
  (umask 077 && head -c 32 /dev/urandom | base64 > bin/admin.token)
fi

bin/wsecho --listen 127.0.0.1:9000 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT

cat <<MSG >&2

  relay:    ws://127.0.0.1:8080/ (a page at http://127.0.0.1:8080/ opens a WebSocket through it)
  metrics:  http://127.0.0.1:9180/metrics   tunnels: http://127.0.0.1:9180/debug/tunnels
  try:      /usr/bin/python3 -m websockets ws://127.0.0.1:8080/   (Debian's python3-websockets)
  pools:    http://127.0.0.1:9180/admin/pools   reload after editing config/example.yaml: kill -HUP, or
            bin/sockrelay reload --config config/example.yaml --admin-token-file bin/admin.token

MSG
bin/sockrelay run --config config/example.yaml --admin-token-file bin/admin.token "$@"
