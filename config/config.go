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
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is one configuration file, checked, with its defaults filled in.
type Config struct {
	// Admin is the address of the admin listener (metrics, /debug/tunnels, the admin API); "" disables it.
	// Default 127.0.0.1:9090.
	Admin string
	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string
	// Datapath is the default of the listeners' datapaths: auto, sockmap, splice or copy. Default auto.
	Datapath string
	// KernelHeldLimit is, on sockmap, the most bytes the kernel holds per tunnel direction for a slow
	// reader before userspace takes the direction over. Default 4 MiB, accepted 64 KiB to 1 GiB.
	KernelHeldLimit int
	// TunnelLogInterval, when not 0, logs each tunnel that lives longer than it, at that interval.
	TunnelLogInterval time.Duration
	Timeouts          Timeouts
	// MaxHeaderBytes bounds a client's request line and headers. Default 16 KiB.
	MaxHeaderBytes int
	// Listeners, at least one, in the file's order.
	Listeners []Listener
	// Pools, at least one, in the file's order (a YAML mapping has an order; Go's maps do not keep it).
	Pools []Pool
	// Warnings are findings that do not stop the relay but are likely mistakes, such as a pool no route
	// uses, formatted as errors are (FILE:LINE: PATH: MSG) and sorted by line.
	Warnings []string
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
}

// Listener is a client-facing address and the routes that pick a pool for each request on it.
type Listener struct {
	// Name is unique; default "listener0", "listener1"... by position.
	Name string
	// Address is HOST:PORT; an empty host listens on every address, port 0 on any free port.
	Address string
	// Datapath is auto, sockmap, splice or copy; default the top-level Datapath.
	Datapath string
	// Routes, at least one, tried in order: the first that matches wins (see Match).
	Routes []Route
}

// Route sends the requests it matches to a pool.
type Route struct {
	// Host is "" (any host), an exact host, or "*.example.com"; lower-cased, without a trailing dot.
	Host string
	// PathPrefix starts with "/"; default "/".
	PathPrefix string
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
	// Timeout bounds all tries of one request together. Default 10s, accepted 100ms to 10m.
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

func indentation(line []byte) []byte {
	return line[:len(line)-len(bytes.TrimLeft(line, " \t"))]
}
