package upstream

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Algorithm names how a pool chooses among its usable servers.
type Algorithm string

const (
	// RoundRobin is smooth weighted round-robin (nginx's): over any run of sum(weights) picks each server
	// gets exactly its weight's share, interleaved rather than in bursts.
	RoundRobin Algorithm = "round_robin"
	// LeastTunnels picks the server with the fewest live tunnels per unit of weight, which suits
	// long-lived tunnels: their number, not the rate of new ones, is what loads a server.
	LeastTunnels Algorithm = "least_tunnels"
	// Hash sends the same key (client IP, header, cookie or path) to the same server, with bounded loads
	// so that one hot key cannot pile every tunnel onto one server.
	Hash Algorithm = "hash"
	// RandomTwo samples two servers by weight and takes the less loaded: nearly least_tunnels' balance
	// without every pick looking at every server's count.
	RandomTwo Algorithm = "random_two"
)

var algorithms = []Algorithm{RoundRobin, LeastTunnels, Hash, RandomTwo}

// HashBy names what the hash algorithm's key is taken from.
type HashBy string

const (
	HashClientIP HashBy = "client_ip"
	HashHeader   HashBy = "header"
	HashCookie   HashBy = "cookie"
	HashPath     HashBy = "path"
)

// CheckType names what an active health check does.
type CheckType string

const (
	// CheckTCP connects and closes: the server accepts connections.
	CheckTCP CheckType = "tcp"
	// CheckHTTP sends GET Path and expects ExpectStatus (200 by default).
	CheckHTTP CheckType = "http"
	// CheckWebSocket sends a real WebSocket upgrade to Path and expects ExpectStatus (101 by default);
	// on 101 the Sec-WebSocket-Accept must be right too, as the relay itself requires.
	CheckWebSocket CheckType = "websocket"
)

// DNSType names the record type DNS discovery resolves.
type DNSType string

const (
	DNSA    DNSType = "A"
	DNSAAAA DNSType = "AAAA"
	DNSSRV  DNSType = "SRV"
)

// Limits of the accepted ranges, named so that messages and checks cannot disagree.
const (
	MaxWeight     = 1000
	MaxMaxTunnels = 10_000_000
	MaxTries      = 10
)

// ServerSpec is one configured upstream server.
type ServerSpec struct {
	// Address is HOST:PORT; HOST may be a name, which is resolved at every dial.
	Address string
	// Weight is the server's share relative to the others, 1 to 1000 (WithDefaults makes 0 into 1).
	Weight int
	// MaxTunnels caps the server's live tunnels; 0 is no cap.
	MaxTunnels int
	// Backup servers take tunnels only when no primary is usable.
	Backup bool
	// Drain keeps the server's live tunnels but gives it no new ones.
	Drain bool
}

// HashSpec says where the hash algorithm's key comes from and how much load imbalance it tolerates.
type HashSpec struct {
	// By is client_ip, header, cookie or path.
	By HashBy
	// Name is the header or cookie name when By is header or cookie.
	Name string
	// LoadFactor bounds a server's live tunnels to LoadFactor times its weighted share of the average
	// (Google's "consistent hashing with bounded loads"); keys past the bound go to the next server in
	// their order. 1 to 10; WithDefaults makes 0 into 1.25.
	LoadFactor float64
}

// DNSSpec discovers a pool's servers by resolving a name at an interval.
type DNSSpec struct {
	// Name is the name to resolve; for SRV the full record name, e.g. _ws._tcp.chat.internal.
	Name string
	// Type is A, AAAA or SRV.
	Type DNSType
	// Port is the servers' port for A and AAAA (SRV records carry their own).
	Port int
	// Interval is how often to resolve again; WithDefaults makes 0 into 30s.
	Interval time.Duration
	// MaxTunnels is every discovered server's MaxTunnels; 0 is no cap.
	MaxTunnels int
}

// PassiveHealthSpec marks a server down from the failures the relay reports while using it (a refused
// connection, a handshake the server failed), without any traffic of its own.
type PassiveHealthSpec struct {
	// Failures within Window mark the server down for DownFor; 0 turns passive health off
	// (DefaultPassiveHealth is the recommended setting).
	Failures int
	// Window is how far back failures count; WithDefaults makes 0 into 10s.
	Window time.Duration
	// DownFor is how long the server then stays down; WithDefaults makes 0 into 30s.
	DownFor time.Duration
}

// ActiveHealthSpec checks every server at an interval, whether or not it carries traffic.
type ActiveHealthSpec struct {
	// Type is tcp, http or websocket; WithDefaults makes "" into tcp.
	Type CheckType
	// Path is the request path for http and websocket; WithDefaults makes "" into /.
	Path string
	// ExpectStatus is the status a healthy server answers; WithDefaults makes 0 into 200 for http and
	// 101 for websocket.
	ExpectStatus int
	// Interval is the time between checks of one server; WithDefaults makes 0 into 5s.
	Interval time.Duration
	// Timeout bounds one check, connect to answer; at most Interval. WithDefaults makes 0 into 2s (or
	// Interval when that is shorter).
	Timeout time.Duration
	// Rise consecutive passes mark a down server up; WithDefaults makes 0 into 2.
	Rise int
	// Fall consecutive failures mark an up server down; WithDefaults makes 0 into 3.
	Fall int
	// SlowStart ramps a server's effective weight linearly from almost 0 to its weight over this long
	// after it comes back up (from any kind of down), so that a cold server is not handed its full share
	// of new tunnels at once; 0 is off.
	SlowStart time.Duration
}

// RetrySpec says how often the relay tries another server when one fails to open a tunnel. This
// package only holds and checks it; the relay applies it with Pick's exclude list.
type RetrySpec struct {
	// Tries is the number of servers tried for one tunnel, 1 to 10; WithDefaults makes 0 into 3.
	Tries int
	// Timeout is how long after the first try another may start; a try under way runs to its own connect
	// and response timeouts. WithDefaults makes 0 into 10s.
	Timeout time.Duration
}

// PoolSpec is one pool's whole configuration, as the config package fills it from YAML.
//
// Zero values are not defaults: Validate checks what is there, and WithDefaults fills what was left
// out, so that an explicit 0 in a config file is reported rather than silently replaced.
type PoolSpec struct {
	Name    string
	Balance Algorithm
	// Hash is used when Balance is hash.
	Hash HashSpec
	// Servers are the static servers; leave empty when DNS discovers them.
	Servers []ServerSpec
	// DNS, when set, discovers the servers instead of Servers.
	DNS     *DNSSpec
	Passive PassiveHealthSpec
	// Active, when set, runs health checks (Pool.Start starts them).
	Active *ActiveHealthSpec
	Retry  RetrySpec
}

// DefaultPassiveHealth is the recommended passive health setting: 3 failures within 10s mark a server
// down for 30s. It is not applied by WithDefaults, because Failures 0 means "off".
func DefaultPassiveHealth() PassiveHealthSpec {
	return PassiveHealthSpec{Failures: 3, Window: 10 * time.Second, DownFor: 30 * time.Second}
}

// WithDefaults returns a copy of s with every field left at its zero value, where zero means "not
// given", set to its default (each field's comment names it). Slices and pointers are copied, so the
// result shares nothing with s.
func (s PoolSpec) WithDefaults() PoolSpec {
	if s.Balance == "" {
		s.Balance = RoundRobin
	}
	if s.Hash.LoadFactor == 0 {
		s.Hash.LoadFactor = 1.25
	}
	s.Servers = append([]ServerSpec(nil), s.Servers...)
	for i := range s.Servers {
		if s.Servers[i].Weight == 0 {
			s.Servers[i].Weight = 1
		}
	}
	if s.DNS != nil {
		d := *s.DNS
		if d.Type == "" {
			d.Type = DNSA
		}
		if d.Interval == 0 {
			d.Interval = 30 * time.Second
		}
		s.DNS = &d
	}
	if s.Passive.Window == 0 {
		s.Passive.Window = 10 * time.Second
	}
	if s.Passive.DownFor == 0 {
		s.Passive.DownFor = 30 * time.Second
	}
	if s.Active != nil {
		a := *s.Active
		if a.Type == "" {
			a.Type = CheckTCP
		}
		if a.Type != CheckTCP && a.Path == "" {
			a.Path = "/"
		}
		if a.ExpectStatus == 0 {
			switch a.Type {
			case CheckHTTP:
				a.ExpectStatus = 200
			case CheckWebSocket:
				a.ExpectStatus = 101
			}
		}
		if a.Interval == 0 {
			a.Interval = 5 * time.Second
		}
		if a.Timeout == 0 {
			a.Timeout = min(2*time.Second, a.Interval)
		}
		if a.Rise == 0 {
			a.Rise = 2
		}
		if a.Fall == 0 {
			a.Fall = 3
		}
		s.Active = &a
	}
	if s.Retry.Tries == 0 {
		s.Retry.Tries = 3
	}
	if s.Retry.Timeout == 0 {
		s.Retry.Timeout = 10 * time.Second
	}
	return s
}

// FieldError is one problem in a PoolSpec: Field is the setting's path as it reads in a config file
// (servers[1].weight), so that the config package can prefix its own path to it.
type FieldError struct {
	Field   string
	Problem string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Problem }

// Validate reports every problem in s, each as a *FieldError naming the field, what was wrong and what
// is accepted, joined with errors.Join; nil when s is usable as it is.
func (s PoolSpec) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Problem: fmt.Sprintf(format, args...)})
	}

	if s.Name == "" {
		bad("name", "empty; give the pool a name")
	}
	if !slices.Contains(algorithms, s.Balance) {
		bad("balance", "%q is not an algorithm; accepted %s", s.Balance, joinAlgorithms())
	}
	if s.Balance == Hash {
		switch s.Hash.By {
		case HashClientIP, HashPath:
		case HashHeader, HashCookie:
			if s.Hash.Name == "" {
				bad("hash.name", "empty; give the %s name to hash, since hash.by is %s", s.Hash.By, s.Hash.By)
			}
		default:
			bad("hash.by", "%q is not a key; accepted client_ip, header, cookie, path", s.Hash.By)
		}
		if !(s.Hash.LoadFactor >= 1 && s.Hash.LoadFactor <= 10) {
			bad("hash.load_factor", "%g is out of range; accepted 1 to 10", s.Hash.LoadFactor)
		}
	}

	switch {
	case s.DNS != nil && len(s.Servers) > 0:
		bad("dns", "set together with servers; use one or the other")
	case s.DNS == nil && len(s.Servers) == 0:
		bad("servers", "empty; give at least one server, or dns to discover them")
	}
	seen := make(map[string]int, len(s.Servers))
	backups := 0
	for i, srv := range s.Servers {
		field := fmt.Sprintf("servers[%d]", i)
		if err := checkHostPort(srv.Address); err != nil {
			bad(field+".address", "%v", err)
		} else if j, dup := seen[srv.Address]; dup {
			bad(field+".address", "%q repeats servers[%d]; give each server once", srv.Address, j)
		} else {
			seen[srv.Address] = i
		}
		if srv.Weight < 1 || srv.Weight > MaxWeight {
			bad(field+".weight", "%d is out of range; accepted 1 to %d", srv.Weight, MaxWeight)
		}
		if srv.MaxTunnels < 0 || srv.MaxTunnels > MaxMaxTunnels {
			bad(field+".max_tunnels", "%d is out of range; accepted 0 (no cap) to %d", srv.MaxTunnels, MaxMaxTunnels)
		}
		if srv.Backup {
			backups++
		}
	}
	if len(s.Servers) > 0 && backups == len(s.Servers) {
		bad("servers", "all %d are backup; mark at least one as a primary (backup: false)", backups)
	}

	if d := s.DNS; d != nil {
		if d.Name == "" {
			bad("dns.name", "empty; give the name to resolve, e.g. chat.internal, or _ws._tcp.chat.internal for SRV")
		}
		switch d.Type {
		case DNSA, DNSAAAA:
			if d.Port < 1 || d.Port > 65535 {
				bad("dns.port", "%d is out of range; accepted 1 to 65535", d.Port)
			}
		case DNSSRV:
			if d.Port != 0 {
				bad("dns.port", "%d is set with type SRV, whose records carry their own ports; leave it 0", d.Port)
			}
		default:
			bad("dns.type", "%q is not a record type; accepted A, AAAA, SRV", d.Type)
		}
		if d.Interval < time.Second || d.Interval > 24*time.Hour {
			bad("dns.interval", "%v is out of range; accepted 1s to 24h", d.Interval)
		}
		if d.MaxTunnels < 0 || d.MaxTunnels > MaxMaxTunnels {
			bad("dns.max_tunnels", "%d is out of range; accepted 0 (no cap) to %d", d.MaxTunnels, MaxMaxTunnels)
		}
	}

	if p := s.Passive; p.Failures != 0 {
		if p.Failures < 0 || p.Failures > 100 {
			bad("passive.failures", "%d is out of range; accepted 0 (off) to 100", p.Failures)
		}
		if p.Window < time.Second || p.Window > time.Hour {
			bad("passive.window", "%v is out of range; accepted 1s to 1h", p.Window)
		}
		if p.DownFor < time.Second || p.DownFor > time.Hour {
			bad("passive.down_for", "%v is out of range; accepted 1s to 1h", p.DownFor)
		}
	}

	if a := s.Active; a != nil {
		switch a.Type {
		case CheckTCP:
			if a.Path != "" {
				bad("active.path", "set with type tcp, which sends no request; leave it empty")
			}
			if a.ExpectStatus != 0 {
				bad("active.expect_status", "set with type tcp, which reads no status; leave it 0")
			}
		case CheckHTTP, CheckWebSocket:
			if !strings.HasPrefix(a.Path, "/") {
				bad("active.path", "%q does not start with /; for example /healthz", a.Path)
			}
			if a.ExpectStatus < 100 || a.ExpectStatus > 599 {
				bad("active.expect_status", "%d is out of range; accepted 100 to 599", a.ExpectStatus)
			}
		default:
			bad("active.type", "%q is not a check type; accepted tcp, http, websocket", a.Type)
		}
		if a.Interval < 100*time.Millisecond || a.Interval > time.Hour {
			bad("active.interval", "%v is out of range; accepted 100ms to 1h", a.Interval)
		}
		if a.Timeout < 10*time.Millisecond || a.Timeout > max(a.Interval, 10*time.Millisecond) {
			bad("active.timeout", "%v is out of range; accepted 10ms to active.interval (%v)", a.Timeout, a.Interval)
		}
		if a.Rise < 1 || a.Rise > 100 {
			bad("active.rise", "%d is out of range; accepted 1 to 100", a.Rise)
		}
		if a.Fall < 1 || a.Fall > 100 {
			bad("active.fall", "%d is out of range; accepted 1 to 100", a.Fall)
		}
		if a.SlowStart < 0 || a.SlowStart > time.Hour {
			bad("active.slow_start", "%v is out of range; accepted 0 (off) to 1h", a.SlowStart)
		}
	}

	if s.Retry.Tries < 1 || s.Retry.Tries > MaxTries {
		bad("retry.tries", "%d is out of range; accepted 1 to %d", s.Retry.Tries, MaxTries)
	}
	if s.Retry.Timeout < 100*time.Millisecond || s.Retry.Timeout > 10*time.Minute {
		bad("retry.timeout", "%v is out of range; accepted 100ms to 10m", s.Retry.Timeout)
	}
	return errors.Join(errs...)
}

func joinAlgorithms() string {
	names := make([]string, len(algorithms))
	for i, a := range algorithms {
		names[i] = string(a)
	}
	return strings.Join(names, ", ")
}

// checkHostPort accepts HOST:PORT with a non-empty host and a port from 1 to 65535 (the same rule as
// the relay's --upstream flag).
// CheckAddress says what is wrong with a, when it is not HOST:PORT with a port from 1 to 65535, as a
// server's address must be.
func CheckAddress(a string) error { return checkHostPort(a) }

func checkHostPort(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q is not HOST:PORT; for example 10.0.0.1:9000 or [::1]:9000", a)
	}
	if host == "" {
		return fmt.Errorf("%q has an empty host; for example 10.0.0.1:9000", a)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("port %q in %q is out of range; accepted 1 to 65535", port, a)
	}
	return nil
}
