package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/relay"
	"github.com/sockrelay/sockrelay/tlsconf"
	"github.com/sockrelay/sockrelay/upstream"
)

// poolSpec translates a configuration file's pool into what package upstream runs.
func poolSpec(p config.Pool) upstream.PoolSpec {
	spec := upstream.PoolSpec{
		Name:    p.Name,
		Balance: upstream.Algorithm(p.Balance),
		Hash:    upstream.HashSpec{By: upstream.HashBy(p.Hash.By), Name: p.Hash.Name, LoadFactor: p.Hash.LoadFactor},
		Retry:   upstream.RetrySpec{Tries: p.Retry.Tries, Timeout: p.Retry.Timeout},
		Passive: upstream.PassiveHealthSpec{Failures: p.PassiveHealth.Failures, Window: p.PassiveHealth.Window,
			DownFor: p.PassiveHealth.DownFor},
	}
	for _, s := range p.Servers {
		spec.Servers = append(spec.Servers, upstream.ServerSpec{Address: s.Address, Weight: s.Weight,
			MaxTunnels: s.MaxTunnels, Backup: s.Backup, Drain: s.Drain})
	}
	if p.DNS != nil {
		spec.DNS = &upstream.DNSSpec{Name: p.DNS.Name, Type: upstream.DNSType(p.DNS.Type), Port: p.DNS.Port,
			Interval: p.DNS.Interval, MaxTunnels: p.DNS.MaxTunnels}
	}
	if c := p.HealthCheck; c != nil {
		spec.Active = &upstream.ActiveHealthSpec{Type: upstream.CheckType(c.Type), Path: c.Path,
			ExpectStatus: c.ExpectStatus, Interval: c.Interval, Timeout: c.Timeout, Rise: c.Rise, Fall: c.Fall,
			SlowStart: c.SlowStart}
	}
	return spec.WithDefaults()
}

// configRouter routes by a configuration file's listeners and routes to its pools. It is immutable: a
// reload builds a new one around the same *upstream.Pool values, so pools keep their servers' state.
type configRouter struct {
	listeners map[string]config.Listener
	pools     map[string]*upstream.Pool
	sendProxy map[string]string // per pool: "", "v1" or "v2"
	// upstreamTLS is, per wss pool, the TLS client settings for a server's address.
	upstreamTLS map[string]func(string) *tls.Config
	order       []*upstream.Pool // the file's order, for the admin API
}

func (c *configRouter) Route(listener string, r *http.Request) (relay.Route, bool) {
	l, ok := c.listeners[listener]
	if !ok {
		return relay.Route{}, false
	}
	route, ok := l.Match(r.Host, r.URL.Path)
	if !ok {
		return relay.Route{}, false
	}
	return relay.Route{Pool: c.pools[route.Pool], Origins: route.Origins, SendProxy: c.sendProxy[route.Pool],
		UpstreamTLS: c.upstreamTLS[route.Pool]}, true
}

// certFiles translates a TLS listener's certificates from the configuration file.
func certFiles(t *config.ListenerTLS) []tlsconf.CertFiles {
	files := make([]tlsconf.CertFiles, len(t.Certificates))
	for i, c := range t.Certificates {
		files[i] = tlsconf.CertFiles{Cert: c.Cert, Key: c.Key}
	}
	return files
}

// upstreamTLSSpec translates a pool's TLS settings from the configuration file.
func upstreamTLSSpec(t config.PoolTLS) tlsconf.ClientSpec {
	return tlsconf.ClientSpec{ServerName: t.ServerName, CAFile: t.CAFile, CertFile: t.Cert, KeyFile: t.Key,
		InsecureSkipVerify: t.InsecureSkipVerify}
}

// checkRunnable finds what the config package cannot know and run would refuse on every host, so that
// check, run and reload agree.
func checkRunnable(cfg *config.Config) error {
	var errs []error
	for i, l := range cfg.Listeners {
		if l.Datapath == "sockmap" && (cfg.Datapath == "copy" || cfg.Datapath == "splice") {
			errs = append(errs, fmt.Errorf("listeners[%d] (%q): datapath sockmap under the top-level datapath %s; "+
				"accepted: copy, splice or auto here, or a top-level datapath of sockmap or auto, which loads the kernel datapath",
				i, l.Name, cfg.Datapath))
		}
	}
	for _, p := range cfg.Pools {
		if err := poolSpec(p).Validate(); err != nil {
			errs = append(errs, fmt.Errorf("pools.%s: %w", p.Name, err))
		}
	}
	return errors.Join(errs...)
}

func (c *configRouter) Pools() []*upstream.Pool { return c.order }

// pools owns the running pools across reloads: their health checks and DNS discovery, and which of them
// closes the tunnels of servers a reload removes.
type pools struct {
	log *slog.Logger
	ctx context.Context // the pools' health checks and DNS discovery run until it ends

	mu      sync.Mutex // one apply at a time; guards running
	running map[string]*upstream.Pool

	// flagMu guards what a pool's DNS goroutine reads when it removes servers (onRemoved). It is never
	// held while a pool is closed, since Close waits for that goroutine.
	flagMu sync.Mutex
	srv    *relay.Server // set once the server exists; removed servers' tunnels are closed through it
	// closeOnRemoval says, per pool, whether its removed servers' tunnels are closed (the setting in
	// force when they are removed).
	closeOnRemoval map[string]bool
}

func newPools(ctx context.Context, log *slog.Logger) *pools {
	return &pools{log: log, ctx: ctx, running: map[string]*upstream.Pool{}, closeOnRemoval: map[string]bool{}}
}

// apply makes the running pools match cfg and returns the router for it. It first builds or checks
// every pool, and changes nothing if one fails; then it updates the pools that stay, starts the new
// ones, and stops those cfg no longer has. Servers a reload removes lose their tunnels when their pool
// says close_tunnels_on_removal (a removed pool: its last setting).
func (ps *pools) apply(cfg *config.Config) (relay.Router, error) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	specs := make(map[string]upstream.PoolSpec, len(cfg.Pools))
	fresh := map[string]*upstream.Pool{}
	upstreamTLS := map[string]func(string) *tls.Config{}
	for _, p := range cfg.Pools {
		if p.TLS.Enabled {
			// Files are read now, so that a bad CA or key refuses the whole configuration.
			client, err := tlsconf.NewClient(upstreamTLSSpec(p.TLS))
			if err != nil {
				return nil, fmt.Errorf("pools.%s.tls: %w", p.Name, err)
			}
			upstreamTLS[p.Name] = client.Config
		}
		spec := poolSpec(p)
		specs[p.Name] = spec
		if _, ok := ps.running[p.Name]; ok {
			if err := spec.Validate(); err != nil {
				return nil, fmt.Errorf("pool %q: %w", p.Name, err)
			}
			continue
		}
		np, err := upstream.New(spec, upstream.Options{Logger: ps.log, OnRemoved: ps.onRemoved(p.Name)})
		if err != nil {
			return nil, err
		}
		fresh[p.Name] = np
	}
	// Nothing can fail from here on.
	var removed []*upstream.Server
	var closing []*upstream.Pool
	ps.flagMu.Lock()
	closeOnRemoval, srv := maps.Clone(ps.closeOnRemoval), ps.srv
	ps.flagMu.Unlock()
	for name, p := range ps.running {
		spec, ok := specs[name]
		if !ok {
			if closeOnRemoval[name] {
				removed = append(removed, p.Servers()...)
			}
			closing = append(closing, p)
			delete(ps.running, name)
			ps.log.Info("pool removed", "pool", name)
			continue
		}
		gone, err := p.Update(spec)
		if err != nil { // validated above
			ps.log.Error("pool update failed after validation", "pool", name, "err", err)
			continue
		}
		if len(gone) > 0 && cfg.Pool(name).CloseTunnelsOnRemoval {
			removed = append(removed, gone...)
		}
	}
	for name, p := range fresh {
		p.Start(ps.ctx)
		ps.running[name] = p
	}
	rt := &configRouter{listeners: map[string]config.Listener{}, pools: map[string]*upstream.Pool{},
		sendProxy: map[string]string{}, upstreamTLS: upstreamTLS}
	for _, l := range cfg.Listeners {
		rt.listeners[l.Name] = l
	}
	ps.flagMu.Lock()
	for _, p := range cfg.Pools {
		ps.closeOnRemoval[p.Name] = p.CloseTunnelsOnRemoval
		rt.pools[p.Name] = ps.running[p.Name]
		if p.ProxyProtocol != config.ProxyProtocolOff {
			rt.sendProxy[p.Name] = p.ProxyProtocol
		}
		rt.order = append(rt.order, ps.running[p.Name])
	}
	ps.flagMu.Unlock()
	for _, p := range closing {
		p.Close() // waits for its DNS goroutine, which may be in onRemoved: flagMu is free
	}
	if len(removed) > 0 && srv != nil {
		n := srv.CloseTunnelsTo(removed)
		ps.log.Info("closed the tunnels of removed upstream servers", "servers", len(removed), "tunnels", n)
	}
	return rt, nil
}

// onRemoved closes, when the pool says so, the tunnels of servers that DNS discovery removed.
func (ps *pools) onRemoved(pool string) func([]*upstream.Server) {
	return func(gone []*upstream.Server) {
		ps.flagMu.Lock()
		close, srv := ps.closeOnRemoval[pool], ps.srv
		ps.flagMu.Unlock()
		if close && srv != nil {
			n := srv.CloseTunnelsTo(gone)
			ps.log.Info("closed the tunnels of servers DNS no longer lists", "pool", pool, "servers", len(gone), "tunnels", n)
		}
	}
}

func (ps *pools) setServer(srv *relay.Server) {
	ps.flagMu.Lock()
	ps.srv = srv
	ps.flagMu.Unlock()
}

// closeAll stops every pool's health checks and DNS discovery.
func (ps *pools) closeAll() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for name, p := range ps.running {
		p.Close() // under mu, not flagMu: onRemoved does not wait for mu
		delete(ps.running, name)
	}
}

// listenerChange says why cfg cannot be reloaded into a relay that listens as old does: listeners are
// bound once, at start. "" when it can.
func listenerChange(old, cfg *config.Config) string {
	key := func(l config.Listener) string {
		return fmt.Sprintf("%s@%s/%s tls=%v passthrough=%v proxy_protocol=%v", l.Name, l.Address, l.Type,
			l.TLS != nil, l.TLSPassthrough, l.ProxyProtocol)
	}
	a, b := make([]string, len(old.Listeners)), make([]string, len(cfg.Listeners))
	for i, l := range old.Listeners {
		a[i] = key(l)
	}
	for i, l := range cfg.Listeners {
		b[i] = key(l)
	}
	if slices.Equal(a, b) {
		return ""
	}
	return fmt.Sprintf("listeners changed (%v to %v): names, addresses, types, TLS and PROXY protocol of listeners take a restart; routes and pools reload", a, b)
}

// reloader re-reads the configuration file on SIGHUP and POST /admin/reload. A file that does not parse,
// or that changes what only a restart can change, is refused with the reason and the configuration in
// force stays.
type reloader struct {
	o          *runOptions
	tlsServers map[string]*tlsconf.Server // the TLS listeners' certificates, by listener name
	started    *config.Config             // the file as the relay started with it
	pools      *pools
	srv        *relay.Server
	log        *slog.Logger
	mu         sync.Mutex // one reload at a time
}

func (rl *reloader) reload() error {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	err := rl.reloadLocked()
	if err != nil {
		rl.log.Error("configuration reload refused; the configuration in force is unchanged", "file", rl.o.configPath, "err", err)
	}
	return err
}

func (rl *reloader) reloadLocked() error {
	cfg, err := config.Load(rl.o.configPath)
	if err != nil {
		return err
	}
	// Listeners and restart-only settings are compared with what the relay started with, which is what
	// is still in force for them whatever reloads came between.
	old := rl.started
	if err := checkRunnable(cfg); err != nil {
		return err
	}
	if why := listenerChange(old, cfg); why != "" {
		return errors.New(why)
	}
	// TLS listeners' certificates are read again, from the files the new file names, but served only
	// once the whole reload has succeeded: a refused reload changes no certificate.
	var staged []*tlsconf.Staged
	for _, l := range cfg.Listeners {
		ts := rl.tlsServers[l.Name]
		if ts == nil || l.TLS == nil {
			continue
		}
		st, err := ts.Stage(certFiles(l.TLS))
		if err != nil {
			return fmt.Errorf("listener %q: tls: %w", l.Name, err)
		}
		staged = append(staged, st)
	}
	router, err := rl.pools.apply(cfg)
	if err != nil {
		return fmt.Errorf("%s: %w", rl.o.configPath, err)
	}
	rl.srv.SetRouter(router)
	for _, st := range staged {
		st.Install()
	}
	for _, w := range cfg.Warnings {
		rl.log.Warn("configuration", "warning", w)
	}
	if restart := restartOnly(old, cfg); len(restart) > 0 {
		rl.log.Warn("configuration reloaded, but these settings take a restart and keep their old values",
			"settings", strings.Join(restart, ", "))
	}
	rl.o.file.cfg = cfg
	rl.log.Info("configuration reloaded", "file", rl.o.configPath, "pools", len(cfg.Pools), "listeners", len(cfg.Listeners))
	return nil
}

// restartOnly names the settings that differ between old and cfg and that only a restart applies.
func restartOnly(old, cfg *config.Config) []string {
	var out []string
	for _, c := range []struct {
		name    string
		changed bool
	}{
		{"admin", old.Admin != cfg.Admin || old.AdminAccess.TokenFile != cfg.AdminAccess.TokenFile ||
			old.AdminAccess.AllowRemote != cfg.AdminAccess.AllowRemote || !slices.Equal(old.AdminAccess.Hosts, cfg.AdminAccess.Hosts) ||
			old.AdminAccess.UpgradeBinary != cfg.AdminAccess.UpgradeBinary},
		{"log_level", old.LogLevel != cfg.LogLevel},
		{"log_format", old.LogFormat != cfg.LogFormat},
		{"datapath", old.Datapath != cfg.Datapath || !slices.EqualFunc(old.Listeners, cfg.Listeners,
			func(a, b config.Listener) bool { return a.Datapath == b.Datapath })},
		{"listeners' limits and trusted_proxies", !slices.EqualFunc(old.Listeners, cfg.Listeners,
			func(a, b config.Listener) bool {
				return a.Limits == b.Limits && slices.Equal(a.TrustedProxies, b.TrustedProxies)
			})},
		{"limits", old.Limits != cfg.Limits},
		{"listeners' tls.min_version and tls.reload_interval", !slices.EqualFunc(old.Listeners, cfg.Listeners,
			func(a, b config.Listener) bool {
				return (a.TLS == nil) == (b.TLS == nil) && (a.TLS == nil ||
					a.TLS.MinVersion == b.TLS.MinVersion && a.TLS.ReloadInterval == b.TLS.ReloadInterval)
			})},
		{"kernel_held_limit", old.KernelHeldLimit != cfg.KernelHeldLimit},
		{"event_loops", old.EventLoops != cfg.EventLoops},
		{"auto", old.Auto != cfg.Auto},
		{"tunnel_log_interval", old.TunnelLogInterval != cfg.TunnelLogInterval},
		{"timeouts", old.Timeouts != cfg.Timeouts},
		{"max_header_bytes", old.MaxHeaderBytes != cfg.MaxHeaderBytes},
	} {
		if c.changed {
			out = append(out, c.name)
		}
	}
	return out
}
