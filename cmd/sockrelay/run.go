package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/sockrelay/sockrelay/internal/settings"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/handover"
	"github.com/sockrelay/sockrelay/relay"
	"github.com/sockrelay/sockrelay/tlsconf"
)

// runOptions are the flags of `sockrelay run`.
type runOptions struct {
	configPath          string
	set                 map[string]bool // the flags given on the command line, which override the file
	listen              string
	upstreams           []string
	datapath            string
	admin               string
	adminTokenFile      string
	adminAllowRemote    bool
	adminHosts          []string
	upgradeBinary       string
	drainTimeout        time.Duration
	clientHeaderTimeout time.Duration
	connectTimeout      time.Duration
	upstreamTimeout     time.Duration
	httpIdleTimeout     time.Duration
	maxHeaderBytes      int
	kernelHeldLimit     int
	eventLoops          int
	tunnelLogInterval   time.Duration
	tunnelIdleTimeout   time.Duration
	tunnelLifetime      time.Duration
	halfClosedTimeout   time.Duration
	tcpHalfClosed       time.Duration
	logLevel            string
	logFormat           string

	file       configFile // what --config FILE holds; zero without --config
	adminToken string     // read from adminTokenFile by loadAdminToken
}

// configFile is a loaded configuration file.
type configFile struct {
	cfg *config.Config
}

func (f configFile) warnings() []string {
	if f.cfg == nil {
		return nil
	}
	return f.cfg.Warnings
}

// listFlag collects a repeatable flag.
type listFlag struct{ values *[]string }

func (f listFlag) String() string {
	if f.values == nil {
		return ""
	}
	return strings.Join(*f.values, ",")
}

func (f listFlag) Set(v string) error {
	*f.values = append(*f.values, v)
	return nil
}

func parseRunFlags(args []string, stderr io.Writer) (*runOptions, error) {
	o := &runOptions{}
	fs := flag.NewFlagSet("sockrelay run", flag.ContinueOnError)
	fs.StringVar(&o.configPath, "config", "", "configuration `FILE` (YAML): listeners, routes, pools; other flags override its settings")
	fs.StringVar(&o.listen, "listen", "", "client-facing `ADDR` to listen on, e.g. 127.0.0.1:8080 or :80 (required without --config)")
	fs.Var(listFlag{&o.upstreams}, "upstream", "upstream `HOST:PORT`; repeat for several, chosen round-robin (at least one without --config)")
	fs.StringVar(&o.datapath, "datapath", "auto", "how tunnel bytes move: auto, sockmap, splice or copy")
	fs.StringVar(&o.admin, "admin", "", "`ADDR` of the admin listener (/metrics, /healthz, /debug/tunnels, the admin API): HOST:PORT on loopback, e.g. 127.0.0.1:9180, or unix:/PATH (off when empty)")
	fs.StringVar(&o.adminTokenFile, "admin-token-file", "", "`FILE` holding the token that admin requests which change something must send as Authorization: Bearer TOKEN")
	fs.BoolVar(&o.adminAllowRemote, "admin-allow-remote", false, "let --admin be an address other hosts can reach (logged as a warning); changes still need the token")
	fs.Var(listFlag{&o.adminHosts}, "admin-host", "host `NAME`, besides IP addresses and localhost, that admin requests may give as Host; repeat for several")
	fs.StringVar(&o.upgradeBinary, "upgrade-binary", "", "the only executable an upgrade starts, an absolute `PATH` (default: this relay's own, read again from disk at each upgrade)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", settings.DefaultShutdownTimeout, "on SIGINT/SIGTERM, how long live tunnels may run before they are closed")
	fs.DurationVar(&o.clientHeaderTimeout, "client-header-timeout", relay.DefaultClientHeaderTimeout, "how long a client may take to send its request headers")
	fs.DurationVar(&o.connectTimeout, "connect-timeout", relay.DefaultConnectTimeout, "how long connecting to an upstream may take")
	fs.DurationVar(&o.upstreamTimeout, "upstream-timeout", relay.DefaultUpstreamResponseTimeout, "how long an upstream may take to answer a handshake or request")
	fs.DurationVar(&o.httpIdleTimeout, "http-idle-timeout", relay.DefaultHTTPIdleTimeout, "cut a plain (not upgraded) request when no byte of it moved for this long")
	fs.IntVar(&o.maxHeaderBytes, "max-header-bytes", relay.DefaultMaxHeaderBytes, "largest request line and headers a client may send, in bytes")
	fs.IntVar(&o.kernelHeldLimit, "kernel-held-limit", relay.DefaultKernelHeldLimit, "sockmap: most `BYTES` the kernel may hold per tunnel direction for a slow reader before userspace takes over the direction")
	fs.IntVar(&o.eventLoops, "event-loops", 0, "`N` event loops (OS threads) carry copy and splice tunnels (0: one per two CPUs; at most 1024)")
	fs.DurationVar(&o.tunnelLogInterval, "tunnel-log-interval", 0, "log each tunnel that lives longer than this again at this interval, with its bytes so far (0: off; else at least 1s)")
	fs.DurationVar(&o.tunnelIdleTimeout, "tunnel-idle-timeout", 0, "close a tunnel with no byte either way for this long, FIN to both sides (0: never; else at least 1s)")
	fs.DurationVar(&o.tunnelLifetime, "tunnel-lifetime", 0, "reset tunnels that have lived this long (0: no limit; else at least 1s)")
	fs.DurationVar(&o.halfClosedTimeout, "tunnel-half-closed-timeout", relay.DefaultHalfClosedTimeout, "close a WebSocket tunnel once one side has sent its FIN and nothing has moved for this long (0: never; else at least 1s)")
	fs.DurationVar(&o.tcpHalfClosed, "tcp-half-closed-timeout", relay.DefaultTCPHalfClosedTimeout, "the same for tcp listeners' tunnels (0: never; else at least 1s)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "text", "text or json")
	if err := parseFlags(fs, args, stderr); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: every setting is a flag, e.g. --upstream %s", fs.Arg(0), fs.Arg(0))
	}
	o.set = map[string]bool{}
	fs.Visit(func(f *flag.Flag) { o.set[f.Name] = true })
	if o.configPath != "" {
		// The file's listeners and pools say where clients come in and where tunnels go; a flag that
		// replaced them would leave routes pointing nowhere.
		for _, f := range []string{"listen", "upstream"} {
			if o.set[f] {
				return nil, fmt.Errorf("--%s cannot be combined with --config: the file's listeners and pools say where clients come in and where tunnels go", f)
			}
		}
	} else if o.listen == "" {
		return nil, errors.New("--listen is required: the address clients connect to, e.g. --listen 127.0.0.1:8080 (or give --config FILE)")
	}
	// Checked here, not left to net.Listen, so that a malformed address is a usage error (exit 2) that says
	// what is accepted, found before the kernel datapath is loaded.
	for _, a := range []struct{ name, addr, example string }{
		{"--listen", o.listen, "127.0.0.1:8080, or :8080 for every address"},
		{"--admin", o.admin, "127.0.0.1:9180, or unix:/run/sockrelay/admin.sock"},
	} {
		if path, unix := config.AdminSocket(a.addr); a.name == "--admin" && unix {
			if !filepath.IsAbs(path) {
				return nil, fmt.Errorf("--admin: %q: a Unix socket's path must be absolute, e.g. unix:/run/sockrelay/admin.sock", a.addr)
			}
			continue
		}
		if a.addr == "" {
			continue
		}
		_, port, err := net.SplitHostPort(a.addr)
		if err == nil {
			_, err = net.LookupPort("tcp", port)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %q is not HOST:PORT (%v); e.g. %s", a.name, a.addr, err, a.example)
		}
	}
	if o.upgradeBinary != "" && !filepath.IsAbs(o.upgradeBinary) {
		return nil, fmt.Errorf("--upgrade-binary: %q is not an absolute path, e.g. /usr/bin/sockrelay", o.upgradeBinary)
	}
	if o.configPath == "" {
		if len(o.upstreams) == 0 {
			return nil, errors.New("--upstream is required: at least one HOST:PORT, e.g. --upstream 127.0.0.1:9000 (or give --config FILE)")
		}
		if _, err := relay.NewSinglePoolRouter(o.upstreams); err != nil {
			return nil, fmt.Errorf("--upstream: %w", err)
		}
	}
	if _, err := relay.ParseDatapath(o.datapath); err != nil {
		return nil, fmt.Errorf("--datapath: %w", err)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
		r    settings.Duration
	}{
		{"--drain-timeout", o.drainTimeout, settings.Timeout},
		{"--client-header-timeout", o.clientHeaderTimeout, settings.Timeout},
		{"--connect-timeout", o.connectTimeout, settings.Timeout},
		{"--upstream-timeout", o.upstreamTimeout, settings.Timeout},
		{"--http-idle-timeout", o.httpIdleTimeout, settings.Timeout},
		{"--tunnel-log-interval", o.tunnelLogInterval, settings.TunnelTimeout},
		{"--tunnel-idle-timeout", o.tunnelIdleTimeout, settings.TunnelTimeout},
		{"--tunnel-lifetime", o.tunnelLifetime, settings.TunnelTimeout},
		{"--tunnel-half-closed-timeout", o.halfClosedTimeout, settings.TunnelTimeout},
		{"--tcp-half-closed-timeout", o.tcpHalfClosed, settings.TunnelTimeout},
	} {
		if err := d.r.Check(d.v); err != nil {
			return nil, fmt.Errorf("%s: %w", d.name, err)
		}
	}
	if err := settings.MaxHeaderBytes.Check(int64(o.maxHeaderBytes)); err != nil {
		return nil, fmt.Errorf("--max-header-bytes: %w bytes", err)
	}
	if err := settings.KernelHeldLimit.Check(int64(o.kernelHeldLimit)); err != nil {
		return nil, fmt.Errorf("--kernel-held-limit: %w bytes", err)
	}
	if err := settings.EventLoops.Check(int64(o.eventLoops)); err != nil {
		return nil, fmt.Errorf("--event-loops: %w", err)
	}
	if _, err := newLogger(io.Discard, o.logLevel, o.logFormat); err != nil {
		return nil, err
	}
	return o, nil
}

// loadConfig reads --config, when given, into o: the file's settings apply except where a flag was given.
func (o *runOptions) loadConfig() error {
	if o.configPath == "" {
		return nil
	}
	cfg, err := config.Load(o.configPath)
	if err != nil {
		return err
	}
	if err := checkRunnable(cfg); err != nil {
		return fmt.Errorf("%s: %w", o.configPath, err)
	}
	o.file = configFile{cfg: cfg}
	o.applyFile(cfg)
	return nil
}

// checkAdmin checks the admin settings that flags and the file give together, and reads the token.
func (o *runOptions) checkAdmin() error {
	if err := config.CheckAdminAddress(o.admin, o.adminAllowRemote); err != nil {
		return fmt.Errorf("--admin: %w", err)
	}
	for i, h := range o.adminHosts {
		name, err := config.AdminHost(h)
		if err != nil {
			return fmt.Errorf("--admin-host: %w", err)
		}
		o.adminHosts[i] = name
	}
	if o.adminTokenFile == "" {
		return nil
	}
	token, err := readAdminToken(o.adminTokenFile)
	if err != nil {
		return fmt.Errorf("--admin-token-file: %w", err)
	}
	o.adminToken = token
	return nil
}

// minAdminToken is the shortest admin token accepted: shorter ones can be guessed.
const minAdminToken = 16

// readAdminToken reads the admin token from path: the file's text, without surrounding white space.
func readAdminToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read the admin token: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if len(token) < minAdminToken || strings.ContainsAny(token, " \t\r\n") {
		return "", fmt.Errorf("%s: not a token (%d characters); accepted: one word of at least %d characters, e.g. made by head -c 32 /dev/urandom | base64 > %s",
			path, len(token), minAdminToken, path)
	}
	return token, nil
}

// applyFile sets o's settings from cfg, except those given as flags, which override the file.
func (o *runOptions) applyFile(cfg *config.Config) {
	set := func(flag string, apply func()) {
		if !o.set[flag] {
			apply()
		}
	}
	set("admin", func() { o.admin = cfg.Admin })
	set("admin-token-file", func() { o.adminTokenFile = cfg.AdminAccess.TokenFile })
	set("admin-allow-remote", func() { o.adminAllowRemote = cfg.AdminAccess.AllowRemote })
	set("admin-host", func() { o.adminHosts = cfg.AdminAccess.Hosts })
	set("upgrade-binary", func() { o.upgradeBinary = cfg.AdminAccess.UpgradeBinary })
	set("datapath", func() { o.datapath = cfg.Datapath })
	set("log-level", func() { o.logLevel = cfg.LogLevel })
	set("log-format", func() { o.logFormat = cfg.LogFormat })
	set("drain-timeout", func() { o.drainTimeout = cfg.Timeouts.Shutdown })
	set("client-header-timeout", func() { o.clientHeaderTimeout = cfg.Timeouts.ClientHeader })
	set("connect-timeout", func() { o.connectTimeout = cfg.Timeouts.Connect })
	set("upstream-timeout", func() { o.upstreamTimeout = cfg.Timeouts.UpstreamResponse })
	set("http-idle-timeout", func() { o.httpIdleTimeout = cfg.Timeouts.HTTPIdle })
	set("max-header-bytes", func() { o.maxHeaderBytes = cfg.MaxHeaderBytes })
	set("kernel-held-limit", func() { o.kernelHeldLimit = cfg.KernelHeldLimit })
	set("event-loops", func() { o.eventLoops = cfg.EventLoops })
	set("tunnel-log-interval", func() { o.tunnelLogInterval = cfg.TunnelLogInterval })
	set("tunnel-idle-timeout", func() { o.tunnelIdleTimeout = cfg.Timeouts.TunnelIdle })
	set("tunnel-lifetime", func() { o.tunnelLifetime = cfg.Timeouts.TunnelLifetime })
	set("tunnel-half-closed-timeout", func() { o.halfClosedTimeout = cfg.Timeouts.HalfClosed })
	set("tcp-half-closed-timeout", func() { o.tcpHalfClosed = cfg.Timeouts.TCPHalfClosed })
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		opts.ReplaceAttr = durationWithUnit
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format: %q is not one of text, json", format)
	}
}

// durationWithUnit writes a time.Duration in a JSON log as text with its unit ("30s"), not as slog's
// bare count of nanoseconds; the relay's own durations are logged with the unit in the key (duration_ms).
func durationWithUnit(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.StringValue(a.Value.Duration().String())
	}
	return a
}

// readyFunc, when not nil, is told the addresses the relay listens on once it serves (the first
// listener's, and the admin listener's or nil); tests use it.
type readyFunc func(listen, admin net.Addr)

// runCommand runs the relay until ctx is done, then drains it. It returns the exit code.
func runCommand(ctx context.Context, args []string, stderr io.Writer, ready readyFunc) int {
	// First of all: SIGHUP's default action ends the process, and the start (the sockmap self-test, the
	// pools, the listeners) takes a while. A reload asked for then is held until the relay serves.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// SIGUSR2 (upgrade) too: its default action ends the process. One asked for during the start waits.
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(usr2)
	// A process started by an upgrade takes the running relay's offer of listeners first.
	inherited, err := inherit()
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay run: %v\n", err)
		return 1
	}
	o, err := parseRunFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil {
		err = o.loadConfig()
	}
	if err == nil {
		err = o.checkAdmin()
	}
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay run: %v\n", err)
		if ue := (*usageError)(nil); errors.As(err, &ue) {
			fmt.Fprintln(stderr, ue.hint())
		}
		inherited.fail(err.Error())
		return 2
	}
	log, _ := newLogger(stderr, o.logLevel, o.logFormat)
	if inherited != nil {
		inherited.log = log
	}
	upgrader := newUpgrader(log, args, o.drainTimeout)
	upgrader.fixedBinary = o.upgradeBinary
	// READY=1, RELOADING=1 and STOPPING=1 under a systemd unit of Type=notify.
	ready, notifyReload, notified := notifySystemd(ctx, ready, upgrader.handedOff, log)
	defer notified()
	for _, w := range o.file.warnings() {
		log.Warn("configuration", "warning", w)
	}
	up := &upgrades{inherited: inherited, requests: usr2, upgrader: upgrader}
	if err := serve(ctx, o, log, ready, hup, notifyReload, up); err != nil {
		log.Error("sockrelay stopped", "err", err)
		inherited.fail(err.Error())
		return 1
	}
	return 0
}

// listenerSetting is one client-facing listener the relay binds.
type listenerSetting struct {
	name, address string
	datapath      relay.Datapath
	flag          string           // how an error names it: --listen, or the file's listener
	file          *config.Listener // nil for --listen
	tls           *tlsconf.Server  // the TLS listener's certificates; nil without TLS
}

// handoverDesc is what identifies the listener to a process it is handed over to.
func (l listenerSetting) handoverDesc() handover.Listener {
	d := handover.Listener{Name: l.name, Address: l.address, Kind: handover.KindWebSocket, TLS: l.tls != nil}
	if l.file != nil {
		if l.file.Type == config.ListenerTCP {
			d.Kind = handover.KindTCP
		}
		d.ProxyProtocol = l.file.ProxyProtocol
		d.TLS = d.TLS || l.file.TLS != nil
	}
	return d
}

// options are the relay's settings of the listener.
func (l listenerSetting) options() relay.ListenerOptions {
	opts := relay.ListenerOptions{Name: l.name, Datapath: l.datapath}
	if l.file != nil {
		opts.TrustedProxies = l.file.TrustedProxies
		opts.Limits = relayLimits(l.file.Limits)
		opts.ProxyProtocol = l.file.ProxyProtocol
	}
	if l.tls != nil {
		opts.TLS = l.tls.Config()
	}
	return opts
}

// prepare has srv check and set up the listener's settings, ln to accept on: a WebSocket listener, or a
// tcp one.
func (l listenerSetting) prepare(srv *relay.Server, ln net.Listener) (*relay.PreparedListener, error) {
	if l.file == nil || l.file.Type != config.ListenerTCP {
		return srv.PrepareListener(ln, l.options())
	}
	var sni relay.SNIReader
	if l.file.TLSPassthrough {
		sni = tlsconf.PeekClientHello
	}
	return srv.PrepareTCP(ln, l.options(), sni)
}

// source is where the listener was given: the configuration file, or --listen.
func (l listenerSetting) source(o *runOptions) string {
	if l.file != nil {
		return o.configPath
	}
	return l.flag
}

// tunnelsDatapath is what the listener's tunnels run on: a TLS listener's bytes are decrypted in
// userspace, so its tunnels run on copy whatever the datapath it was given.
func (l listenerSetting) tunnelsDatapath() relay.Datapath {
	if l.tls != nil {
		return relay.DatapathCopy
	}
	return l.datapath
}

// tlsPools names the pools with tls that the listener's routes lead to: tunnels to them run on copy too.
func (l listenerSetting) tlsPools(cfg *config.Config) []string {
	var out []string
	if l.file == nil {
		return nil
	}
	for _, r := range l.file.Routes {
		if p := cfg.Pool(r.Pool); p != nil && p.TLS.Enabled && !slices.Contains(out, p.Name) {
			out = append(out, p.Name)
		}
	}
	return out
}

// relayLimits translates a configuration file's limits.
func relayLimits(l config.Limits) relay.Limits {
	return relay.Limits{MaxTunnels: l.MaxTunnels, MaxTunnelsPerIP: l.MaxTunnelsPerIP,
		HandshakesPerIP: l.HandshakesPerIP.Rate, HandshakeBurstPerIP: l.HandshakesPerIP.Burst,
		MaxConcurrentHandshakes: l.MaxConcurrentHandshakes}
}

// listenerSettings are the listeners to bind: the file's, or the one of --listen.
func (o *runOptions) listenerSettings() []listenerSetting {
	if o.file.cfg == nil {
		return []listenerSetting{{name: relay.DefaultListener, address: o.listen, datapath: relay.DatapathAuto, flag: "--listen"}}
	}
	var out []listenerSetting
	for _, l := range o.file.cfg.Listeners {
		dp, _ := relay.ParseDatapath(l.Datapath) // checked by the config package
		if o.set["datapath"] {
			dp = relay.DatapathAuto // --datapath overrides the file, listeners' own settings included
		}
		out = append(out, listenerSetting{name: l.Name, address: l.Address, datapath: dp,
			flag: fmt.Sprintf("%s: listener %q", o.configPath, l.Name), file: &l})
	}
	return out
}

// upgrades are serve's part in binary upgrades.
type upgrades struct {
	inherited *inheritance   // the listeners offered by the relay that started this one; nil if none did
	requests  chan os.Signal // SIGUSR2
	upgrader  *upgrader      // this relay's side of an upgrade it is asked for
}

func serve(ctx context.Context, o *runOptions, log *slog.Logger, ready readyFunc, hup chan os.Signal, notifyReload reloadNotifier, up *upgrades) error {
	reloadDue := holdReloadsDuringStart(hup, log)
	defer reloadDue() // a start that fails stops holding them too

	datapath, _ := relay.ParseDatapath(o.datapath) // NewServer resolves auto and logs its choice
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildInfo())
	rcfg := relay.Config{
		Upstreams:               o.upstreams,
		Datapath:                datapath,
		ClientHeaderTimeout:     o.clientHeaderTimeout,
		ConnectTimeout:          o.connectTimeout,
		UpstreamResponseTimeout: o.upstreamTimeout,
		HTTPIdleTimeout:         o.httpIdleTimeout,
		MaxHeaderBytes:          o.maxHeaderBytes,
		KernelHeldLimit:         o.kernelHeldLimit,
		EventLoops:              o.eventLoops,
		TunnelLogInterval:       o.tunnelLogInterval,
		TunnelIdleTimeout:       o.tunnelIdleTimeout,
		TunnelLifetime:          o.tunnelLifetime,
		HalfClosedTimeout:       offIfZero(o.halfClosedTimeout),
		TCPHalfClosedTimeout:    offIfZero(o.tcpHalfClosed),
		Logger:                  log,
		Registerer:              reg,
		Upgrade:                 up.upgrader.upgrade,
		KernelObjects:           up.inherited.kernelObjects(),
	}
	var rl *reloader
	if o.file.cfg != nil {
		// Health checks and DNS go on while tunnels drain after SIGTERM; closeAll stops them at the end.
		ps := newPools(context.Background(), log)
		defer ps.closeAll()
		router, err := ps.apply(o.file.cfg)
		if err != nil {
			return fmt.Errorf("%s: %w", o.configPath, err)
		}
		rl = &reloader{o: o, started: o.file.cfg, pools: ps, log: log}
		rcfg.Router, rcfg.Reload = router, rl.reload
		rcfg.Limits = relayLimits(o.file.cfg.Limits)
		rcfg.Auto = relayAuto(o.file.cfg.Auto)
	}
	srv, err := relay.NewServer(rcfg)
	if err != nil {
		return fmt.Errorf("--datapath %s: %w", datapath, err)
	}
	if rl != nil {
		rl.srv = srv
		rl.pools.setServer(srv)
	}
	up.inherited.continueIDs(srv) // before the first tunnel of its own

	var lns []net.Listener
	var handed []offered // what an upgrade hands over
	closeAll := func() {
		for _, ln := range lns {
			ln.Close()
		}
		srv.Shutdown(context.Background()) // releases the kernel datapath, if it was loaded
	}
	listeners := o.listenerSettings()
	for i, l := range listeners {
		if l.file != nil && l.file.TLS != nil {
			spec := tlsconf.ServerSpec{MinVersion: l.file.TLS.MinVersion, Certificates: certFiles(l.file.TLS)}
			ts, err := tlsconf.NewServer(spec, log.With("listener", l.name))
			if err != nil {
				closeAll()
				return fmt.Errorf("%s: tls: %w", l.flag, err)
			}
			listeners[i].tls = ts
			if rl != nil {
				if rl.tlsServers == nil {
					rl.tlsServers = map[string]*tlsconf.Server{}
				}
				rl.tlsServers[l.name] = ts
			}
			if l.file.TLS.ReloadInterval > 0 {
				go ts.WatchFiles(ctx, l.file.TLS.ReloadInterval)
			}
		}
		desc := listeners[i].handoverDesc()
		ln, err := up.inherited.listen(desc, func() (net.Listener, error) { return net.Listen("tcp", l.address) })
		if err != nil {
			closeAll()
			return fmt.Errorf("%s: %w", l.flag, err)
		}
		lns = append(lns, ln)
		desc.Bound = ln.Addr().String()
		handed = append(handed, offered{desc: desc, ln: ln})
	}
	// Every listener's settings are checked and set up before the relay says it serves (READY=1, the
	// answer to an upgrade): one the server refuses fails the start, and an old process keeps everything.
	prepared := make([]*relay.PreparedListener, len(lns))
	for i, ln := range lns {
		if prepared[i], err = listeners[i].prepare(srv, ln); err != nil {
			closeAll()
			return fmt.Errorf("%s: %w", listeners[i].source(o), err) // the error names the listener
		}
		listeners[i].datapath = prepared[i].Datapath()
	}
	var adminAddr net.Addr
	var adminSrv *http.Server
	letGo := func() {}
	if o.admin != "" {
		desc := handover.Listener{Name: "admin", Address: o.admin, Kind: handover.KindAdmin}
		al, err := up.inherited.listen(desc, func() (net.Listener, error) { return listenAdmin(o.admin) })
		if err != nil {
			closeAll()
			return fmt.Errorf("--admin: %w", err)
		}
		adminAddr = al.Addr()
		desc.Bound = adminAddr.String()
		handed = append(handed, offered{desc: desc, ln: al})
		// Once the new process serves, the admin socket is its alone: a request that comes after the
		// answer to the upgrade (a second upgrade) must reach the new process. Closed here, the socket
		// lives on in the new process, and its file stays; a new process without this admin removes the
		// file (inheritance.confirm).
		letGo = func() {
			if ul, ok := al.(*net.UnixListener); ok {
				ul.SetUnlinkOnClose(false)
			}
			al.Close()
		}
		adminSrv = &http.Server{Handler: srv.AdminHandlerWith(reg, o.adminAccess(log)), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := adminSrv.Serve(al); err != nil && !errors.Is(err, http.ErrServerClosed) && !up.upgrader.handedOff() {
				log.Error("admin server stopped", "err", err)
			}
		}()
		defer adminSrv.Close()
	}

	served := make(chan error, len(lns))
	for i, ln := range lns {
		go func() {
			if err := prepared[i].Serve(); err != nil {
				served <- fmt.Errorf("serve %s: %w", ln.Addr(), err)
			}
		}()
	}
	adminLogged := o.admin // the bound address, so that --admin :0 says which port it got, as --listen does
	if adminAddr != nil {
		adminLogged = adminAddr.String()
	}
	for i, ln := range lns {
		attrs := []any{"listener", listeners[i].name, "listen", ln.Addr().String(), "datapath", listeners[i].tunnelsDatapath(),
			"upstreams", o.upstreamsLogged(), "admin", adminLogged, "version", versionString()}
		if pools := listeners[i].tlsPools(o.file.cfg); len(pools) > 0 && listeners[i].tunnelsDatapath() != relay.DatapathCopy {
			attrs = append(attrs, "copy_for_tls_pools", strings.Join(pools, ","))
		}
		log.Info("sockrelay listening", attrs...)
	}
	// SIGHUP has been caught since the start (runCommand). Without a file it is caught too, so that a stray
	// hang-up does not stop a relay full of tunnels.
	if ready != nil {
		ready(lns[0].Addr(), adminAddr)
	}
	up.upgrader.exportBPF, up.upgrader.bpfAdopted = srv.ExportKernel, func(adopted bool) {
		if adopted {
			srv.HandKernelTunnels()
		} else {
			srv.WithdrawKernelExport()
		}
	}
	up.upgrader.serving(handed, srv.Tunnels(), letGo) // before confirm: an upgrade may follow at once
	up.inherited.confirm(srv)
	if reloadDue() {
		hangup(rl, log, notifyReload)
	}
	handedTo := 0
	for handedTo == 0 {
		select {
		case err := <-served:
			return err
		case <-hup:
			hangup(rl, log, notifyReload)
		case <-up.requests:
			go func() { _, _ = up.upgrader.upgrade(ctx, relay.UpgradeRequest{}) }() // logged there
		case handedTo = <-up.upgrader.handedOver:
		case <-ctx.Done():
			handedTo = -1
		}
	}
	if handedTo > 0 {
		return drainAfterHandover(srv, adminSrv, handedTo, up.upgrader.takeSuccessor(), o.drainTimeout, log)
	}
	up.upgrader.stop()
	log.Info("shutting down: no new clients; draining tunnels", "tunnels", srv.Tunnels().Len(), "drain_timeout", o.drainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	if err := srv.Shutdown(dctx); err != nil {
		log.Warn("drain time over: closed the remaining tunnels", "err", err)
	}
	log.Info("sockrelay stopped")
	return nil
}

// drainAfterHandover ends a relay whose listeners a new process (pid) took over: it stops accepting (its
// copies of the listening sockets are closed, the sockets live on in the new process), lets the answer
// to the upgrade request go out, hands its plain userspace tunnels to the new process on successor (when
// that one adopts tunnels; nil otherwise), and drains the others (TLS, kernel) as a stop does.
func drainAfterHandover(srv *relay.Server, adminSrv *http.Server, pid int, successor *handover.Conn, drainTimeout time.Duration, log *slog.Logger) error {
	log.Info("handed over to the new process: no new clients here; draining tunnels", "pid", pid,
		"tunnels", srv.Tunnels().Len(), "drain_timeout", drainTimeout)
	if successor != nil {
		m := &tunnelMover{conn: successor, srv: srv, to: pid, log: log}
		drained := make(chan struct{})
		defer func() { <-m.finished }()
		defer close(drained) // after Shutdown: every tunnel left has ended
		m.finished = make(chan struct{})
		go m.run(srv.Settled(), drained)
	}
	dctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	answered := make(chan struct{})
	go func() {
		defer close(answered)
		if adminSrv != nil {
			_ = adminSrv.Shutdown(dctx) // the upgrade's answer, and requests begun before it
		}
	}()
	if err := srv.Shutdown(dctx); err != nil {
		log.Warn("drain time over: closed the remaining tunnels", "err", err)
	}
	<-answered // without tunnels to drain, the process would otherwise exit before it answers
	log.Info("sockrelay stopped: the new process serves", "pid", pid)
	return nil
}

// holdReloadsDuringStart takes the SIGHUPs that come while the relay starts, logs the first, and keeps
// them as one reload. The returned function stops holding them and says whether a reload is due; later
// SIGHUPs stay in hup for the serving loop.
func holdReloadsDuringStart(hup <-chan os.Signal, log *slog.Logger) (reloadDue func() bool) {
	stop, due := make(chan struct{}), make(chan bool, 1)
	go func() {
		pending := false
		for {
			select {
			case <-hup:
				if !pending {
					log.Info("reload requested during start; will apply once serving")
				}
				pending = true
			case <-stop:
				due <- pending
				return
			}
		}
	}()
	var once sync.Once
	var result bool
	return func() bool {
		once.Do(func() {
			close(stop)
			result = <-due
		})
		return result
	}
}

// hangup answers a SIGHUP: reload the configuration file, if there is one, telling systemd through
// notify (systemctl reload sends the SIGHUP).
func hangup(rl *reloader, log *slog.Logger, notify reloadNotifier) {
	if rl == nil {
		log.Warn("SIGHUP: nothing to reload, this relay runs without --config")
		return
	}
	notify(rl.reload) // logged there; the configuration in force stays on error
}

// offIfZero turns a timeout that 0 turns off into relay.Config's way of saying off (negative): there 0
// takes the default.
func offIfZero(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// listenAdmin binds the admin address: HOST:PORT, or unix:/PATH, a socket only its owner may connect
// to. A socket file left by a relay that did not stop cleanly is replaced; one that a process serves is not.
func listenAdmin(addr string) (net.Listener, error) {
	path, unix := config.AdminSocket(addr)
	if !unix {
		return net.Listen("tcp", addr)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another process serves this socket", path)
		}
		_ = os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// Until this chmod the socket has the umask's mode; connecting needs write permission, which the
	// usual umask (022) gives only to the owner.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restrict %s to its owner: %w", path, err)
	}
	return ln, nil
}

// adminAccess says who may use the admin listener, and warns of an admin that other hosts can reach.
func (o *runOptions) adminAccess(log *slog.Logger) relay.AdminAccess {
	access := relay.AdminAccess{Token: o.adminToken, Hosts: o.adminHosts}
	if _, unix := config.AdminSocket(o.admin); unix {
		access.Unauthenticated = true // the socket's permissions say who connects
	}
	changes := "need the admin token"
	if access.Token == "" && !access.Unauthenticated {
		changes = "refused: no --admin-token-file (admin.token_file) given"
	}
	if config.CheckAdminAddress(o.admin, false) != nil {
		log.Warn("THE ADMIN LISTENER CAN BE REACHED FROM OTHER HOSTS (--admin-allow-remote, admin.allow_remote): "+
			"/metrics, /debug/tunnels with client addresses and GET /admin/pools are open to anyone who can connect; "+
			"keep it behind a firewall or on a management network", "admin", o.admin, "changes", changes)
	}
	return access
}

// upstreamsLogged says where tunnels go, for the start-up line.
func (o *runOptions) upstreamsLogged() string {
	if o.file.cfg == nil {
		return strings.Join(o.upstreams, ",")
	}
	var names []string
	for _, p := range o.file.cfg.Pools {
		names = append(names, "pool "+p.Name)
	}
	return strings.Join(names, ",")
}

// relayAuto is the relay's form of the file's auto settings.
func relayAuto(a config.Auto) relay.AutoOptions {
	return relay.AutoOptions{Start: a.Start, ChattySegments: a.ChattySegments, BusySegments: a.BusySegments,
		QuietFor: a.Quiet, MinDwell: a.MinDwell, MaxDwell: a.MaxDwell}
}
