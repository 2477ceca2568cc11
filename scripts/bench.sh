#!/usr/bin/env bash
# make bench: sockrelay on each datapath this host runs, nginx and HAProxy, and the upstream directly, all
# on this machine in one run, with the same load generator (bin/wsbench) and the same echo upstream
# (bin/wsecho). Writes docs/bench/RESULTS.md and the JSON of every measurement under docs/bench/json/.
#
#   scripts/bench.sh [quick|full]     quick (default) takes about 3 minutes on 2 cores
#
# Workloads: idle (memory per idle tunnel), rtt (32-byte round trips at 1 and at 1000 tunnels), throughput
# (one stream of 64 KiB messages, one way), handshakes (new tunnels per second) and cpu (whole-machine CPU
# per message at 10 000 messages/s, less the same load sent directly, measured just before in the same call).
# The charts (docs/bench/*.svg) are drawn from the same JSON by bench_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-quick}
case "$mode" in
quick) duration=3s idle_tunnels=3000 ;;
full) duration=20s idle_tunnels=9000 ;;
*)
	echo "usage: scripts/bench.sh [quick|full]" >&2
	exit 2
	;;
esac

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "scripts/bench.sh: needs nginx and haproxy; install them with: sudo apt-get install -y nginx haproxy" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends nginx haproxy >/dev/null
	# Debian starts both as services on their default ports; this benchmark runs its own.
	systemctl stop nginx haproxy 2>/dev/null || true
fi
make build >/dev/null

work=$(mktemp -d)
out=docs/bench
mkdir -p "$out/json"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	[ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

upstream=127.0.0.1:19000
bin/wsecho -listen "$upstream" 2>"$work/wsecho.log" &
echo_pid=$!
pids+=("$echo_pid")

cat >"$work/nginx.conf" <<EOF
# The seed article's configuration: proxy_pass, the Upgrade and Connection headers, HTTP/1.1, a long
# proxy_read_timeout. Two workers, as this machine has two cores.
worker_processes 2;
worker_rlimit_nofile 20000;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 20000; }
http {
	access_log off;
	upstream websocket { server $upstream; }
	server {
		listen 127.0.0.1:18084;
		location / {
			proxy_pass http://websocket;
			proxy_http_version 1.1;
			proxy_set_header Upgrade \$http_upgrade;
			proxy_set_header Connection "upgrade";
			proxy_read_timeout 3600s;
		}
	}
}
EOF

cat >"$work/haproxy.cfg" <<EOF
global
	# 2 descriptors a connection: 9900 fits the 20 000 descriptor limit of these machines.
	maxconn 9900
defaults
	mode http
	timeout connect 5s
	timeout client 30s
	timeout server 30s
	timeout tunnel 1h
frontend fe
	bind 127.0.0.1:18085
	default_backend be
backend be
	server s1 $upstream
EOF

# start_target NAME starts one relay and sets target_url and target_pids (space-separated).
start_target() {
	case "$1" in
	direct)
		target_url="ws://$upstream/"
		target_pids=""
		;;
	sockrelay-*)
		local dp=${1#sockrelay-}
		bin/sockrelay run --listen 127.0.0.1:18081 --upstream "$upstream" --datapath "$dp" --log-level warn \
			2>"$work/$1.log" &
		target_pid=$!
		pids+=("$target_pid")
		target_url="ws://127.0.0.1:18081/"
		target_pids=$target_pid
		;;
	nginx)
		nginx -c "$work/nginx.conf"
		sleep 0.5
		target_url="ws://127.0.0.1:18084/"
		target_pids=$(pgrep -P "$(cat "$work/nginx.pid")" | paste -sd, -)
		;;
	haproxy)
		haproxy -f "$work/haproxy.cfg" 2>"$work/haproxy.log" &
		target_pid=$!
		pids+=("$target_pid")
		target_url="ws://127.0.0.1:18085/"
		target_pids=$target_pid
		;;
	esac
	# Wait until a WebSocket goes through it.
	for _ in $(seq 50); do
		bin/wsbench rtt -url "$target_url" -tunnels 1 -duration 100ms >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	echo "scripts/bench.sh: $1 does not relay WebSockets; see $work" >&2
	return 1
}

stop_target() {
	case "$1" in
	direct) ;;
	nginx) kill "$(cat "$work/nginx.pid")" && sleep 0.5 ;;
	haproxy) kill -TERM "$target_pid" && wait "$target_pid" 2>/dev/null || true ;; # SIGINT does not stop it
	*) kill -INT "$target_pid" && wait "$target_pid" 2>/dev/null || true ;;
	esac
}

targets=(direct)
bin/sockrelay doctor >"$work/doctor.txt"
for dp in sockmap splice copy; do
	if grep -q "^  $dp *available" "$work/doctor.txt"; then
		targets+=("sockrelay-$dp")
	else
		echo "scripts/bench.sh: sockrelay $dp is unavailable here, left out; sockrelay doctor says:" >&2
		cat "$work/doctor.txt" >&2
	fi
done
targets+=(nginx haproxy)

for t in "${targets[@]}"; do
	echo "== $t" >&2
	start_target "$t"
	# idle first, on a fresh process, so its RSS grows from the start-up baseline.
	idle_pid_flag=()
	[ -n "$target_pids" ] && idle_pid_flag=(-pid "$target_pids")
	n=$idle_tunnels
	# splice holds two pipes per tunnel: 6 descriptors, so at most 3000 tunnels fit a 20 000 limit.
	[ "$t" = sockrelay-splice ] && n=$((n < 3000 ? n : 3000))
	bin/wsbench idle -url "$target_url" -tunnels "$n" "${idle_pid_flag[@]}" -settle 3s \
		-json "$out/json/$t-idle.json" >&2
	bin/wsbench rtt -url "$target_url" -tunnels 1 -duration "$duration" -json "$out/json/$t-rtt1.json" >&2
	bin/wsbench rtt -url "$target_url" -tunnels 1000 -duration "$duration" -json "$out/json/$t-rtt1000.json" >&2
	bin/wsbench throughput -url "${target_url}sink" -duration "$duration" -json "$out/json/$t-throughput.json" >&2
	bin/wsbench handshakes -url "$target_url" -duration "$duration" -json "$out/json/$t-handshakes.json" >&2
	# The direct baseline is measured again beside each target, so both see the same machine state.
	direct_flag=()
	[ "$t" != direct ] && direct_flag=(-direct "ws://$upstream/")
	bin/wsbench cpu -url "$target_url" "${direct_flag[@]}" -tunnels 100 -rate 10000 -duration "$duration" \
		-json "$out/json/$t-cpu.json" >&2
	stop_target "$t"
done

/usr/bin/python3 scripts/bench_report.py "$out" "$mode" "${targets[@]}"
echo "wrote $out/RESULTS.md" >&2
