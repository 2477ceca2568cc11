// Package config reads sockrelay's configuration file: listeners, their routes, and the pools of
// upstream servers the routes lead to.
//
// Parsing is strict, because a relay that starts with a key it silently ignored (a misspelt timeout, a
// health check indented one level too far) fails later and far from the cause. An unknown key, a value of
// the wrong type, a key given twice, or a value out of range is an error naming the file, the line and the
// key path, and saying what is accepted:
//
//	sockrelay.yaml:12: pools.chat.servers[1].weight: 0 is out of range; accepted 1 to 1000
//
// Every problem in the file is reported at once (see ErrorList). A parsed Config has every default filled
// in, so that its users never apply defaults themselves, and never disagree about them.
//
// Paths in the file (TLS certificates, keys and CA files) are absolute, or relative to the directory of
// the configuration file, not to the relay's working directory; a parsed Config holds them joined to that
// directory. Whether the files exist is checked where they are loaded, not here.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is one configuration file, checked, with its defaults filled in.
type Config struct {
	// Admin is the address of the admin listener (metrics, /debug/tunnels, the admin API): HOST:PORT, on
	// loopback unless AdminAccess.AllowRemote, or unix:/PATH; "" disables it. Default 127.0.0.1:9180 (not
	// 9090, which is Prometheus's).
	Admin string
	// AdminAccess says who may use the admin listener. Default: no token, loopback only, no host names.
	AdminAccess AdminAccess
	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string
	// LogFormat is text (key=value) or json, one object per line. Default text.
	LogFormat string
	// Datapath is the default of the listeners' datapaths: auto, sockmap, splice or copy. Default auto.
	Datapath string
	// KernelHeldLimit is, on sockmap, the most bytes the kernel holds per tunnel direction for a slow
	// reader before userspace takes the direction over. Default 4 MiB, accepted 64 KiB to 1 GiB.
	KernelHeldLimit int
	// EventLoops is how many event loops (each an OS thread with its own epoll) carry the copy and splice
	// datapaths' plain tunnels; 0 (default) is one per two CPUs. Accepted 0 to 1024; a restart applies it.
	EventLoops int
	// Auto is the per-tunnel policy of datapath auto where the kernel datapath loads (docs/datapath.md,
	// "auto per tunnel"). Default: measured at start, every threshold the measured policy's.
	Auto Auto
	// TunnelLogInterval, when not 0, logs each tunnel that lives longer than it, at that interval.
	TunnelLogInterval time.Duration
	Timeouts          Timeouts
	// MaxHeaderBytes bounds a client's request line and headers. Default 16 KiB.
	MaxHeaderBytes int
	// Limits apply to the whole relay; each listener's Limits apply in addition. Default none.
	Limits Limits
	// Listeners, at least one, in the file's order.
	Listeners []Listener
	// Pools, at least one, in the file's order (a YAML mapping has an order; Go's maps do not keep it).
	Pools []Pool
	// Warnings are findings that do not stop the relay but are likely mistakes, such as a pool no route
	// uses, formatted as errors are (FILE:LINE: PATH: MSG) and sorted by line.
	Warnings []string

	file  string         // the file's name as errors show it
	lines map[string]int // key path (listeners[0].tls) to the line it was given at
}

// ErrorAt is a problem with the value at path, found after parsing (a certificate that does not load, a
// host that does not resolve), as an *Error that names the file and the line the key was given at, or
// the line of the nearest enclosing key recorded.
func (c *Config) ErrorAt(path string, err error) *Error {
	line := 0
	for p := path; p != "" && line == 0; p = parent(p) {
		line = c.lines[p]
	}
	return &Error{File: c.file, Line: line, Path: path, Msg: err.Error()}
}

// parent is the path that encloses path: pools.echo.servers for pools.echo.servers[0], pools.echo for
// pools.echo.servers; "" at the top.
func parent(path string) string {
	if i := strings.LastIndexAny(path, ".["); i >= 0 {
		return path[:i]
	}
	return ""
}

// Auto are the settings of auto's per-tunnel policy. A threshold left 0 is the policy's own.
type Auto struct {
	// Start is measured (default: measure what a message costs on each engine at start, and choose),
	// copy (tunnels start and stay on the event loop) or sockmap (they start in the kernel, the first
	// version's policy).
	Start string
	// ChattySegments: a kernel tunnel carrying at least this many small segments a second moves to the
	// loop. 1 to 1,000,000.
	ChattySegments float64
	// BusySegments: a loop tunnel reading at least this many segments a second moves to the kernel
	// (measured policy only, where a message measured cheaper in the kernel; or to force it). 1 to 1,000,000.
	BusySegments float64
	// Quiet: a tunnel with no byte either way for this long moves to the engine idle tunnels go to. 1s to 1h.
	Quiet time.Duration
	// MinDwell and MaxDwell bound how long a tunnel stays on an engine before it moves again (the dwell
	// doubles on quick returns up to MaxDwell). 100ms to 1h; MaxDwell not below MinDwell, nor, when only one
	// is set, beyond the other's default in the policies Start may put in force (auto.Settings.Check).
	MinDwell, MaxDwell time.Duration
}

// Timeouts are the relay's deadlines. Each is more than 0.
type Timeouts struct {
	// ClientHeader bounds how long a client may take to send its request headers (slowloris). Default 10s.
	ClientHeader time.Duration
	// Connect bounds connecting to an upstream server. Default 5s.
	Connect time.Duration
	// UpstreamResponse bounds how long a server may take to answer a handshake or request. Default 15s.
	UpstreamResponse time.Duration
	// Shutdown is how long live tunnels may drain on SIGTERM before they are closed. Default 30s.
	Shutdown time.Duration
	// HTTPIdle cuts a plain (not upgraded) request through which no byte moved for this long, either way,
	// on either connection. Default 60s (nginx's client_body_timeout and send_timeout).
	HTTPIdle time.Duration
	// TunnelIdle, when not 0, closes a tunnel through which no byte has passed in either direction for
	// this long (HAProxy's timeout tunnel). Default 0 (never); otherwise at least 1s.
	TunnelIdle time.Duration
	// TunnelLifetime, when not 0, closes a tunnel this long after it was opened, however busy. Default 0
	// (no limit); otherwise at least 1s.
	TunnelLifetime time.Duration
	// HalfClosed, when not 0, closes a tunnel of an http listener once one side has sent its FIN and
	// nothing has moved either way for this long (HAProxy's client-fin and server-fin). Default 5s (a
	// WebSocket has no meaningful half-close); 0 never; otherwise at least 1s.
	HalfClosed time.Duration
	// TCPHalfClosed is HalfClosed for tcp listeners' tunnels. Default 60s, since TCP protocols do
	// half-close and then answer; 0 never; otherwise at least 1s.
	TCPHalfClosed time.Duration
}

// Limits bound what clients may open, on the whole relay (Config.Limits) or on one listener
// (Listener.Limits); both apply. Their zero value limits nothing. Counts are at most 10,000,000.
type Limits struct {
	// MaxTunnels caps live tunnels. 0 (default) is unlimited.
	MaxTunnels int
	// MaxTunnelsPerIP caps the live tunnels of one client IP address. 0 (default) is unlimited.
	MaxTunnelsPerIP int
	// HandshakesPerIP limits how fast one client IP address may start handshakes. Off by default.
	HandshakesPerIP RateLimit
	// MaxConcurrentHandshakes caps the handshakes in progress at once, all clients together. 0 (default)
	// is unlimited.
	//
	// A handshake is a client's HTTP upgrade on an http listener; on a tcp listener it is the opening of
	// a connection (up to its ClientHello with TLS passthrough).
	MaxConcurrentHandshakes int
}

// RateLimit is a token bucket: Rate events a second on average, up to Burst at once.
type RateLimit struct {
	// Rate is in events a second, fractions allowed; 0 (default) turns the limit off. At most 1,000,000.
	Rate float64
	// Burst is how many events may come at once. Default max(1, ceil(Rate)), accepted 1 to 10,000,000;
	// 0 when Rate is 0.
	Burst int
}

// Listener is a client-facing address and the routes that pick a pool for each request on it.
type Listener struct {
	// Name is unique; default "listener0", "listener1"... by position.
	Name string
	// Address is HOST:PORT; an empty host listens on every address, port 0 on any free port.
	Address string
	// Type is http (default: WebSocket and other HTTP upgrades, routed by host and path) or tcp (any TCP
	// stream, relayed without reading it; routed by TLS SNI with TLSPassthrough, else to its one route).
	Type string
	// Datapath is auto, sockmap, splice or copy; default the top-level Datapath.
	Datapath string
	// ProxyProtocol expects a PROXY protocol header, v1 or v2, at the start of every connection, as a
	// layer 4 balancer in front sends it, and takes the client's address from it. Default false.
	ProxyProtocol bool
	// TrustedProxies are the peers whose X-Forwarded-For and X-Real-IP headers are believed; an IP
	// address given alone is a /32 or /128. http listeners only; nil (default) believes no one.
	TrustedProxies []netip.Prefix
	// TLS, when not nil, terminates TLS on the listener. http listeners only.
	TLS *ListenerTLS
	// TLSPassthrough routes a tcp listener's connections by the server name (SNI) of the client's TLS
	// ClientHello, and relays them without terminating TLS. tcp listeners only; default false.
	TLSPassthrough bool
	// Limits apply to this listener, in addition to Config.Limits. Default none.
	Limits Limits
	// Routes, at least one, tried in order: the first that matches wins (see Match). A tcp listener
	// without TLSPassthrough has exactly one, without host.
	Routes []Route
}

// Listener types.
const (
	ListenerHTTP = "http"
	ListenerTCP  = "tcp"
)

// ListenerTLS is how a listener terminates TLS.
type ListenerTLS struct {
	// Certificates, at least one; the one offered to a client is picked by its SNI, as crypto/tls does.
	Certificates []Certificate
	// MinVersion is the lowest TLS version accepted: "1.2" (default) or "1.3".
	MinVersion string
	// ReloadInterval, when not 0, is how often the certificate and key files are checked for changes,
	// and reloaded when changed. Default 0 (never); otherwise at least 1s.
	ReloadInterval time.Duration
}

// TLS versions of ListenerTLS.MinVersion.
const (
	TLS12 = "1.2"
	TLS13 = "1.3"
)

// Certificate is a certificate chain and its private key, each a PEM file. The paths are absolute, or
// relative to the directory of the configuration file, to which Parse has joined them; they are not
// checked to exist here, but where they are loaded, which names the file that fails.
type Certificate struct {
	Cert, Key string
}

// Route sends the requests it matches to a pool.
type Route struct {
	// Host is "" (any host), an exact host, or "*.example.com"; lower-cased, without a trailing dot. On a
	// tcp listener it is given only with TLSPassthrough, and matched against the TLS SNI (never an IP).
	Host string
	// PathPrefix starts with "/"; default "/". Always "/" on a tcp listener.
	PathPrefix string
	// Origins, when not empty, are the only Origin header values whose requests the route accepts, as
	// scheme://host[:port], lower-cased and without the scheme's default port, as browsers send them.
	// Empty (nil, the default) accepts any Origin and none. http listeners only.
	Origins []string
	// Pool is the name of a pool in Config.Pools.
	Pool string
}

// Pool is a set of upstream servers and how requests are spread over them and kept off failing ones.
type Pool struct {
	Name string
	// Balance is round_robin (default), least_tunnels, hash or random_two.
	Balance string
	// Hash is filled in only when Balance is hash; it is the zero value otherwise.
	Hash HashSpec
	// CloseTunnelsOnRemoval, on reload, closes the tunnels of servers removed from the pool; otherwise
	// they live on until they end by themselves.
	CloseTunnelsOnRemoval bool
	Retry                 RetrySpec
	PassiveHealth         PassiveHealth
	// HealthCheck is nil when the pool has no active checks.
	HealthCheck *HealthCheck
	// Servers are the pool's static servers, in the file's order; empty when DNS is set.
	Servers []Server
	// DNS is nil unless the servers are found by DNS; then Servers is empty.
	DNS *DNS
	// TLS is how the relay speaks TLS to the servers (wss); off unless the file gives tls.
	TLS PoolTLS
	// ProxyProtocol is the PROXY protocol header sent to the servers at the start of each connection,
	// to pass on the client's address: off (default), v1 or v2.
	ProxyProtocol string
}

// ProxyProtocol versions of Pool.ProxyProtocol.
const (
	ProxyProtocolOff = "off"
	ProxyProtocolV1  = "v1"
	ProxyProtocolV2  = "v2"
)

// PoolTLS is how the relay connects to a pool's servers over TLS. Paths are absolute, or relative to the
// directory of the configuration file, to which Parse has joined them.
type PoolTLS struct {
	// Enabled connects to the servers over TLS. Default true when the file gives tls, false otherwise.
	Enabled bool
	// ServerName is the name sent as SNI and verified in the servers' certificates; "" (default) is each
	// server's own host (see ServerNameFor).
	ServerName string
	// CAFile is a PEM file of the certificates that the servers' are verified against; "" (default) is
	// the system's roots.
	CAFile string
	// Cert and Key are the relay's client certificate and key, PEM files, both or neither; "" (default)
	// sends none.
	Cert, Key string
	// InsecureSkipVerify does not verify the servers' certificates at all. Default false.
	InsecureSkipVerify bool
}

// ServerNameFor returns the name to send as SNI and verify the certificate of the server at address
// (HOST:PORT) against: ServerName when set, else the server's host.
func (t PoolTLS) ServerNameFor(address string) string {
	if t.ServerName != "" {
		return t.ServerName
	}
	if host, _, err := net.SplitHostPort(address); err == nil {
		return host
	}
	return address
}

// Balance methods.
const (
	BalanceRoundRobin   = "round_robin"
	BalanceLeastTunnels = "least_tunnels"
	BalanceHash         = "hash"
	BalanceRandomTwo    = "random_two"
)

// HashSpec says what balance: hash hashes, so that the same client (or user, or path) keeps reaching
// the same server while that server is up.
type HashSpec struct {
	// By is client_ip (default), header, cookie or path.
	By string
	// Name is the header or cookie hashed; set only when By is header or cookie.
	Name string
	// LoadFactor bounds a server's tunnels to this many times the pool's average (consistent hashing
	// with bounded loads), so that one hot key cannot pile every tunnel on one server. Default 1.25,
	// accepted 1 to 10.
	LoadFactor float64
}

// What HashSpec.By accepts.
const (
	HashByClientIP = "client_ip"
	HashByHeader   = "header"
	HashByCookie   = "cookie"
	HashByPath     = "path"
)

// RetrySpec says how a handshake that fails to reach a server is tried on others.
type RetrySpec struct {
	// Tries counts the first attempt: 1 never retries. Default 3, accepted 1 to 10.
	Tries int
	// Timeout is how long after the first try another may start (a try under way keeps its connect and
	// upstream timeouts). Default 10s, accepted 100ms to 10m.
	Timeout time.Duration
}

// PassiveHealth takes a server out of the pool after failures seen on real traffic.
type PassiveHealth struct {
	// Failures within Window mark a server down; 0 disables passive health. Default 3, at most 100.
	Failures int
	// Window is the period failures are counted over. Default 10s, accepted 1s to 1h.
	Window time.Duration
	// DownFor is how long a server marked down gets no new tunnels. Default 30s, accepted 1s to 1h.
	DownFor time.Duration
}

// HealthCheck is an active check that the relay runs against each server of a pool.
type HealthCheck struct {
	// Type is tcp (connect only; default), http or websocket (a full upgrade handshake).
	Type string
	// Path is requested by http and websocket checks; default "/". "" for tcp.
	Path string
	// ExpectStatus is the status an http or websocket check wants: default 200 for http, 101 for
	// websocket; 0 for tcp.
	ExpectStatus int
	// Interval between checks of one server. Default 5s, accepted 100ms to 1h.
	Interval time.Duration
	// Timeout of one check: at least 10ms, at most Interval. Default 2s, or Interval when shorter.
	Timeout time.Duration
	// Rise successes in a row bring a down server up; Fall failures in a row take an up server down.
	// Defaults 2 and 3, accepted 1 to 100.
	Rise, Fall int
	// SlowStart, when not 0, ramps a server that came up from no share of new tunnels to its full weight
	// over this long, so that it is not flooded the moment it passes a check. At most 1h.
	SlowStart time.Duration
}

// Health check types.
const (
	CheckTCP       = "tcp"
	CheckHTTP      = "http"
	CheckWebSocket = "websocket"
)

// Server is one upstream server of a pool.
type Server struct {
	// Address is HOST:PORT.
	Address string
	// Weight is the server's share of new tunnels relative to the others. Default 1, accepted 1 to 1000.
	Weight int
	// MaxTunnels caps the server's live tunnels; 0 (default) is unlimited. At most 10,000,000.
	MaxTunnels int
	// Backup servers get tunnels only while no other server of the pool is up. A pool needs at least one
	// server that is not a backup.
	Backup bool
	// Drain keeps the server's live tunnels but gives it no new ones.
	Drain bool
}

// DNS finds a pool's servers by a DNS name, re-resolved at Interval.
type DNS struct {
	Name string
	// Type is A (default), AAAA or SRV.
	Type string
	// Port is the servers' port for A and AAAA; 0 for SRV, whose records carry the ports.
	Port int
	// Interval between resolutions. Default 10s, accepted 1s to 24h.
	Interval time.Duration
	// MaxTunnels is every discovered server's MaxTunnels; 0 (default) is unlimited.
	MaxTunnels int
}

// Pool returns the pool named name, or nil.
func (c *Config) Pool(name string) *Pool {
	for i := range c.Pools {
		if c.Pools[i].Name == name {
			return &c.Pools[i]
		}
	}
	return nil
}

// Load reads and parses the configuration file at path; see Parse.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read configuration: %w", err)
	}
	return Parse(path, data)
}

// Parse parses and checks a configuration file's contents; name is the file's name as errors and
// warnings should show it. The error, when not nil, is an ErrorList with every problem found.
func Parse(name string, data []byte) (*Config, error) {
	d := &decoder{file: name}
	root := d.document(data)
	if root == nil {
		return nil, sortErrors(d.errs)
	}
	if !d.checkAliases(root) {
		return nil, sortErrors(d.errs)
	}
	c := d.config(root)
	c.file, c.lines = name, d.lines
	if len(d.errs) > 0 {
		return nil, sortErrors(d.errs)
	}
	for _, w := range sortErrors(d.warnings) {
		c.Warnings = append(c.Warnings, w.Error())
	}
	return c, nil
}

// yamlErrorLine matches the line number that the YAML parser puts at the start of its messages.
var yamlErrorLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// document parses data as one YAML document and returns its root, or nil having said why not.
func (d *decoder) document(data []byte) *yaml.Node {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	err := dec.Decode(&doc)
	if err == nil {
		var next yaml.Node
		switch err = dec.Decode(&next); {
		case err == nil:
			d.errorf(&next, "", "a second YAML document; accepted: one document per file")
			return nil
		case errors.Is(err, io.EOF):
			err = nil
		}
	}
	if errors.Is(err, io.EOF) || (err == nil && isNull(resolve(doc.Content[0]))) {
		d.errorf(nil, "", "empty file; accepted: a mapping with at least listeners and pools")
		return nil
	}
	if err != nil {
		e := &Error{File: d.file, Msg: "invalid YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")}
		if m := yamlErrorLine.FindStringSubmatch(err.Error()); m != nil {
			e.Line, _ = strconv.Atoi(m[1])
			e.Msg = "invalid YAML: " + m[2]
			if line := problemLine(data, e.Line, err.Error()); line != e.Line {
				e.Msg += fmt.Sprintf(" (in the block that starts at line %d)", e.Line)
				e.Line = line
			}
			// The parser's word for a tab in the indentation is "found character that cannot start any
			// token", which does not say what to change.
			lines := bytes.Split(data, []byte("\n"))
			if e.Line <= len(lines) && bytes.ContainsRune(indentation(lines[e.Line-1]), '\t') {
				e.Msg += "; indent with spaces, not tabs"
			}
		}
		d.errs = append(d.errs, e)
		return nil
	}
	return doc.Content[0]
}

// maxProblemScan bounds how many lines past its block problemLine looks for a syntax error.
const maxProblemScan = 2000

// problemLine finds the line a YAML syntax error is on. The parser's message gives the line where the
// enclosing block starts (blockLine), which can be far above the mistake; the mistake is on the first line
// at which the file, cut after that line, fails to parse with the same message. blockLine when none does
// within maxProblemScan lines (each try parses the file again).
func problemLine(data []byte, blockLine int, msg string) int {
	lines := bytes.SplitAfter(data, []byte("\n"))
	for n := max(blockLine, 1); n <= min(len(lines), blockLine+maxProblemScan); n++ {
		var doc yaml.Node
		err := yaml.Unmarshal(bytes.Join(lines[:n], nil), &doc)
		if err == nil {
			continue
		}
		if yamlErrorLine.ReplaceAllString(err.Error(), "$2") == yamlErrorLine.ReplaceAllString(msg, "$2") {
			return n
		}
	}
	return blockLine
}

func indentation(line []byte) []byte {
	return line[:len(line)-len(bytes.TrimLeft(line, " \t"))]
}
