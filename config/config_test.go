package config

import (
	"errors"
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

func TestBrokenFiles(t *testing.T) {
	for _, tc := range []struct {
		name, file, want string
	}{
		{"empty file", ``,
			`sockrelay.yaml: empty file; accepted: a mapping with at least listeners and pools`},
		{"only comments", "# nothing yet\n",
			`sockrelay.yaml: empty file; accepted: a mapping with at least listeners and pools`},
		{"not a mapping", "- listeners\n",
			`sockrelay.yaml:1: got a list; accepted: a configuration, a mapping with keys admin, datapath, kernel_held_limit, listeners, log_level, max_header_bytes, pools, timeouts, tunnel_log_interval`},
		{"invalid YAML", "listeners:\n  - address: 127.0.0.1:8080\n  routes\n",
			`sockrelay.yaml:3: invalid YAML: could not find expected ':'`},
		{"unclosed flow list", "pools: {echo: [\n",
			`sockrelay.yaml:1: invalid YAML: did not find expected node content`},
		{"tab indentation", "listeners:\n\t- address: 127.0.0.1:8080\n",
			`sockrelay.yaml:2: invalid YAML: found character that cannot start any token; indent with spaces, not tabs`},
		{"two documents", minimal + "---\nadmin: \"\"\n",
			`sockrelay.yaml:8: a second YAML document; accepted: one document per file`},
		{"unknown top-level key", minimal + "datapth: copy\n",
			`sockrelay.yaml:8: datapth: unknown key; accepted: admin, datapath, kernel_held_limit, listeners, log_level, max_header_bytes, pools, timeouts, tunnel_log_interval`},
		{"unknown nested key", "listeners:\n  - address: 127.0.0.1:8080\n    datapth: copy\n    routes: [{pool: echo}]\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:3: listeners[0].datapth: unknown key; accepted: address, datapath, name, routes`},
		{"unknown key in a server", minimal + "  chat:\n    servers:\n      - {address: 127.0.0.1:9001, weigth: 2}\n",
			`sockrelay.yaml:10: pools.chat.servers[0].weigth: unknown key; accepted: address, backup, drain, max_tunnels, weight`},
		{"duplicate key", minimal + "log_level: info\nlog_level: debug\n",
			`sockrelay.yaml:9: log_level: duplicate key; first given at line 8`},
		{"duplicate pool", minimal + "  echo:\n    servers: [127.0.0.1:9001]\n",
			`sockrelay.yaml:8: pools.echo: duplicate key; first given at line 6`},
		{"mapping where a scalar goes", minimal + "timeouts: 5s\n",
			`sockrelay.yaml:8: timeouts: got "5s"; accepted: the timeouts, a mapping with keys client_header, connect, shutdown, upstream_response`},
		{"list where a mapping goes", "listeners:\n  address: 127.0.0.1:8080\npools: {echo: {servers: [127.0.0.1:9000]}}\n",
			`sockrelay.yaml:2: listeners: got a mapping; accepted: a list of listeners, at least one`},
		{"no value", minimal + "admin:\n",
			`sockrelay.yaml:8: admin: got no value; accepted: HOST:PORT such as 127.0.0.1:9090, or :9090 for every address; "" disables`},
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
		Admin:           "127.0.0.1:9090",
		LogLevel:        "info",
		Datapath:        "auto",
		KernelHeldLimit: 4 << 20,
		Timeouts: Timeouts{
			ClientHeader:     10 * time.Second,
			Connect:          5 * time.Second,
			UpstreamResponse: 15 * time.Second,
			Shutdown:         30 * time.Second,
		},
		MaxHeaderBytes: 16 << 10,
		Listeners: []Listener{{
			Name: "listener0", Address: "127.0.0.1:8080", Datapath: "auto",
			Routes: []Route{{Host: "", PathPrefix: "/", Pool: "echo"}},
		}},
		Pools: []Pool{{
			Name:          "echo",
			Balance:       "round_robin",
			Retry:         RetrySpec{Tries: 3, Timeout: 10 * time.Second},
			PassiveHealth: PassiveHealth{Failures: 3, Window: 10 * time.Second, DownFor: 30 * time.Second},
			Servers:       []Server{{Address: "127.0.0.1:9000", Weight: 1}},
		}},
	}
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
	if c.Admin != "" || c.Datapath != "splice" || c.KernelHeldLimit != 65536 || c.MaxHeaderBytes != 1<<20 ||
		c.TunnelLogInterval != 90*time.Minute || c.Timeouts.Connect != 250*time.Millisecond || c.Timeouts.Shutdown != 30*time.Second {
		t.Errorf("top level: %+v", c)
	}
	want := []Listener{
		{Name: "public", Address: ":0", Datapath: "splice", Routes: []Route{
			{Host: "*.example.com", PathPrefix: "/ws", Pool: "chat"},
			{Host: "::1", PathPrefix: "/", Pool: "chat"},
		}},
		{Name: "listener1", Address: "127.0.0.1:0", Datapath: "copy", Routes: []Route{{PathPrefix: "/", Pool: "users"}}},
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
