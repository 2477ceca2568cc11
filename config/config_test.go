package config

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// minimal is the least valid file: one listener, one route, one pool of one server. Cases below append
// to it, so that their lines start at 8.
const minimal = `listeners:
  - address: 127.0.0.1:8080
    routes:
      - pool: echo
pools:
  echo:
    servers: [127.0.0.1:9000]
`

// Starts of files for the cases of listeners: an http listener and a tcp listener, whose keys follow
// from line 3 and 4, before their routes; then the pool their routes lead to.
const (
	listener8080 = "listeners:\n  - address: 127.0.0.1:8080\n"
	tcpListener  = "listeners:\n  - address: 127.0.0.1:8443\n    type: tcp\n"
	onePool      = "pools: {echo: {servers: [127.0.0.1:9000]}}\n"
)

func TestBrokenFiles(t *testing.T) {
	for _, tc := range []struct {
		name, file, want string
	}{
		{"empty file", ``,
			`sockrelay.yaml: empty file; accepted: a mapping with at least listeners and pools`},
		{"only comments", "# nothing yet\n",
			`sockrelay.yaml: empty file; accepted: a mapping with at least listeners and pools`},
		{"not a mapping", "- listeners\n",
			`sockrelay.yaml:1: got a list; accepted: a configuration, a mapping with keys admin, auto, datapath, event_loops, kernel_held_limit, limits, listeners, log_format, log_level, max_header_bytes, pools, timeouts, tunnel_log_interval`},
		{"invalid YAML", "listeners:\n  - address: 127.0.0.1:8080\n  routes\n",
			`sockrelay.yaml:3: invalid YAML: could not find expected ':'`},
		{"unclosed flow list", "pools: {echo: [\n",
			`sockrelay.yaml:1: invalid YAML: did not find expected node content`},
		{"list item indented less than its siblings", "pools:\n  echo:\n    servers:\n      - 127.0.0.1:9000\n     - 127.0.0.1:9001\n",
			`sockrelay.yaml:5: invalid YAML: did not find expected key (in the block that starts at line 2)`},
		{"key indented less than its siblings", "listeners:\n  - address: 127.0.0.1:8080\n    routes: [{pool: echo}]\n   name: x\n" + onePool,
			`sockrelay.yaml:4: invalid YAML: did not find expected '-' indicator (in the block that starts at line 1)`},
		{"a bracket too many", "pools:\n  echo:\n    servers: [127.0.0.1:9000]]\n",
			`sockrelay.yaml:3: invalid YAML: did not find expected key (in the block that starts at line 2)`},
		{"tab indentation", "listeners:\n\t- address: 127.0.0.1:8080\n",
			`sockrelay.yaml:2: invalid YAML: found character that cannot start any token; indent with spaces, not tabs`},
		{"two documents", minimal + "---\nadmin: \"\"\n",
			`sockrelay.yaml:8: a second YAML document; accepted: one document per file`},
		{"unknown top-level key", minimal + "datapth: copy\n",
			`sockrelay.yaml:8: datapth: unknown key; accepted: admin, auto, datapath, event_loops, kernel_held_limit, limits, listeners, log_format, log_level, max_header_bytes, pools, timeouts, tunnel_log_interval`},
		{"unknown nested key", "listeners:\n  - address: 127.0.0.1:8080\n    datapth: copy\n    routes: [{pool: echo}]\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[0].datapth: unknown key; accepted: address, datapath, limits, name, proxy_protocol, routes, tls, tls_passthrough, trusted_proxies, type`},
		{"unknown key in a server", minimal + "  chat:\n    servers:\n      - {address: 127.0.0.1:9001, weigth: 2}\n",
			`sockrelay.yaml:10: pools.chat.servers[0].weigth: unknown key; accepted: address, backup, drain, max_tunnels, weight`},
		{"duplicate key", minimal + "log_level: info\nlog_level: debug\n",
			`sockrelay.yaml:9: log_level: duplicate key; first given at line 8`},
		{"duplicate pool", minimal + "  echo:\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:8: pools.echo: duplicate key; first given at line 6`},
		{"mapping where a scalar goes", minimal + "timeouts: 5s\n",
			`sockrelay.yaml:8: timeouts: got "5s"; accepted: the timeouts, a mapping with keys client_header, connect, half_closed, http_idle, shutdown, tcp_half_closed, tunnel_idle, tunnel_lifetime, upstream_response`},
		{"list where a mapping goes", "listeners:\n  address: 127.0.0.1:8080\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:2: listeners: got a mapping; accepted: a list of listeners, at least one`},
		{"no value", minimal + "admin:\n",
			`sockrelay.yaml:8: admin: got no value; accepted: HOST:PORT such as 127.0.0.1:9180 (loopback; others need allow_remote), unix:/PATH for a Unix socket, or "" to disable; or the admin listener, a mapping with keys address, allow_remote, hosts, token_file, upgrade_binary`},
		{"admin on every address", minimal + "admin: :9180\n",
			`sockrelay.yaml:8: admin: ":9180" can be reached from other hosts, and the admin API can force servers down and reload the configuration; accepted: a loopback address such as 127.0.0.1:9180, unix:/PATH, or allow_remote: true (flag --admin-allow-remote) to serve it on a network, where changes need the token of token_file (--admin-token-file)`},
		{"admin on a host name", minimal + "admin:\n  address: relay.example.com:9180\n  allow_remote: false\n",
			`sockrelay.yaml:9: admin.address: "relay.example.com:9180" can be reached from other hosts, and the admin API can force servers down and reload the configuration; accepted: a loopback address such as 127.0.0.1:9180, unix:/PATH, or allow_remote: true (flag --admin-allow-remote) to serve it on a network, where changes need the token of token_file (--admin-token-file)`},
		{"admin socket path relative", minimal + "admin: unix:admin.sock\n",
			`sockrelay.yaml:8: admin: "unix:admin.sock": a Unix socket's path must be absolute, e.g. unix:/run/sockrelay/admin.sock`},
		{"admin host an IP address", minimal + "admin:\n  hosts: [10.0.0.1]\n",
			`sockrelay.yaml:9: admin.hosts[0]: "10.0.0.1" is not a host name; accepted: a DNS name such as relay-admin.example.com (IP addresses and localhost are always accepted)`},
		{"bad duration", minimal + "timeouts:\n  connect: 5\n",
			`sockrelay.yaml:9: timeouts.connect: "5" is not a duration; accepted: a number with a unit (ms, s, m, h) such as 500ms, 10s or 1h30m`},
		{"zero timeout", minimal + "timeouts:\n  shutdown: 0s\n",
			`sockrelay.yaml:9: timeouts.shutdown: 0s is out of range; accepted more than 0s`},
		{"tunnel log interval under 1s", minimal + "tunnel_log_interval: 500ms\n",
			`sockrelay.yaml:8: tunnel_log_interval: 500ms is out of range; accepted 0s (off) or 1s or more`},
		{"bad size", minimal + "kernel_held_limit: 4 MB\n",
			`sockrelay.yaml:8: kernel_held_limit: "4 MB" is not a size; accepted: a number of bytes or a number with KiB, MiB or GiB`},
		{"negative size", minimal + "max_header_bytes: -1\n",
			`sockrelay.yaml:8: max_header_bytes: "-1" is not a size; accepted: a number of bytes or a number with KiB, MiB or GiB`},
		{"size out of range", minimal + "kernel_held_limit: 32KiB\n",
			`sockrelay.yaml:8: kernel_held_limit: 32KiB is out of range; accepted 64KiB to 1GiB`},
		{"size past int64", minimal + "kernel_held_limit: 99999999999999999999GiB\n",
			`sockrelay.yaml:8: kernel_held_limit: 99999999999999999999GiB is out of range; accepted 64KiB to 1GiB`},
		{"event loops negative", minimal + "event_loops: -1\n",
			`sockrelay.yaml:8: event_loops: -1 is out of range; accepted 0 (the default, one per two CPUs) or 1 to 1024`},
		{"event loops too many", minimal + "event_loops: 5000\n",
			`sockrelay.yaml:8: event_loops: 5000 is out of range; accepted 0 (the default, one per two CPUs) or 1 to 1024`},
		{"event loops not a number", minimal + "event_loops: two\n",
			`sockrelay.yaml:8: event_loops: "two" is not a whole number; accepted 0 (the default, one per two CPUs) or 1 to 1024`},
		{"event loops quoted", minimal + "event_loops: \"2\"\n",
			`sockrelay.yaml:8: event_loops: "2" is not a whole number; accepted 0 (the default, one per two CPUs) or 1 to 1024`},
		{"bad auto start", minimal + "auto: {start: kernel}\n",
			`sockrelay.yaml:8: auto.start: "kernel" is not a start policy; accepted: measured, copy, sockmap`},
		{"auto chatty out of range", minimal + "auto: {chatty_segments: 0}\n",
			`sockrelay.yaml:8: auto.chatty_segments: 0 is out of range; accepted 1 to 1000000`},
		{"auto quiet out of range", minimal + "auto: {quiet: 100ms}\n",
			`sockrelay.yaml:8: auto.quiet: 100ms is out of range; accepted 1s to 1h`},
		{"auto max dwell below min dwell", minimal + "auto: {min_dwell: 10s, max_dwell: 5s}\n",
			`sockrelay.yaml:8: auto.max_dwell: 5s is below auto.min_dwell, 10s; accepted 10s to 1h`},
		// Each against the defaults of the policies the start may put in force (datapath/auto): accepted
		// alone, they failed the start only where the kernel engine loads.
		{"auto min dwell above the policy's max dwell", minimal + "auto: {min_dwell: 10m}\n",
			`sockrelay.yaml:8: auto.min_dwell: 10m is above the LoopFirst policy's max dwell, 5m; accepted 100ms to 5m, or set auto.max_dwell too`},
		{"auto max dwell below the policy's min dwell", minimal + "auto: {max_dwell: 1s}\n",
			`sockrelay.yaml:8: auto.max_dwell: 1s is below the LoopFirst policy's min dwell, 5s; accepted 5s to 1h`},
		{"auto chatty at the calm threshold under sockmap", minimal + "auto: {start: sockmap, chatty_segments: 200}\n",
			`sockrelay.yaml:8: auto.chatty_segments: 200 is at or below the KernelFirst policy's calm threshold, 200 segments a second, so tunnels between them would move back and forth; accepted above 200 to 1000000`},
		{"auto unknown key", minimal + "auto: {dwell: 5s}\n",
			`sockrelay.yaml:8: auto.dwell: unknown key; accepted: busy_segments, chatty_segments, max_dwell, min_dwell, quiet, start`},
		{"bad log format", minimal + "log_format: logfmt\n",
			`sockrelay.yaml:8: log_format: "logfmt" is not a log format; accepted: text, json`},
		{"bad enum", minimal + "log_level: verbose\n",
			`sockrelay.yaml:8: log_level: "verbose" is not a log level; accepted: debug, info, warn, error`},
		{"weight out of range", minimal + "  chat:\n    servers:\n      - 127.0.0.1:9001\n      - address: 127.0.0.1:9002\n        weight: 0\n",
			`sockrelay.yaml:12: pools.chat.servers[1].weight: 0 is out of range; accepted 1 to 1000`},
		{"integer of the wrong type", minimal + "  chat:\n    retry: {tries: \"3\"}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.retry.tries: "3" is not an integer; accepted 1 to 10`},
		{"not a boolean", minimal + "  chat:\n    servers: [{address: 127.0.0.1:9001, backup: yes}]\n",
			`sockrelay.yaml:9: pools.chat.servers[0].backup: "yes" is not a boolean; accepted: true or false`},
		{"load factor out of range", minimal + "  chat:\n    balance: hash\n    hash: {load_factor: .nan}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:10: pools.chat.hash.load_factor: .nan is out of range; accepted 1 to 10`},
		{"missing listeners", "pools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:1: listeners: required; accepted: a list of listeners, at least one`},
		{"missing address", "listeners:\n  - routes: [{pool: echo}]\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:2: listeners[0].address: required; accepted: HOST:PORT such as 127.0.0.1:8080, or :8080 for every address`},
		{"missing route pool", "listeners:\n  - address: 127.0.0.1:8080\n    routes:\n      - path_prefix: /ws\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:4: listeners[0].routes[0].pool: required; accepted: the name of a pool under pools`},
		{"no servers", minimal + "  chat:\n    balance: least_tunnels\n",
			`sockrelay.yaml:9: pools.chat.servers: required; accepted: a list of servers, at least one, or dns`},
		{"empty lists", "listeners:\n  - address: 127.0.0.1:8080\n    routes: []\npools: {}\n",
			"sockrelay.yaml:3: listeners[0].routes: empty list; accepted: a list of routes, at least one, each with a pool\n" +
				"sockrelay.yaml:4: pools: empty mapping; accepted: a mapping of pool names to pools, at least one"},
		{"route to an unknown pool", "listeners:\n  - address: 127.0.0.1:8080\n    routes:\n      - pool: echo\n      - {path_prefix: /chat, pool: chta}\npools:\n  echo:\n    servers: [127.0.0.1:9000]\n  chat:\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:5: listeners[0].routes[1].pool: "chta" is not a pool; accepted: echo, chat`},
		{"bad route host", "listeners:\n  - address: 127.0.0.1:8080\n    routes: [{host: \"chat.example.com:8080\", pool: echo}]\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[0].routes[0].host: "chat.example.com:8080" is not a host; accepted: a host name without port such as chat.example.com, *.example.com for every name under it, or no host for any`},
		{"bad path prefix", "listeners:\n  - address: 127.0.0.1:8080\n    routes: [{path_prefix: ws, pool: echo}]\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[0].routes[0].path_prefix: "ws" is not a path prefix; accepted: a path starting with / such as /ws, without query or spaces`},
		{"bad listener address", "listeners:\n  - address: localhost\n    routes: [{pool: echo}]\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:2: listeners[0].address: "localhost" is not HOST:PORT; accepted: HOST:PORT such as 127.0.0.1:8080, or :8080 for every address`},
		{"server without host", minimal + "  chat:\n    servers: [\":9001\"]\n",
			`sockrelay.yaml:9: pools.chat.servers[0]: ":9001" has no host; accepted: HOST:PORT such as 127.0.0.1:9001 or [::1]:9001`},
		{"server port out of range", minimal + "  chat:\n    servers: [127.0.0.1:65536]\n",
			`sockrelay.yaml:9: pools.chat.servers[0]: "127.0.0.1:65536" has no port from 1 to 65535; accepted: HOST:PORT such as 127.0.0.1:9001 or [::1]:9001`},
		{"duplicate listener address", "listeners:\n  - {name: a, address: 127.0.0.1:8080, routes: [{pool: echo}]}\n  - {name: b, address: 127.0.0.1:8080, routes: [{pool: echo}]}\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[1].address: 127.0.0.1:8080 is already the address of listeners[0] ("a", line 2); accepted: an address no other listener has`},
		{"listener overlapping a wildcard", "listeners:\n  - {address: \":8080\", routes: [{pool: echo}]}\n  - {address: \"[::1]:8080\", routes: [{pool: echo}]}\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[1].address: [::1]:8080 overlaps the address of listeners[0] ("listener0", line 2), as one of them listens on every address of port 8080; accepted: another port, or a specific address for both`},
		{"admin on a listener's address", minimal + "admin: 127.0.0.1:8080\n",
			`sockrelay.yaml:8: admin: 127.0.0.1:8080 is already the address of listeners[0] ("listener0", line 2); accepted: an address no other listener has`},
		{"duplicate listener name", "listeners:\n  - {name: listener1, address: 127.0.0.1:8080, routes: [{pool: echo}]}\n  - {address: 127.0.0.1:8081, routes: [{pool: echo}]}\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[1].name: "listener1" is already the name of listeners[0] (line 2); accepted: a name no other listener has`},
		{"bad pool name", "listeners: [{address: 127.0.0.1:8080, routes: [{pool: chat.v2}]}]\npools:\n  chat.v2:\n    servers: [127.0.0.1:9000]\n",
			`sockrelay.yaml:3: pools.chat.v2: "chat.v2" is not a name; accepted: a name of letters, digits, _ and -, starting with a letter or digit, at most 64 characters`},
		{"duplicate server", minimal + "  chat:\n    servers:\n      - 127.0.0.1:9001\n      - address: 127.0.0.1:9002\n      - address: 127.0.0.1:09001\n",
			`sockrelay.yaml:12: pools.chat.servers[2].address: 127.0.0.1:09001 is already servers[0] (line 10); accepted: each address once per pool`},
		{"hash by header without name", minimal + "  chat:\n    balance: hash\n    hash: {by: header}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:10: pools.chat.hash.name: required with by: header; accepted: a header name such as X-User-Id`},
		{"hash name with by client_ip", minimal + "  chat:\n    balance: hash\n    hash: {name: X-User}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:10: pools.chat.hash.name: given with by: client_ip; accepted only with by: header or cookie`},
		{"hash without balance hash", minimal + "  chat:\n    hash: {by: client_ip}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.hash: given with balance: round_robin; accepted only with balance: hash`},
		{"bad balance does not also blame hash", minimal + "  chat:\n    balance: consistent\n    hash: {by: client_ip}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.balance: "consistent" is not a balance method; accepted: round_robin, least_tunnels, hash, random_two`},
		{"servers and dns", minimal + "  chat:\n    servers: [127.0.0.1:9001]\n    dns: {name: chat.service.consul, port: 9001}\n",
			`sockrelay.yaml:10: pools.chat.dns: given with servers; accepted: servers or dns, not both`},
		{"dns A without port", minimal + "  chat:\n    dns: {name: chat.service.consul}\n",
			`sockrelay.yaml:9: pools.chat.dns.port: required with type: A; accepted: a port from 1 to 65535`},
		{"dns SRV with port", minimal + "  chat:\n    dns: {name: _chat._tcp.service.consul, type: SRV, port: 9001}\n",
			`sockrelay.yaml:9: pools.chat.dns.port: given with type: SRV, whose records carry the ports; accepted only with type: A or AAAA`},
		{"dns name is an IP", minimal + "  chat:\n    dns: {name: 10.0.0.1, port: 9001}\n",
			`sockrelay.yaml:9: pools.chat.dns.name: "10.0.0.1" is an IP address; accepted: a DNS name such as chat.service.consul (list IP addresses under servers)`},
		{"tcp check with a path", minimal + "  chat:\n    health_check: {path: /healthz}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.health_check.path: given with type: tcp; accepted only with type: http or websocket`},
		{"check timeout past interval", minimal + "  chat:\n    health_check:\n      interval: 1s\n      timeout: 1500ms\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:11: pools.chat.health_check.timeout: 1500ms is longer than interval 1s; accepted: at most the interval, so that checks of one server do not overlap`},
		{"check interval out of range", minimal + "  chat:\n    health_check: {interval: 2h}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.health_check.interval: 2h is out of range; accepted 100ms to 1h`},
		{"passive window out of range", minimal + "  chat:\n    passive_health: {window: 0s}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.passive_health.window: 0s is out of range; accepted 1s to 1h`},
		{"max tunnels out of range", minimal + "  chat:\n    servers: [{address: 127.0.0.1:9001, max_tunnels: -1}]\n",
			`sockrelay.yaml:9: pools.chat.servers[0].max_tunnels: -1 is out of range; accepted 0 to 10000000`},
		{"only backups", minimal + "  chat:\n    servers: [{address: 127.0.0.1:9001, backup: true}]\n",
			`sockrelay.yaml:9: pools.chat.servers: every server is a backup; accepted: at least one server with backup: false (backups take tunnels only while none of those is up)`},
		{"status out of range", minimal + "  chat:\n    health_check: {type: http, expect_status: 600}\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.health_check.expect_status: 600 is out of range; accepted 100 to 599`},
		{"merge of a scalar", minimal + "  chat:\n    <<: 3\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:9: pools.chat.<<: got "3"; accepted: a mapping, or a list of mappings, to merge`},
		{"alias inside itself", "listeners: &l [*l]\n",
			`sockrelay.yaml:1: alias *l is used inside the value it names; accepted: an alias to a value defined before it`},
		// The edge settings of listeners, routes, limits and pools.
		{"bad listener type", listener8080 + "    type: udp\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].type: "udp" is not a listener type; accepted: http, tcp`},
		{"bad listener type checks no more", listener8080 + "    type: udp\n    tls_passthrough: true\n    trusted_proxies: [10.0.0.1]\n    routes: [{host: 10.0.0.1, pool: echo}, {pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].type: "udp" is not a listener type; accepted: http, tcp`},
		{"path prefix on a tcp listener", tcpListener + "    routes: [{path_prefix: /ws, pool: echo}]\n" + onePool,
			`sockrelay.yaml:4: listeners[0].routes[0].path_prefix: given on a tcp listener; accepted only with type: http (tcp listeners route by SNI host only)`},
		{"origins on a tcp listener", tcpListener + "    tls_passthrough: true\n    routes:\n      - {host: a.example.com, origins: [\"https://a.example.com\"], pool: echo}\n" + onePool,
			`sockrelay.yaml:6: listeners[0].routes[0].origins: given on a tcp listener; accepted only with type: http (tcp listeners route by SNI host only)`},
		{"host on a tcp listener without passthrough", tcpListener + "    routes: [{host: a.example.com, pool: echo}]\n" + onePool,
			`sockrelay.yaml:4: listeners[0].routes[0].host: given on a tcp listener without tls_passthrough; accepted only with tls_passthrough: true, which matches it against the TLS SNI`},
		{"two routes on a tcp listener without passthrough", tcpListener + "    routes: [{pool: echo}, {pool: echo}]\n" + onePool,
			`sockrelay.yaml:4: listeners[0].routes: 2 routes on a tcp listener without tls_passthrough; accepted: exactly one route, with a pool and no host (a plain TCP stream has nothing to route by)`},
		{"IP address as an SNI host", tcpListener + "    tls_passthrough: true\n    routes: [{host: 10.0.0.1, pool: echo}]\n" + onePool,
			`sockrelay.yaml:5: listeners[0].routes[0].host: "10.0.0.1" is an IP address, which TLS SNI never is; accepted: a host name such as chat.example.com or *.example.com, or no host for any`},
		{"tls passthrough on an http listener", listener8080 + "    tls_passthrough: true\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].tls_passthrough: given with type: http; accepted only with type: tcp (an http listener terminates TLS with tls)`},
		{"trusted proxies on a tcp listener", tcpListener + "    trusted_proxies: [10.0.0.0/8]\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:4: listeners[0].trusted_proxies: given with type: tcp; accepted only with type: http (a tcp listener reads no X-Forwarded-For)`},
		{"tls on a tcp listener", tcpListener + "    tls: {certificates: [{cert: a.pem, key: a-key.pem}]}\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:4: listeners[0].tls: given with type: tcp; accepted only with type: http (a tcp listener relays TLS as it comes, routed by SNI with tls_passthrough)`},
		{"bad trusted proxies", listener8080 + "    trusted_proxies: [10.0.0.256, 10.0.0.1/8, \"fe80::1%eth0\", 10.0.0.0/33, [10.0.0.1]]\n    routes: [{pool: echo}]\n" + onePool,
			"sockrelay.yaml:3: listeners[0].trusted_proxies[0]: \"10.0.0.256\" is not an IP address or a CIDR; accepted: an IP address such as 192.0.2.1 or ::1, or a CIDR such as 10.0.0.0/8\n" +
				"sockrelay.yaml:3: listeners[0].trusted_proxies[1]: \"10.0.0.1/8\" has bits set past its prefix length; accepted: 10.0.0.0/8, or 10.0.0.1 alone\n" +
				"sockrelay.yaml:3: listeners[0].trusted_proxies[2]: \"fe80::1%eth0\" is not an IP address or a CIDR; accepted: an IP address such as 192.0.2.1 or ::1, or a CIDR such as 10.0.0.0/8\n" +
				"sockrelay.yaml:3: listeners[0].trusted_proxies[3]: \"10.0.0.0/33\" is not an IP address or a CIDR; accepted: an IP address such as 192.0.2.1 or ::1, or a CIDR such as 10.0.0.0/8\n" +
				"sockrelay.yaml:3: listeners[0].trusted_proxies[4]: got a list; accepted: an IP address such as 192.0.2.1 or ::1, or a CIDR such as 10.0.0.0/8"},
		{"trusted proxies not a list", listener8080 + "    trusted_proxies: 10.0.0.0/8\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].trusted_proxies: got "10.0.0.0/8"; accepted: a list of IP addresses and CIDRs such as 10.0.0.0/8`},
		{"tls without certificates", listener8080 + "    tls: {min_version: \"1.3\"}\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].tls.certificates: required; accepted: a list of certificates, at least one, each {cert: PATH, key: PATH}`},
		{"tls with no certificates", listener8080 + "    tls: {certificates: []}\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].tls.certificates: empty list; accepted: a list of certificates, at least one, each {cert: PATH, key: PATH}`},
		{"tls certificate without a path", listener8080 + "    tls:\n      certificates:\n        - {cert: \"\", key: a-key.pem}\n        - {cert: b.pem}\n    routes: [{pool: echo}]\n" + onePool,
			"sockrelay.yaml:5: listeners[0].tls.certificates[0].cert: empty path; accepted: the path of a PEM certificate chain, absolute or relative to the configuration file's directory\n" +
				"sockrelay.yaml:6: listeners[0].tls.certificates[1].key: required; accepted: the path of the PEM private key of cert, absolute or relative to the configuration file's directory"},
		{"tls version", listener8080 + "    tls: {certificates: [{cert: a.pem, key: a-key.pem}], min_version: 1.1}\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].tls.min_version: "1.1" is not a TLS version; accepted: 1.2, 1.3`},
		{"tls reload interval under 1s", listener8080 + "    tls: {certificates: [{cert: a.pem, key: a-key.pem}], reload_interval: 500ms}\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].tls.reload_interval: 500ms is out of range; accepted 0s (off) or 1s or more`},
		{"listener proxy protocol not a boolean", listener8080 + "    proxy_protocol: v2\n    routes: [{pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].proxy_protocol: "v2" is not a boolean; accepted: true or false`},
		{"origin *", listener8080 + "    routes: [{origins: [\"*\"], pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].routes[0].origins[0]: "*" is not an origin; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com (omit origins to allow any)`},
		{"bad origins", listener8080 + "    routes: [{origins: [\"https://app.example.com/\", \"ftp://a.com\", \"https://a.com:99999\", \"http://::1\", \"null\", [x]], pool: echo}]\n" + onePool,
			"sockrelay.yaml:3: listeners[0].routes[0].origins[0]: \"https://app.example.com/\" is not an origin; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com\n" +
				"sockrelay.yaml:3: listeners[0].routes[0].origins[1]: \"ftp://a.com\" is not an origin; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com\n" +
				"sockrelay.yaml:3: listeners[0].routes[0].origins[2]: \"https://a.com:99999\" is not an origin; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com\n" +
				"sockrelay.yaml:3: listeners[0].routes[0].origins[3]: \"http://::1\" is not an origin; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com\n" +
				"sockrelay.yaml:3: listeners[0].routes[0].origins[4]: \"null\" is not an origin; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com\n" +
				"sockrelay.yaml:3: listeners[0].routes[0].origins[5]: got a list; accepted: scheme://host[:port] with scheme http or https and no path, such as https://app.example.com"},
		{"origins not a list", listener8080 + "    routes: [{origins: \"https://a.com\", pool: echo}]\n" + onePool,
			`sockrelay.yaml:3: listeners[0].routes[0].origins: got "https://a.com"; accepted: a list of origins such as https://app.example.com; omit origins to allow any`},
		{"tunnel timeouts under 1s", minimal + "timeouts: {tunnel_idle: 500ms, tunnel_lifetime: -1s, half_closed: 100ms, tcp_half_closed: -5s}\n",
			"sockrelay.yaml:8: timeouts.tunnel_idle: 500ms is out of range; accepted 0s (off) or 1s or more\n" +
				"sockrelay.yaml:8: timeouts.tunnel_lifetime: -1s is out of range; accepted 0s (off) or 1s or more\n" +
				"sockrelay.yaml:8: timeouts.half_closed: 100ms is out of range; accepted 0s (off) or 1s or more\n" +
				"sockrelay.yaml:8: timeouts.tcp_half_closed: -5s is out of range; accepted 0s (off) or 1s or more"},
		{"limit out of range", minimal + "limits: {max_tunnels: 10000001}\n",
			`sockrelay.yaml:8: limits.max_tunnels: 10000001 is out of range; accepted 0 to 10000000`},
		{"unknown key in limits", minimal + "limits: {max_connections: 10}\n",
			`sockrelay.yaml:8: limits.max_connections: unknown key; accepted: handshakes_per_ip, max_concurrent_handshakes, max_tunnels, max_tunnels_per_ip`},
		{"listener limits out of range", listener8080 + "    limits: {max_concurrent_handshakes: -1, max_tunnels_per_ip: 1.5}\n    routes: [{pool: echo}]\n" + onePool,
			"sockrelay.yaml:3: listeners[0].limits.max_tunnels_per_ip: \"1.5\" is not an integer; accepted 0 to 10000000\n" +
				"sockrelay.yaml:3: listeners[0].limits.max_concurrent_handshakes: -1 is out of range; accepted 0 to 10000000"},
		{"rate out of range", minimal + "limits: {handshakes_per_ip: {rate: 2000000}}\n",
			`sockrelay.yaml:8: limits.handshakes_per_ip.rate: 2000000 is out of range; accepted 0 to 1000000`},
		{"rate not a number", minimal + "limits: {handshakes_per_ip: {rate: fast, burst: -1}}\n",
			`sockrelay.yaml:8: limits.handshakes_per_ip.rate: "fast" is not a number; accepted 0 to 1000000`},
		{"burst without rate", minimal + "limits: {handshakes_per_ip: {burst: 5}}\n",
			`sockrelay.yaml:8: limits.handshakes_per_ip.burst: given with rate: 0, which is off; accepted only with a rate more than 0`},
		{"burst out of range", minimal + "limits: {handshakes_per_ip: {rate: 5, burst: 0}}\n",
			`sockrelay.yaml:8: limits.handshakes_per_ip.burst: 0 is out of range; accepted 1 to 10000000`},
		{"pool client cert without key", minimal + "    tls: {cert: c.pem}\n",
			`sockrelay.yaml:8: pools.echo.tls.key: required with cert; accepted: the path of the PEM private key of cert, absolute or relative to the configuration file's directory`},
		{"pool client key without cert", minimal + "    tls: {cert: \"\", key: k.pem}\n",
			`sockrelay.yaml:8: pools.echo.tls.cert: required with key; accepted: the path of a PEM client certificate chain, absolute or relative to the configuration file's directory`},
		{"pool tls server name and enabled", minimal + "    tls: {server_name: \"*.example.com\", enabled: yes}\n",
			"sockrelay.yaml:8: pools.echo.tls.enabled: \"yes\" is not a boolean; accepted: true or false\n" +
				"sockrelay.yaml:8: pools.echo.tls.server_name: \"*.example.com\" is not a server name; accepted: a DNS name such as chat.internal, or an IP address; \"\" for each server's host"},
		{"unknown key in pool tls", minimal + "    tls: {verify: false}\n",
			`sockrelay.yaml:8: pools.echo.tls.verify: unknown key; accepted: ca_file, cert, enabled, insecure_skip_verify, key, server_name`},
		{"pool proxy protocol", minimal + "    proxy_protocol: v3\n",
			`sockrelay.yaml:8: pools.echo.proxy_protocol: "v3" is not a PROXY protocol version; accepted: off, v1, v2`},
		{"pool proxy protocol as a boolean", minimal + "    proxy_protocol: false\n",
			`sockrelay.yaml:8: pools.echo.proxy_protocol: "false" is not a PROXY protocol version; accepted: off, v1, v2`},
		{"several errors, sorted by line", "pools:\n  echo:\n    servers:\n      - address: 127.0.0.1:9000\n        weight: 0\nlisteners:\n  - address: 127.0.0.1:8080\n    routes: [{pool: nope}]\nlog_level: loud\ntimeouts: {connect: soon}\n",
			"sockrelay.yaml:5: pools.echo.servers[0].weight: 0 is out of range; accepted 1 to 1000\n" +
				"sockrelay.yaml:8: listeners[0].routes[0].pool: \"nope\" is not a pool; accepted: echo\n" +
				"sockrelay.yaml:9: log_level: \"loud\" is not a log level; accepted: debug, info, warn, error\n" +
				"sockrelay.yaml:10: timeouts.connect: \"soon\" is not a duration; accepted: a number with a unit (ms, s, m, h) such as 500ms, 10s or 1h30m"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("sockrelay.yaml", []byte(tc.file))
			if err == nil {
				t.Fatalf("Parse accepted the file: %+v", c)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("Parse error:\n%s\nwant:\n%s", got, tc.want)
			}
			var list ErrorList
			if !errors.As(err, &list) || len(list) != strings.Count(tc.want, "\n")+1 {
				t.Errorf("error is %T with %d entries, want an ErrorList with one entry per line", err, len(list))
			}
		})
	}
}

// TestErrorsCapped checks that a file with many mistakes lists the first MaxReported, by line, and counts
// the rest.
func TestErrorsCapped(t *testing.T) {
	file := minimal + "  chat:\n    servers:\n"
	for range 25 {
		file += "      - {address: 127.0.0.1:9001, weight: 0}\n"
	}
	_, err := Parse("sockrelay.yaml", []byte(file))
	if err == nil {
		t.Fatal("Parse accepted the file")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != MaxReported+1 {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), MaxReported+1, err)
	}
	if want := "sockrelay.yaml:10: pools.chat.servers[0].weight: 0 is out of range; accepted 1 to 1000"; lines[0] != want {
		t.Errorf("first line %q, want %q", lines[0], want)
	}
	// 25 weights and 24 duplicates: 29 past the cap.
	if want := "sockrelay.yaml: 29 more errors not shown"; lines[MaxReported] != want {
		t.Errorf("last line %q, want %q", lines[MaxReported], want)
	}
	if n := len(err.(ErrorList)); n != 49 {
		t.Errorf("ErrorList has %d errors, want all 49", n)
	}
}

// TestDefaults checks that every default is filled in, so that no caller applies its own.
func TestDefaults(t *testing.T) {
	c, err := Parse("sockrelay.yaml", []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Admin:           "127.0.0.1:9180",
		LogLevel:        "info",
		LogFormat:       "text",
		Datapath:        "auto",
		Auto:            Auto{Start: "measured"},
		KernelHeldLimit: 4 << 20,
		Timeouts: Timeouts{
			ClientHeader:     10 * time.Second,
			Connect:          5 * time.Second,
			UpstreamResponse: 15 * time.Second,
			Shutdown:         30 * time.Second,
			HalfClosed:       5 * time.Second,
			TCPHalfClosed:    time.Minute,
			HTTPIdle:         60 * time.Second,
		},
		MaxHeaderBytes: 16 << 10,
		Listeners: []Listener{{
			Name: "listener0", Address: "127.0.0.1:8080", Type: "http", Datapath: "auto",
			Routes: []Route{{Host: "", PathPrefix: "/", Pool: "echo"}},
		}},
		Pools: []Pool{{
			Name:          "echo",
			Balance:       "round_robin",
			Retry:         RetrySpec{Tries: 3, Timeout: 10 * time.Second},
			PassiveHealth: PassiveHealth{Failures: 3, Window: 10 * time.Second, DownFor: 30 * time.Second},
			Servers:       []Server{{Address: "127.0.0.1:9000", Weight: 1}},
			ProxyProtocol: "off",
		}},
	}
	c.file, c.lines = "", nil // where the keys were, for ErrorAt; cmd/sockrelay's check tests cover it
	if !reflect.DeepEqual(c, want) {
		t.Errorf("Parse(minimal) =\n%+v\nwant\n%+v", c, want)
	}
}

// TestValues checks that given values come through, and the defaults that depend on other keys.
func TestValues(t *testing.T) {
	c, err := Parse("sockrelay.yaml", []byte(`
admin: ""
datapath: splice
kernel_held_limit: 65536
event_loops: 3
max_header_bytes: 1 MiB
tunnel_log_interval: 1h30m
timeouts: {connect: 250ms}
listeners:
  - name: public
    address: ":0"
    routes:
      - {host: "*.Example.COM.", path_prefix: /ws, pool: chat}
      - {host: "[::1]", pool: chat}
  - address: 127.0.0.1:0
    datapath: copy
    routes: [{pool: users}]
pools:
  chat:
    balance: hash
    hash: {by: cookie, name: session}
    health_check: {type: websocket, path: /ws}
    servers:
      - 127.0.0.1:9001
      - {address: "[::1]:9002", weight: 1000, max_tunnels: 500, backup: true, drain: true}
  users:
    balance: hash
    close_tunnels_on_removal: true
    retry: {tries: 1}
    passive_health: {failures: 0}
    health_check: {type: http, timeout: 1s, interval: 1s, rise: 1, fall: 100, slow_start: 1m}
    dns: {name: _users._tcp.service.consul, type: SRV, interval: 24h, max_tunnels: 100}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Admin != "" || c.Datapath != "splice" || c.KernelHeldLimit != 65536 || c.EventLoops != 3 || c.MaxHeaderBytes != 1<<20 ||
		c.TunnelLogInterval != 90*time.Minute || c.Timeouts.Connect != 250*time.Millisecond || c.Timeouts.Shutdown != 30*time.Second {
		t.Errorf("top level: %+v", c)
	}
	want := []Listener{
		{Name: "public", Address: ":0", Type: "http", Datapath: "splice", Routes: []Route{
			{Host: "*.example.com", PathPrefix: "/ws", Pool: "chat"},
			{Host: "::1", PathPrefix: "/", Pool: "chat"},
		}},
		{Name: "listener1", Address: "127.0.0.1:0", Type: "http", Datapath: "copy", Routes: []Route{{PathPrefix: "/", Pool: "users"}}},
	}
	if !reflect.DeepEqual(c.Listeners, want) {
		t.Errorf("listeners:\n%+v\nwant\n%+v", c.Listeners, want)
	}
	chat := c.Pool("chat")
	if chat == nil || chat != &c.Pools[0] {
		t.Fatalf("Pool(chat) = %p, want %p", chat, &c.Pools[0])
	}
	if want := (HashSpec{By: "cookie", Name: "session", LoadFactor: 1.25}); chat.Hash != want {
		t.Errorf("chat hash %+v, want %+v", chat.Hash, want)
	}
	if want := (HealthCheck{Type: "websocket", Path: "/ws", ExpectStatus: 101, Interval: 5 * time.Second,
		Timeout: 2 * time.Second, Rise: 2, Fall: 3}); *chat.HealthCheck != want {
		t.Errorf("chat health check %+v, want %+v", *chat.HealthCheck, want)
	}
	wantServers := []Server{
		{Address: "127.0.0.1:9001", Weight: 1},
		{Address: "[::1]:9002", Weight: 1000, MaxTunnels: 500, Backup: true, Drain: true},
	}
	if !reflect.DeepEqual(chat.Servers, wantServers) {
		t.Errorf("chat servers %+v, want %+v", chat.Servers, wantServers)
	}
	users := c.Pool("users")
	if want := (HashSpec{By: "client_ip", LoadFactor: 1.25}); users.Hash != want {
		t.Errorf("users hash %+v, want %+v", users.Hash, want)
	}
	if !users.CloseTunnelsOnRemoval || users.Retry != (RetrySpec{Tries: 1, Timeout: 10 * time.Second}) ||
		users.PassiveHealth.Failures != 0 {
		t.Errorf("users: %+v", users)
	}
	if want := (HealthCheck{Type: "http", Path: "/", ExpectStatus: 200, Interval: time.Second, Timeout: time.Second,
		Rise: 1, Fall: 100, SlowStart: time.Minute}); *users.HealthCheck != want {
		t.Errorf("users health check %+v, want %+v", *users.HealthCheck, want)
	}
	if want := (DNS{Name: "_users._tcp.service.consul", Type: "SRV", Interval: 24 * time.Hour, MaxTunnels: 100}); *users.DNS != want ||
		len(users.Servers) != 0 {
		t.Errorf("users dns %+v servers %v, want %+v and no servers", *users.DNS, users.Servers, want)
	}
	if c.Pool("nope") != nil {
		t.Error("Pool(nope) is not nil")
	}
}

// TestCheckTimeoutFollowsShortInterval checks that an interval shorter than the default timeout
// shortens the timeout rather than making the file wrong for a key it does not give.
func TestCheckTimeoutFollowsShortInterval(t *testing.T) {
	c, err := Parse("sockrelay.yaml", []byte(minimal+"    health_check: {interval: 500ms}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if hc := c.Pool("echo").HealthCheck; hc.Interval != 500*time.Millisecond || hc.Timeout != 500*time.Millisecond {
		t.Errorf("interval %v timeout %v, want 500ms and 500ms", hc.Interval, hc.Timeout)
	}
}

// TestPlainStringServers checks that a server may be a bare HOST:PORT, mixed with mappings.
func TestPlainStringServers(t *testing.T) {
	c, err := Parse("sockrelay.yaml", []byte(minimal+"  chat:\n    servers:\n      - 127.0.0.1:9001\n      - {address: 127.0.0.1:9002, weight: 3}\n      - chat.internal:9003\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Server{
		{Address: "127.0.0.1:9001", Weight: 1},
		{Address: "127.0.0.1:9002", Weight: 3},
		{Address: "chat.internal:9003", Weight: 1},
	}
	if got := c.Pool("chat").Servers; !reflect.DeepEqual(got, want) {
		t.Errorf("servers %+v, want %+v", got, want)
	}
}

// TestMergeKeys checks YAML merge keys and aliases, which let pools share settings.
func TestMergeKeys(t *testing.T) {
	c, err := Parse("sockrelay.yaml", []byte(`
listeners:
  - address: 127.0.0.1:8080
    routes: [{path_prefix: /a, pool: a}, {pool: b}]
pools:
  a: &common
    balance: least_tunnels
    retry: {tries: 5}
    servers: [127.0.0.1:9001]
  b:
    <<: *common
    balance: random_two
    servers: [127.0.0.1:9002]
`))
	if err != nil {
		t.Fatal(err)
	}
	b := c.Pool("b")
	if b.Balance != "random_two" || b.Retry.Tries != 5 || b.Servers[0].Address != "127.0.0.1:9002" {
		t.Errorf("pool b %+v: want balance and servers of its own, retry from a", b)
	}
}

// TestAliasExpansionBounded checks that nested aliases cannot blow a small file up (billion laughs).
func TestAliasExpansionBounded(t *testing.T) {
	file := "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
	prev := "a"
	for _, name := range []string{"b", "c", "d", "e", "f"} {
		file += name + ": &" + name + " [" + strings.Repeat("*"+prev+", ", 9) + "*" + prev + "]\n"
		prev = name
	}
	_, err := Parse("sockrelay.yaml", []byte(file))
	if want := "sockrelay.yaml:1: aliases expand the file to more than 100000 values; accepted: at most 100000"; err == nil || err.Error() != want {
		t.Errorf("Parse error %v, want %s", err, want)
	}
}

func TestWarnings(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		want       []string
	}{
		{"unused pool", minimal + "  legacy:\n    servers: [127.0.0.1:9001]\n",
			[]string{"sockrelay.yaml:8: pools.legacy: not used by any route"}},
		{"shadowed routes", `listeners:
  - address: 127.0.0.1:8080
    routes:
      - {host: "*.example.com", pool: echo}
      - {host: chat.example.com, path_prefix: /ws, pool: echo}
      - {path_prefix: /ws, pool: echo}
      - {path_prefix: /ws/, pool: echo}
      - {host: example.com, pool: echo}
pools:
  echo:
    servers: [127.0.0.1:9000]
`, []string{
			"sockrelay.yaml:5: listeners[0].routes[1]: never matched: routes[0] (line 4) matches every request it would",
			"sockrelay.yaml:7: listeners[0].routes[3]: never matched: routes[2] (line 6) matches every request it would",
		}},
		{"shadowed SNI routes", tcpListener + "    tls_passthrough: true\n    routes: [{pool: echo}, {host: a.example.com, pool: echo}]\n" + onePool,
			[]string{"sockrelay.yaml:5: listeners[0].routes[1]: never matched: routes[0] (line 5) matches every request it would"}},
		{"per-IP limit past the limit", minimal + "limits:\n  max_tunnels: 10\n  max_tunnels_per_ip: 20\n",
			[]string{"sockrelay.yaml:10: limits.max_tunnels_per_ip: never reached: max_tunnels, 10, is lower"}},
		{"CA file not used", minimal + "    tls:\n      ca_file: ca.pem\n      insecure_skip_verify: true\n",
			[]string{"sockrelay.yaml:9: pools.echo.tls.ca_file: not used: insecure_skip_verify is true, which verifies no certificate"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("sockrelay.yaml", []byte(tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(c.Warnings, tc.want) {
				t.Errorf("warnings:\n%s\nwant:\n%s", strings.Join(c.Warnings, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sockrelay.yaml")
	if err := os.WriteFile(path, []byte(minimal+"log_level: loud\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if want := path + `:8: log_level: "loud" is not a log level; accepted: debug, info, warn, error`; err == nil || err.Error() != want {
		t.Errorf("Load error %v, want %s", err, want)
	}
	_, err = Load(filepath.Join(dir, "missing.yaml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v, want an error that is os.ErrNotExist", err)
	}
}

// TestEdgeValues parses a file that gives every edge setting (TLS, PROXY protocol, trusted proxies,
// limits, origins, tunnel timeouts) and checks that each comes through, with the defaults that depend
// on other keys.
func TestEdgeValues(t *testing.T) {
	c, err := Parse("/etc/sockrelay/sockrelay.yaml", []byte(`
timeouts: {tunnel_idle: 5m, tunnel_lifetime: 24h, half_closed: 0s, tcp_half_closed: 10m, http_idle: 30s}
limits:
  max_tunnels: 100000
  max_tunnels_per_ip: 100
  handshakes_per_ip: {rate: 2.5}
  max_concurrent_handshakes: 1000
listeners:
  - name: public
    address: ":443"
    type: http
    proxy_protocol: true
    trusted_proxies: [10.0.0.0/8, 192.0.2.1, "::1", "2001:db8::/32", "::ffff:172.16.0.0/108"]
    tls:
      certificates:
        - {cert: certs/chat.pem, key: certs/chat-key.pem}
        - {cert: /etc/ssl/other.pem, key: ../keys/other.key}
      min_version: 1.3
      reload_interval: 1m
    limits:
      max_tunnels: 5000
      handshakes_per_ip: {rate: 0.2}
    routes:
      - host: chat.example.com
        path_prefix: /ws
        origins: ["https://Chat.Example.com:443", "http://localhost:3000", "http://[0:0::1]:80"]
        pool: chat
      - {pool: chat, origins: []}
  - name: sni
    address: ":8443"
    type: tcp
    proxy_protocol: true
    tls_passthrough: true
    limits: {handshakes_per_ip: {rate: 10, burst: 50}}
    routes:
      - {host: "*.example.com", pool: raw}
      - {pool: raw}
  - name: plain
    address: ":2222"
    type: tcp
    routes: [{pool: raw}]
pools:
  chat:
    proxy_protocol: v2
    tls:
      server_name: Chat.Internal.
      ca_file: ca.pem
      cert: client.pem
      key: client-key.pem
    servers: [10.0.1.1:443]
  raw:
    proxy_protocol: v1
    tls: {enabled: false, insecure_skip_verify: true}
    servers: [10.0.1.2:22]
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) > 0 {
		t.Errorf("warnings: %q", c.Warnings)
	}
	if c.Timeouts.TunnelIdle != 5*time.Minute || c.Timeouts.TunnelLifetime != 24*time.Hour ||
		c.Timeouts.HalfClosed != 0 || c.Timeouts.TCPHalfClosed != 10*time.Minute ||
		c.Timeouts.HTTPIdle != 30*time.Second {
		t.Errorf("timeouts %+v", c.Timeouts)
	}
	if want := (Limits{MaxTunnels: 100000, MaxTunnelsPerIP: 100, HandshakesPerIP: RateLimit{Rate: 2.5, Burst: 3},
		MaxConcurrentHandshakes: 1000}); c.Limits != want {
		t.Errorf("limits %+v, want %+v", c.Limits, want)
	}
	want := []Listener{
		{
			Name: "public", Address: ":443", Type: "http", Datapath: "auto", ProxyProtocol: true,
			TrustedProxies: []netip.Prefix{
				netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.1/32"),
				netip.MustParsePrefix("::1/128"), netip.MustParsePrefix("2001:db8::/32"),
				netip.MustParsePrefix("172.16.0.0/12"),
			},
			TLS: &ListenerTLS{
				Certificates: []Certificate{
					{Cert: "/etc/sockrelay/certs/chat.pem", Key: "/etc/sockrelay/certs/chat-key.pem"},
					{Cert: "/etc/ssl/other.pem", Key: "/etc/keys/other.key"},
				},
				MinVersion: "1.3", ReloadInterval: time.Minute,
			},
			Limits: Limits{MaxTunnels: 5000, HandshakesPerIP: RateLimit{Rate: 0.2, Burst: 1}},
			Routes: []Route{
				{Host: "chat.example.com", PathPrefix: "/ws", Pool: "chat",
					Origins: []string{"https://chat.example.com", "http://localhost:3000", "http://[::1]"}},
				{PathPrefix: "/", Pool: "chat"},
			},
		},
		{
			Name: "sni", Address: ":8443", Type: "tcp", Datapath: "auto", ProxyProtocol: true, TLSPassthrough: true,
			Limits: Limits{HandshakesPerIP: RateLimit{Rate: 10, Burst: 50}},
			Routes: []Route{{Host: "*.example.com", PathPrefix: "/", Pool: "raw"}, {PathPrefix: "/", Pool: "raw"}},
		},
		{Name: "plain", Address: ":2222", Type: "tcp", Datapath: "auto", Routes: []Route{{PathPrefix: "/", Pool: "raw"}}},
	}
	if !reflect.DeepEqual(c.Listeners, want) {
		t.Errorf("listeners:\n%+v\nwant\n%+v", c.Listeners, want)
	}
	chat := c.Pool("chat")
	if want := (PoolTLS{Enabled: true, ServerName: "chat.internal", CAFile: "/etc/sockrelay/ca.pem",
		Cert: "/etc/sockrelay/client.pem", Key: "/etc/sockrelay/client-key.pem"}); chat.TLS != want || chat.ProxyProtocol != "v2" {
		t.Errorf("chat tls %+v proxy_protocol %s, want %+v and v2", chat.TLS, chat.ProxyProtocol, want)
	}
	raw := c.Pool("raw")
	if want := (PoolTLS{InsecureSkipVerify: true}); raw.TLS != want || raw.ProxyProtocol != "v1" {
		t.Errorf("raw tls %+v proxy_protocol %s, want %+v and v1", raw.TLS, raw.ProxyProtocol, want)
	}
	// A tcp listener with passthrough routes by SNI: Match with the server name and no path.
	if r, ok := c.Listeners[1].Match("a.example.com", ""); !ok || r != &c.Listeners[1].Routes[0] {
		t.Errorf("Match by SNI a.example.com: %v %v, want routes[0]", r, ok)
	}
	if r, ok := c.Listeners[1].Match("", ""); !ok || r != &c.Listeners[1].Routes[1] {
		t.Errorf("Match without SNI: %v %v, want routes[1]", r, ok)
	}
}

// TestPathsRelativeToFile checks that the paths of TLS files are taken relative to the directory of the
// configuration file, whatever it is named, and absolute paths as given.
func TestPathsRelativeToFile(t *testing.T) {
	file := listener8080 + "    tls: {certificates: [{cert: c.pem, key: ./keys/../k.pem}]}\n    routes: [{pool: echo}]\n" +
		"pools:\n  echo:\n    tls: {ca_file: /etc/ssl//ca.pem, cert: ../client.pem, key: sub/client.key}\n    servers: [127.0.0.1:9000]\n"
	for _, tc := range []struct {
		name                      string
		cert, key                 string // the listener's
		ca, clientCert, clientKey string // the pool's
	}{
		{"sockrelay.yaml", "c.pem", "k.pem", "/etc/ssl/ca.pem", "../client.pem", "sub/client.key"},
		{"conf/sockrelay.yaml", "conf/c.pem", "conf/k.pem", "/etc/ssl/ca.pem", "client.pem", "conf/sub/client.key"},
		{"/etc/sockrelay/sockrelay.yaml", "/etc/sockrelay/c.pem", "/etc/sockrelay/k.pem", "/etc/ssl/ca.pem", "/etc/client.pem", "/etc/sockrelay/sub/client.key"},
	} {
		c, err := Parse(tc.name, []byte(file))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := c.Listeners[0].TLS.Certificates[0], (Certificate{tc.cert, tc.key}); got != want {
			t.Errorf("%s: certificate %+v, want %+v", tc.name, got, want)
		}
		p := c.Pool("echo").TLS
		if p.CAFile != tc.ca || p.Cert != tc.clientCert || p.Key != tc.clientKey {
			t.Errorf("%s: pool tls %+v, want ca_file %s, cert %s, key %s", tc.name, p, tc.ca, tc.clientCert, tc.clientKey)
		}
	}

	// Load names the file as given, so that its directory is the file's, not the working directory.
	dir := t.TempDir()
	path := filepath.Join(dir, "sockrelay.yaml")
	if err := os.WriteFile(path, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Listeners[0].TLS.Certificates[0].Cert, filepath.Join(dir, "c.pem"); got != want {
		t.Errorf("Load: cert %s, want %s", got, want)
	}
}

// TestBurstDefault checks that a rate limit's burst defaults to its rate rounded up, at least 1.
func TestBurstDefault(t *testing.T) {
	for _, tc := range []struct {
		limit string
		want  RateLimit
	}{
		{"{}", RateLimit{}},
		{"{rate: 0}", RateLimit{}},
		{"{rate: 0.01}", RateLimit{Rate: 0.01, Burst: 1}},
		{"{rate: 1}", RateLimit{Rate: 1, Burst: 1}},
		{"{rate: 2.5}", RateLimit{Rate: 2.5, Burst: 3}},
		{"{rate: 1000000}", RateLimit{Rate: 1e6, Burst: 1e6}},
		{"{rate: 100, burst: 1}", RateLimit{Rate: 100, Burst: 1}},
	} {
		c, err := Parse("sockrelay.yaml", []byte(minimal+"limits: {handshakes_per_ip: "+tc.limit+"}\n"))
		if err != nil {
			t.Errorf("%s: %v", tc.limit, err)
			continue
		}
		if got := c.Limits.HandshakesPerIP; got != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.limit, got, tc.want)
		}
	}
}

// TestParseOrigin checks that origins are written as browsers send them, so that comparing them with
// an Origin header byte for byte is right.
func TestParseOrigin(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"https://app.example.com", "https://app.example.com"},
		{"HTTPS://App.Example.COM", "https://app.example.com"},
		{"https://app.example.com:443", "https://app.example.com"},
		{"http://app.example.com:443", "http://app.example.com:443"},
		{"http://app.example.com:80", "http://app.example.com"},
		{"https://app.example.com:8443", "https://app.example.com:8443"},
		{"http://127.0.0.1:3000", "http://127.0.0.1:3000"},
		{"http://[0:0::1]:3000", "http://[::1]:3000"},
		{"http://[::1]", "http://[::1]"},
		{"https://app.example.com/", ""},
		{"https://app.example.com/app", ""},
		{"https://app.example.com?x", ""},
		{"https://app.example.com#", ""},
		{"https://user@app.example.com", ""},
		{"https://app.example.com:", ""},
		{"https://app.example.com:+1", ""},
		{"https://app.example.com:0", ""},
		{"https://", ""},
		{"app.example.com", ""},
		{"ws://app.example.com", ""},
		{"https://*.example.com", ""},
		{"http://::1", ""},
		{"http://[::1", ""},
		{"http://[127.0.0.1]", ""},
		{"http://[fe80::1%25eth0]", ""},
		{"null", ""},
	} {
		got, ok := parseOrigin(tc.in)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("parseOrigin(%q) = %q, %v; want %q", tc.in, got, ok, tc.want)
		}
	}
}

func TestServerNameFor(t *testing.T) {
	for _, tc := range []struct {
		tls           PoolTLS
		address, want string
	}{
		{PoolTLS{Enabled: true}, "chat.internal:443", "chat.internal"},
		{PoolTLS{Enabled: true}, "[::1]:443", "::1"},
		{PoolTLS{Enabled: true, ServerName: "chat.example.com"}, "10.0.0.1:443", "chat.example.com"},
	} {
		if got := tc.tls.ServerNameFor(tc.address); got != tc.want {
			t.Errorf("%+v.ServerNameFor(%s) = %s, want %s", tc.tls, tc.address, got, tc.want)
		}
	}
}

// TestAdminMapping: admin as a mapping gives the address and who may use it; the token file is relative
// to the file's directory, and allow_remote lets the address be one other hosts reach.
func TestAdminMapping(t *testing.T) {
	c, err := Parse("/etc/sockrelay/sockrelay.yaml", []byte(minimal+`admin:
  address: 0.0.0.0:9180
  token_file: admin.token
  allow_remote: true
  hosts: [Relay-Admin.example.com.]
  upgrade_binary: /usr/bin/sockrelay
`))
	if err != nil {
		t.Fatal(err)
	}
	want := AdminAccess{TokenFile: "/etc/sockrelay/admin.token", AllowRemote: true, Hosts: []string{"relay-admin.example.com"},
		UpgradeBinary: "/usr/bin/sockrelay"}
	if c.Admin != "0.0.0.0:9180" || !reflect.DeepEqual(c.AdminAccess, want) {
		t.Errorf("admin %q, %+v; want 0.0.0.0:9180, %+v", c.Admin, c.AdminAccess, want)
	}
	for _, ok := range []string{"admin: unix:/run/sockrelay/admin.sock\n", "admin: localhost:9180\n", "admin: '[::1]:9180'\n", `admin: ""` + "\n"} {
		if _, err := Parse("sockrelay.yaml", []byte(minimal+ok)); err != nil {
			t.Errorf("%s: %v", strings.TrimSpace(ok), err)
		}
	}
}
