#!/usr/bin/env bash
# The fleet test, as root (CI runs it after pkgtest.sh): three sockrelay nodes behind a Linux L4
# balancer, in network namespaces, as docs/deploy.md describes a fleet.
#
#   client ns (6 source addresses) --> balancer ns --> relay ns 1..3 --> upstream ns (up1, up2, up3)
#
# The balancer namespace routes between the others and offers one virtual address, 10.77.0.100, two ways:
#   :80  nftables DNAT, one relay per new connection in turn (numgen). DNAT keeps the client's source
#        address, so the relays see the client itself and need no PROXY protocol (listener "direct").
#   :81  HAProxy in mode tcp, roundrobin, with send-proxy-v2: the relays see HAProxy's address and learn
#        the client's from the PROXY protocol v2 header (listener "proxied", proxy_protocol: true).
# This kernel may have no IPVS; nftables is the L4 balancer available everywhere. Every relay has the same
# pool of the three upstreams with balance: hash by client_ip, so the upstream a client gets depends on
# its address only. scripts/fleet_client.py (in the client namespace) asserts that each client's
# connections land on several relays but always on one upstream, that the upstream sees the client's
# address in X-Forwarded-For through both balancers, and, after relay 2 is killed (SIGKILL) and
# removed from the nftables map (this script does it: nftables has no health checks; HAProxy finds the
# dead node itself), that only relay 2's tunnels end, new clients are served, and clients that
# reconnect get the upstream they had. Every step that cannot be done is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "scripts/fleettest.sh: FAIL: $*" >&2; exit 1; }
step() { echo "fleettest: $*"; }
[ "$(id -u)" -eq 0 ] || fail "must run as root (it creates network namespaces)"

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v curl >/dev/null 2>&1 || need+=(curl)
/usr/bin/python3 -c 'import websockets' 2>/dev/null || need+=(python3-websockets)
. scripts/lib/packages.sh
install_packages scripts/fleettest.sh ${need[@]+"${need[@]}"}
start=$(date +%s)

tmp=$(mktemp -d)
ns_prefix=srfleet$$
lb=${ns_prefix}-lb client=${ns_prefix}-c ups=${ns_prefix}-up
relays=(1 2 3)
namespaces=("$lb" "$client" "$ups")
for i in "${relays[@]}"; do namespaces+=("${ns_prefix}-r$i"); done
pids=()
cleanup() {
	local code=$?
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ "$code" -ne 0 ]; then
		for log in "$tmp"/*.log; do [ -s "$log" ] && { echo "--- ${log##*/}"; tail -n 20 "$log"; }; done
	fi
	# Deleting a namespace deletes its veth ends, its nftables table and its routes.
	for ns in "${namespaces[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# Started in the background as a simple command, not through in_ns, so that $! is the program itself (ip
# netns exec execs it), which the kill of a relay must reach.

step "building sockrelay and wsecho"
go build -o "$tmp/sockrelay" ./cmd/sockrelay
go build -o "$tmp/wsecho" ./cmd/wsecho

step "namespaces ${namespaces[*]}"
for ns in "${namespaces[@]}"; do
	ip netns add "$ns"
	in_ns "$ns" ip link set lo up
done
in_ns "$lb" sysctl -qw net.ipv4.ip_forward=1
# link NS ADDR LB_ADDR: a veth from the balancer to NS, NS's default route through the balancer.
link() {
	local ns=$1 addr=$2 lb_addr=$3
	ip link add eth0 netns "$ns" type veth peer name "to-${ns##*-}" netns "$lb"
	in_ns "$ns" ip addr add "$addr" dev eth0
	in_ns "$ns" ip link set eth0 up
	in_ns "$lb" ip addr add "$lb_addr" dev "to-${ns##*-}"
	in_ns "$lb" ip link set "to-${ns##*-}" up
	in_ns "$ns" ip route add default via "${lb_addr%/*}"
}
link "$client" 10.77.1.11/24 10.77.1.1/24
clients=(10.77.1.11 10.77.1.12 10.77.1.13 10.77.1.14 10.77.1.15 10.77.1.16)
for a in "${clients[@]:1}"; do in_ns "$client" ip addr add "$a/24" dev eth0; done
link "$ups" 10.77.3.11/24 10.77.3.1/24
in_ns "$ups" ip addr add 10.77.3.12/24 dev eth0
in_ns "$ups" ip addr add 10.77.3.13/24 dev eth0
for i in "${relays[@]}"; do link "${ns_prefix}-r$i" "10.78.$i.2/24" "10.78.$i.1/24"; done
# The virtual address: HAProxy binds it; nftables rewrites it before routing, so it need not be local.
in_ns "$lb" ip addr add 10.77.0.100/32 dev lo

step "upstreams up1 up2 up3 on 10.77.3.11-13:9000"
for u in 1 2 3; do
	ip netns exec "$ups" "$tmp/wsecho" -listen "10.77.3.1$u:9000" -name "up$u" >"$tmp/up$u.log" 2>&1 &
	pids+=($!)
done

# The fleet's configuration: every node the same but for its addresses. The pool lists the servers by
# the same addresses on every node, since the hash of a server's address places it; load_factor 10
# (at least the number of servers) never moves a key off its first choice for load, which each node
# would judge by its own tunnels only.
relay_config() {
	local i=$1
	cat <<EOF
admin: 127.0.0.1:9180
listeners:
  - name: direct              # behind nftables DNAT: the peer is the client
    address: 10.78.$i.2:8080
    routes: [{pool: app}]
  - name: proxied             # behind HAProxy: the client is in the PROXY protocol header
    address: 10.78.$i.2:8081
    proxy_protocol: true
    routes: [{pool: app}]
pools:
  app:
    balance: hash
    hash: {by: client_ip, load_factor: 10}
    servers: [10.77.3.11:9000, 10.77.3.12:9000, 10.77.3.13:9000]
EOF
}
step "relays r1 r2 r3 on 10.78.{1,2,3}.2:8080 (direct) and :8081 (proxied)"
for i in "${relays[@]}"; do
	relay_config "$i" >"$tmp/r$i.yaml"
	ip netns exec "${ns_prefix}-r$i" "$tmp/sockrelay" run --config "$tmp/r$i.yaml" >"$tmp/r$i.log" 2>&1 &
	pids+=($!)
	echo $! >"$tmp/r$i.pid"
done
for i in "${relays[@]}"; do
	for _ in $(seq 100); do
		in_ns "${ns_prefix}-r$i" curl -sf -o /dev/null http://127.0.0.1:9180/healthz && break
		kill -0 "$(cat "$tmp/r$i.pid")" 2>/dev/null || fail "relay r$i exited at start"
		sleep 0.1
	done
	in_ns "${ns_prefix}-r$i" curl -sf -o /dev/null http://127.0.0.1:9180/healthz || fail "relay r$i not healthy 10s after its start"
done

# nftables: the ruleset for the live relays, replaced as a whole (one transaction) when one dies. New
# connections go to the relays in turn; established ones keep their conntrack entry, so replacing the
# ruleset moves no live tunnel.
nft_ruleset() {
	local n=0 elements=()
	for addr in "$@"; do elements+=("$n : $addr"); n=$((n + 1)); done
	local IFS=,
	cat <<EOF
table ip fleet
delete table ip fleet
table ip fleet {
	map relays {
		typeof numgen inc mod 1 : ip daddr
		elements = { ${elements[*]} }
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.77.0.100 tcp dport 80 dnat to numgen inc mod $n map @relays : 8080
	}
}
EOF
}
nft_ruleset 10.78.1.2 10.78.2.2 10.78.3.2 >"$tmp/fleet.nft"
nft_ruleset 10.78.1.2 10.78.3.2 >"$tmp/fleet-without-r2.nft"
step "nftables: 10.77.0.100:80 -> relays' :8080 (numgen inc mod 3)"
in_ns "$lb" nft -f "$tmp/fleet.nft" || fail "nft -f: the balancer's ruleset"

cat >"$tmp/haproxy.cfg" <<EOF
global
	maxconn 1000
defaults
	mode tcp
	timeout connect 2s
	timeout client 60s
	timeout server 60s
	# A connection refused by a dead relay is tried again on another one.
	retries 3
	option redispatch 1
frontend vip
	bind 10.77.0.100:81
	default_backend relays
backend relays
	balance roundrobin
	default-server send-proxy-v2 check check-send-proxy inter 500ms fall 1 rise 2
	server r1 10.78.1.2:8081
	server r2 10.78.2.2:8081
	server r3 10.78.3.2:8081
EOF
step "HAProxy: 10.77.0.100:81 -> relays' :8081 (roundrobin, send-proxy-v2)"
in_ns "$lb" haproxy -c -q -f "$tmp/haproxy.cfg" || fail "haproxy -c: the balancer's configuration"
ip netns exec "$lb" haproxy -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
pids+=($!)
haproxy_up=
for _ in $(seq 50); do in_ns "$client" bash -c 'exec 3<>/dev/tcp/10.77.0.100/81' 2>/dev/null && haproxy_up=1 && break; sleep 0.1; done
[ -n "$haproxy_up" ] || fail "HAProxy accepted no connection on 10.77.0.100:81 within 5s (haproxy.log follows)"

step "clients through 10.77.0.100"
kill_r2="kill -KILL $(cat "$tmp/r2.pid") && ip netns exec $lb nft -f $tmp/fleet-without-r2.nft"
in_ns "$client" /usr/bin/python3 scripts/fleet_client.py --vip 10.77.0.100 \
	--clients "${clients[*]}" --relays 10.78.1.2,10.78.2.2,10.78.3.2 --kill 10.78.2.2 --kill-command "$kill_r2" ||
	fail "the fleet's clients (scripts/fleet_client.py)"
grep -q 'msg="datapath chosen"' "$tmp/r1.log" || fail "relay r1 logged no datapath"
echo "scripts/fleettest.sh: passed in $(($(date +%s) - start))s"
