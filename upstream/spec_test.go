package upstream

import (
	"errors"
	"testing"
	"time"
)

// goodSpec is a valid spec with every optional part set, which each case below breaks in one place.
func goodSpec() PoolSpec {
	return PoolSpec{
		Name:    "chat",
		Balance: Hash,
		Hash:    HashSpec{By: HashHeader, Name: "X-User", LoadFactor: 1.25},
		Servers: []ServerSpec{
			{Address: "10.0.0.1:9000", Weight: 1},
			{Address: "10.0.0.2:9000", Weight: 2, MaxTunnels: 100},
			{Address: "10.0.0.3:9000", Weight: 1, Backup: true},
		},
		Passive: DefaultPassiveHealth(),
		Active: &ActiveHealthSpec{Type: CheckWebSocket, Path: "/ws", ExpectStatus: 101,
			Interval: 5 * time.Second, Timeout: 2 * time.Second, Rise: 2, Fall: 3, SlowStart: 30 * time.Second},
		Retry: RetrySpec{Tries: 3, Timeout: 10 * time.Second},
	}
}

func goodDNSSpec() PoolSpec {
	s := goodSpec()
	s.Servers = nil
	s.DNS = &DNSSpec{Name: "chat.internal", Type: DNSA, Port: 9000, Interval: 30 * time.Second}
	return s
}

func TestValidateAcceptsGoodSpecs(t *testing.T) {
	for name, s := range map[string]PoolSpec{
		"static":   goodSpec(),
		"dns":      goodDNSSpec(),
		"defaults": PoolSpec{Name: "p", Servers: []ServerSpec{{Address: "a:1"}}}.WithDefaults(),
		"defaults with active and dns": PoolSpec{Name: "p", DNS: &DNSSpec{Name: "x", Port: 80},
			Active: &ActiveHealthSpec{Type: CheckHTTP}}.WithDefaults(),
	} {
		if err := s.Validate(); err != nil {
			t.Errorf("%s: Validate: %v", name, err)
		}
	}
}

func TestValidateReportsTheField(t *testing.T) {
	for _, tc := range []struct {
		name   string
		dns    bool
		mutate func(*PoolSpec)
		want   string
	}{
		{"no name", false, func(s *PoolSpec) { s.Name = "" }, "name: empty; give the pool a name"},
		{"unknown algorithm", false, func(s *PoolSpec) { s.Balance = "fastest" },
			`balance: "fastest" is not an algorithm; accepted round_robin, least_tunnels, hash, random_two`},
		{"empty algorithm", false, func(s *PoolSpec) { s.Balance = "" },
			`balance: "" is not an algorithm; accepted round_robin, least_tunnels, hash, random_two`},
		{"hash by nothing", false, func(s *PoolSpec) { s.Hash.By = "" },
			`hash.by: "" is not a key; accepted client_ip, header, cookie, path`},
		{"hash header without name", false, func(s *PoolSpec) { s.Hash.Name = "" },
			"hash.name: empty; give the header name to hash, since hash.by is header"},
		{"hash cookie without name", false, func(s *PoolSpec) { s.Hash = HashSpec{By: HashCookie, LoadFactor: 2} },
			"hash.name: empty; give the cookie name to hash, since hash.by is cookie"},
		{"load factor below 1", false, func(s *PoolSpec) { s.Hash.LoadFactor = 0.5 },
			"hash.load_factor: 0.5 is out of range; accepted 1 to 10"},
		{"hash spec ignored by other algorithms", false, func(s *PoolSpec) { s.Balance = RoundRobin; s.Hash = HashSpec{} }, ""},
		{"no servers", false, func(s *PoolSpec) { s.Servers = nil },
			"servers: empty; give at least one server, or dns to discover them"},
		{"servers and dns", true, func(s *PoolSpec) { s.Servers = []ServerSpec{{Address: "a:1", Weight: 1}} },
			"dns: set together with servers; use one or the other"},
		{"weight 0", false, func(s *PoolSpec) { s.Servers[1].Weight = 0 },
			"servers[1].weight: 0 is out of range; accepted 1 to 1000"},
		{"weight 1001", false, func(s *PoolSpec) { s.Servers[0].Weight = 1001 },
			"servers[0].weight: 1001 is out of range; accepted 1 to 1000"},
		{"negative max_tunnels", false, func(s *PoolSpec) { s.Servers[0].MaxTunnels = -1 },
			"servers[0].max_tunnels: -1 is out of range; accepted 0 (no cap) to 10000000"},
		{"address without port", false, func(s *PoolSpec) { s.Servers[0].Address = "10.0.0.1" },
			`servers[0].address: "10.0.0.1" is not HOST:PORT; for example 10.0.0.1:9000 or [::1]:9000`},
		{"address without host", false, func(s *PoolSpec) { s.Servers[0].Address = ":9000" },
			`servers[0].address: ":9000" has an empty host; for example 10.0.0.1:9000`},
		{"port 0", false, func(s *PoolSpec) { s.Servers[2].Address = "h:0" },
			`servers[2].address: port "0" in "h:0" is out of range; accepted 1 to 65535`},
		{"repeated address", false, func(s *PoolSpec) { s.Servers[2].Address = "10.0.0.1:9000" },
			`servers[2].address: "10.0.0.1:9000" repeats servers[0]; give each server once`},
		{"all backup", false, func(s *PoolSpec) { s.Servers[0].Backup = true; s.Servers[1].Backup = true },
			"servers: all 3 are backup; mark at least one as a primary (backup: false)"},
		{"dns without name", true, func(s *PoolSpec) { s.DNS.Name = "" },
			"dns.name: empty; give the name to resolve, e.g. chat.internal, or _ws._tcp.chat.internal for SRV"},
		{"dns type MX", true, func(s *PoolSpec) { s.DNS.Type = "MX" },
			`dns.type: "MX" is not a record type; accepted A, AAAA, SRV`},
		{"dns A without port", true, func(s *PoolSpec) { s.DNS.Port = 0 },
			"dns.port: 0 is out of range; accepted 1 to 65535"},
		{"dns SRV with port", true, func(s *PoolSpec) { s.DNS.Type = DNSSRV },
			"dns.port: 9000 is set with type SRV, whose records carry their own ports; leave it 0"},
		{"dns interval 0", true, func(s *PoolSpec) { s.DNS.Interval = 0 },
			"dns.interval: 0s is out of range; accepted 1s to 24h"},
		{"dns max_tunnels", true, func(s *PoolSpec) { s.DNS.MaxTunnels = -5 },
			"dns.max_tunnels: -5 is out of range; accepted 0 (no cap) to 10000000"},
		{"passive off needs nothing else", false, func(s *PoolSpec) { s.Passive = PassiveHealthSpec{} }, ""},
		{"passive failures negative", false, func(s *PoolSpec) { s.Passive.Failures = -1 },
			"passive.failures: -1 is out of range; accepted 0 (off) to 100"},
		{"passive window 0", false, func(s *PoolSpec) { s.Passive.Window = 0 },
			"passive.window: 0s is out of range; accepted 1s to 1h"},
		{"passive down_for 2h", false, func(s *PoolSpec) { s.Passive.DownFor = 2 * time.Hour },
			"passive.down_for: 2h0m0s is out of range; accepted 1s to 1h"},
		{"active type icmp", false, func(s *PoolSpec) { s.Active.Type = "icmp" },
			`active.type: "icmp" is not a check type; accepted tcp, http, websocket`},
		{"active path relative", false, func(s *PoolSpec) { s.Active.Path = "health" },
			`active.path: "health" does not start with /; for example /healthz`},
		{"active tcp with path", false, func(s *PoolSpec) { s.Active.Type = CheckTCP; s.Active.ExpectStatus = 0 },
			"active.path: set with type tcp, which sends no request; leave it empty"},
		{"active tcp with status", false, func(s *PoolSpec) { s.Active.Type = CheckTCP; s.Active.Path = "" },
			"active.expect_status: set with type tcp, which reads no status; leave it 0"},
		{"active status 700", false, func(s *PoolSpec) { s.Active.ExpectStatus = 700 },
			"active.expect_status: 700 is out of range; accepted 100 to 599"},
		{"active interval 10ms", false, func(s *PoolSpec) { s.Active.Interval = 10 * time.Millisecond; s.Active.Timeout = 10 * time.Millisecond },
			"active.interval: 10ms is out of range; accepted 100ms to 1h"},
		{"active timeout past interval", false, func(s *PoolSpec) { s.Active.Timeout = 6 * time.Second },
			"active.timeout: 6s is out of range; accepted 10ms to active.interval (5s)"},
		{"active rise 0", false, func(s *PoolSpec) { s.Active.Rise = 0 },
			"active.rise: 0 is out of range; accepted 1 to 100"},
		{"active fall 101", false, func(s *PoolSpec) { s.Active.Fall = 101 },
			"active.fall: 101 is out of range; accepted 1 to 100"},
		{"active slow_start negative", false, func(s *PoolSpec) { s.Active.SlowStart = -time.Second },
			"active.slow_start: -1s is out of range; accepted 0 (off) to 1h"},
		{"retry tries 0", false, func(s *PoolSpec) { s.Retry.Tries = 0 },
			"retry.tries: 0 is out of range; accepted 1 to 10"},
		{"retry tries 11", false, func(s *PoolSpec) { s.Retry.Tries = 11 },
			"retry.tries: 11 is out of range; accepted 1 to 10"},
		{"retry timeout 0", false, func(s *PoolSpec) { s.Retry.Timeout = 0 },
			"retry.timeout: 0s is out of range; accepted 100ms to 10m"},
		{"two problems, both reported", false, func(s *PoolSpec) { s.Name = ""; s.Retry.Tries = 0 },
			"name: empty; give the pool a name\nretry.tries: 0 is out of range; accepted 1 to 10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := goodSpec()
			if tc.dns {
				s = goodDNSSpec()
			}
			tc.mutate(&s)
			err := s.Validate()
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Fatalf("Validate:\n got %q\nwant %q", got, tc.want)
			}
			if err != nil {
				var fe *FieldError
				if !errors.As(err, &fe) || fe.Field == "" {
					t.Errorf("Validate's error holds no *FieldError: %#v", err)
				}
			}
		})
	}
}

func TestWithDefaults(t *testing.T) {
	in := PoolSpec{
		Name:    "p",
		Servers: []ServerSpec{{Address: "a:1"}, {Address: "b:1", Weight: 5}},
		Active:  &ActiveHealthSpec{Type: CheckWebSocket, Interval: time.Second},
		DNS:     &DNSSpec{Name: "x"},
	}
	got := in.WithDefaults()
	if got.Balance != RoundRobin || got.Hash.LoadFactor != 1.25 || got.Retry != (RetrySpec{Tries: 3, Timeout: 10 * time.Second}) {
		t.Errorf("pool defaults: balance %q, load factor %v, retry %+v", got.Balance, got.Hash.LoadFactor, got.Retry)
	}
	if got.Servers[0].Weight != 1 || got.Servers[1].Weight != 5 {
		t.Errorf("weights %d, %d; want 1 (default) and 5 (given)", got.Servers[0].Weight, got.Servers[1].Weight)
	}
	wantActive := ActiveHealthSpec{Type: CheckWebSocket, Path: "/", ExpectStatus: 101, Interval: time.Second,
		Timeout: time.Second, Rise: 2, Fall: 3}
	if *got.Active != wantActive {
		t.Errorf("active %+v; want %+v", *got.Active, wantActive)
	}
	if got.DNS.Type != DNSA || got.DNS.Interval != 30*time.Second {
		t.Errorf("dns %+v", *got.DNS)
	}
	if got.Passive != (PassiveHealthSpec{Window: 10 * time.Second, DownFor: 30 * time.Second}) {
		t.Errorf("passive %+v: failures must stay 0 (off)", got.Passive)
	}
	// The copy shares nothing with the input.
	got.Servers[0].Weight = 7
	got.Active.Rise = 9
	got.DNS.Port = 1
	if in.Servers[0].Weight != 0 || in.Active.Rise != 0 || in.DNS.Port != 0 {
		t.Error("WithDefaults' result aliases its input")
	}
}
