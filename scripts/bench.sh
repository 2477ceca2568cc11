#!/usr/bin/env bash
# make bench: sockrelay on each datapath this host runs (and auto), nginx and HAProxy, and the upstream
# directly, all on this machine in one run, with the same load generator (bin/wsbench) and the same echo
# upstream (bin/wsecho). Writes RESULTS.md, the charts and the JSON of every measurement into OUTDIR: by
# default a new temporary folder, printed at the end, so the work tree stays clean; make bench-update passes
# docs/bench.
#
#   scripts/bench.sh [quick|full|smoke] [OUTDIR]     quick (default) takes about 6 minutes on 2 cores
#
# smoke runs every workload for a second or so, to check this script and the report, not to measure;
# BENCH_TARGETS="direct sockrelay-copy nginx" runs only those targets (direct must be among them).
#
# Workloads: idle (memory per idle tunnel), rtt (32-byte round trips: one tunnel in a closed loop, 1000
# tunnels at 10 messages/s each, alternating with the same load sent directly, D,T,T,D,D,T,..., each
# percentile given as the median of target ÷ direct over the pairs of rounds), bulk (one
# stream of whole 64 KiB frames and one of 1 KiB frames, each one way into a sink and both ways through an
# echo, after an unmeasured warm-up, with the relay's demotions, resumes and fallbacks during each), handshakes (new tunnels per second)
# and cpu (whole-machine CPU per message at 10 000 messages/s, alternating with the same load sent directly,
# D,T,D,T,D,T, with the counts that say why) and mixed (the idle tunnels, 100 chatty ones and two bulk
# streams at once). bench_report.py checks that direct bounds every relay and
# writes the report and the charts from the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-quick}
case "$mode" in
# rtt_rounds pairs of rounds of rtt1_round (one tunnel) and rtt1000_round (1000 tunnels) each side, after a
# warm-up of rtt1_warmup and rtt1000_warmup each side: many short pairs, so that the two rounds of a pair
# are close in time and a burst of other work on the machine spoils few pairs, which the median leaves out. bulk_warmup and cpu_warmup run the target's load
# unmeasured first, so that a per-tunnel policy (--datapath auto: a sample of a tunnel's traffic a second,
# and no move before the tunnel is MinDwell, 5 s, old) gets to act before the count.
quick)
	duration=2s bulk_duration=2s cpu_duration=1s cpu_rounds=3 idle_tunnels=3000
	rtt_rounds=10 rtt1_round=150ms rtt1_warmup=500ms rtt1000_round=500ms rtt1000_warmup=1s bulk_warmup=3s cpu_warmup=3s
	;;
full)
	duration=20s bulk_duration=10s cpu_duration=5s cpu_rounds=5 idle_tunnels=9000
	rtt_rounds=10 rtt1_round=1s rtt1_warmup=500ms rtt1000_round=2s rtt1000_warmup=1s bulk_warmup=6s cpu_warmup=6s
	;;
smoke)
	duration=1s bulk_duration=1s cpu_duration=1s cpu_rounds=2 idle_tunnels=200
	rtt_rounds=2 rtt1_round=200ms rtt1_warmup=100ms rtt1000_round=300ms rtt1000_warmup=200ms bulk_warmup=500ms cpu_warmup=500ms
	;;
*)
	echo "usage: scripts/bench.sh [quick|full|smoke] [OUTDIR]" >&2
	exit 2
	;;
esac
out=${2:-$(mktemp -d /tmp/sockrelay-bench.XXXXXX)}

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
	. "$(dirname "$0")/lib/packages.sh"
	install_packages scripts/bench.sh nginx haproxy
	# Debian starts both as services on their default ports; this benchmark runs its own.
	systemctl stop nginx haproxy 2>/dev/null || true
fi
# wsbench cpu counts work-queue executions in a trace instance of its own; a machine that boots without
# tracefs mounted gets it mounted (as root), otherwise the report says the count was left out and why.
if [ ! -d /sys/kernel/tracing/instances ] && [ "$(id -u)" -eq 0 ] && grep -qw tracefs /proc/filesystems; then
	mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
make build >/dev/null
# Round trips are measured with every CPU held out of deep idle states (wsbench rtt -cpus-awake): on a VM
# whose idle CPU halts, waking it costs more than a relay adds, and direct came out slower than a relay.
awake=()
[ -w /dev/cpu_dma_latency ] && awake=(-cpus-awake)

work=$(mktemp -d)
mkdir -p "$out/json"
rm -f "$out"/json/*.json "$out"/logs/*.log "$out/RESULTS.md" # a rerun into the same folder keeps nothing of an earlier run
cat /proc/loadavg >"$out/json/loadavg-start.txt"
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
			--admin "$admin" 2>"$work/$1.log" &
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

# metrics prints a sockrelay target's /metrics (bash's /dev/tcp: no curl needed); nothing for the others.
admin=127.0.0.1:18091
metrics() {
	case "$t" in sockrelay-*) ;; *) return 0 ;; esac
	exec 3<>"/dev/tcp/${admin%:*}/${admin##*:}"
	printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$admin" >&3
	cat <&3
	exec 3<&-
}

# relay_counts BEFORE AFTER prints, as JSON, how much the relay's datapath counters grew between two
# /metrics snapshots, summed over their labels.
relay_counts() {
	awk -v after="$2" '
		/^sockrelay_(kernel_demotions|kernel_resumes|kernel_repeats_cut|datapath_fallbacks)_total[{ ]/ {
			split($1, k, "{")
			if (FILENAME == after) a[k[1]] += $NF; else b[k[1]] += $NF
			seen[k[1]] = 1
		}
		END {
			printf "{"; sep = ""
			for (n in seen) { printf "%s\"%s\": %d", sep, n, a[n] - b[n]; sep = ", " }
			print "}"
		}' "$1" "$2"
}

# may_fail NAME WORKLOAD FLAGS... runs bin/wsbench WORKLOAD FLAGS... -json into NAME's file. A stream the
# target cuts (a reset) is a result, not the end of the run: the JSON then says {"failed": the error}, and
# the report shows the row as failed.
may_fail() {
	local name=$1 workload=$2
	shift 2
	if ! bin/wsbench "$workload" "$@" -json "$out/json/$t-$name.json" 2>"$work/wsbench.err" >&2; then
		cat "$work/wsbench.err" >&2
		/usr/bin/python3 -c 'import json, sys; print(json.dumps({"workload": sys.argv[1], "result": {"failed": sys.argv[2]}}))' \
			"$workload" "$(grep -m1 "wsbench $workload" "$work/wsbench.err" || tail -n1 "$work/wsbench.err")" \
			>"$out/json/$t-$name.json"
	fi
}

# bulk NAME SIZE MODE PATH streams one tunnel of SIZE-byte frames for bulk_warmup, unmeasured, then
# bulk_duration, and keeps how the relay's datapath counters grew over both.
bulk() {
	metrics >"$work/before.txt"
	may_fail "$1" throughput -url "${target_url}$4" -size "$2" -mode "$3" -warmup "$bulk_warmup" -duration "$bulk_duration"
	if [ -s "$work/before.txt" ]; then
		metrics >"$work/after.txt"
		relay_counts "$work/before.txt" "$work/after.txt" >"$out/json/$t-$1-relay.json"
	fi
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
targets+=(sockrelay-auto nginx haproxy)
if [ -n "${BENCH_TARGETS:-}" ]; then
	read -ra targets <<<"$BENCH_TARGETS"
fi

for t in "${targets[@]}"; do
	echo "== $t" >&2
	start_target "$t"
	# idle first, on a fresh process, so its RSS grows from the start-up baseline.
	idle_pid_flag=()
	[ -n "$target_pids" ] && idle_pid_flag=(-pid "$target_pids")
	n=$idle_tunnels
	# splice holds two pipes per tunnel: 6 descriptors, so at most 3000 tunnels fit a 20 000 limit; auto
	# too where it cannot take sockmap.
	if [ "$t" = sockrelay-splice ] || { [ "$t" = sockrelay-auto ] && ! grep -q "^  sockmap *available" "$work/doctor.txt"; }; then
		n=$((n < 3000 ? n : 3000))
	fi
	bin/wsbench idle -url "$target_url" -tunnels "$n" "${idle_pid_flag[@]}" -settle 2s \
		-json "$out/json/$t-idle.json" >&2
	# Round trips alternate with the same load sent directly, on tunnels each side keeps open, D,T,T,D,...:
	# measured target by target, a slow minute of the shared machine landed on one target, and its ratio
	# to the best peer swung from 0.76× to 1.46× between runs. Direct's figures come from these rounds.
	if [ "$t" != direct ]; then
		bin/wsbench rtt "${awake[@]}" -url "$target_url" -direct "ws://$upstream/" -rounds "$rtt_rounds" -tunnels 1 \
			-warmup "$rtt1_warmup" -duration "$rtt1_round" -json "$out/json/$t-rtt1.json" >&2
		# 1000 busy tunnels at a fixed rate, 10 messages/s each: below every target's capacity, so p99 is
		# latency, not queueing behind a closed loop's backlog (where a slower target sends fewer messages).
		bin/wsbench rtt "${awake[@]}" -url "$target_url" -direct "ws://$upstream/" -rounds "$rtt_rounds" -tunnels 1000 \
			-rate 10 -warmup "$rtt1000_warmup" -duration "$rtt1000_round" -json "$out/json/$t-rtt1000.json" >&2
	fi
	bulk bulk64k-sink 65536 sink sink
	bulk bulk64k-echo 65536 echo bulk
	bulk bulk1k-sink 1024 sink sink
	bulk bulk1k-echo 1024 echo bulk
	bin/wsbench handshakes -url "$target_url" -duration "$duration" -json "$out/json/$t-handshakes.json" >&2
	# The direct baseline alternates with the target, D,T,D,T,D,T, so both see the same machine state;
	# the target's load runs cpu_warmup first, unmeasured.
	if [ "$t" != direct ]; then
		cpu_pid_flag=()
		[ -n "$target_pids" ] && cpu_pid_flag=(-pid "$target_pids")
		bin/wsbench cpu -url "$target_url" -direct "ws://$upstream/" "${cpu_pid_flag[@]}" -rounds "$cpu_rounds" \
			-tunnels 100 -rate 10000 -warmup "$cpu_warmup" -duration "$cpu_duration" -json "$out/json/$t-cpu.json" >&2
	fi
	# An edge node's mix at once: the idle tunnels again, 100 chatty ones at 10 messages/s each and two bulk
	# streams of whole 64 KiB frames.
	mixed_pid_flag=()
	[ -n "$target_pids" ] && mixed_pid_flag=(-pid "$target_pids")
	may_fail mixed mixed -url "$target_url" -tunnels "$n" -chatty 100 -rate 10 -bulk 2 "${mixed_pid_flag[@]}" \
		-warmup 1s -duration "$duration"
	stop_target "$t"
	# Keep what a relay logged (at warn level: nothing when all went well), e.g. why it cut a stream.
	if [ -s "$work/$t.log" ]; then
		mkdir -p "$out/logs"
		cp "$work/$t.log" "$out/logs/"
	fi
done

/usr/bin/python3 scripts/bench_report.py "$out" "$mode" "${targets[@]}"
echo "wrote $out/RESULTS.md; its first lines say whether the run is valid:" >&2
sed -n '3,4p' "$out/RESULTS.md" >&2
