package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sockrelay/sockrelay/relay"
)

// runOptions are the flags of `sockrelay run`.
type runOptions struct {
	listen              string
	upstreams           []string
	datapath            string
	admin               string
	drainTimeout        time.Duration
	clientHeaderTimeout time.Duration
	connectTimeout      time.Duration
	upstreamTimeout     time.Duration
	maxHeaderBytes      int
	kernelHeldLimit     int
	logLevel            string
	logFormat           string
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
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "", "client-facing `ADDR` to listen on, e.g. 127.0.0.1:8080 or :80 (required)")
	fs.Var(listFlag{&o.upstreams}, "upstream", "upstream `HOST:PORT`; repeat for several, chosen round-robin (at least one)")
	fs.StringVar(&o.datapath, "datapath", "auto", "how tunnel bytes move: auto, sockmap, splice or copy")
	fs.StringVar(&o.admin, "admin", "", "`ADDR` for /metrics, /healthz and /debug/tunnels (off when empty)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "on SIGINT/SIGTERM, how long live tunnels may run before they are closed")
	fs.DurationVar(&o.clientHeaderTimeout, "client-header-timeout", relay.DefaultClientHeaderTimeout, "how long a client may take to send its request headers")
	fs.DurationVar(&o.connectTimeout, "connect-timeout", relay.DefaultConnectTimeout, "how long connecting to an upstream may take")
	fs.DurationVar(&o.upstreamTimeout, "upstream-timeout", relay.DefaultUpstreamResponseTimeout, "how long an upstream may take to answer a handshake or request")
	fs.IntVar(&o.maxHeaderBytes, "max-header-bytes", relay.DefaultMaxHeaderBytes, "largest request line and headers a client may send, in bytes")
	fs.IntVar(&o.kernelHeldLimit, "kernel-held-limit", relay.DefaultKernelHeldLimit, "sockmap: most `BYTES` the kernel may hold per tunnel direction for a slow reader before userspace takes over the direction")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "text", "text or json")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: every setting is a flag, e.g. --upstream %s", fs.Arg(0), fs.Arg(0))
	}
	if o.listen == "" {
		return nil, errors.New("--listen is required: the address clients connect to, e.g. --listen 127.0.0.1:8080")
	}
	// Checked here, not left to net.Listen, so that a malformed address is a usage error (exit 2) that says
	// what is accepted, found before the kernel datapath is loaded.
	for _, a := range []struct{ name, addr, example string }{
		{"--listen", o.listen, "127.0.0.1:8080, or :8080 for every address"},
		{"--admin", o.admin, "127.0.0.1:9090"},
	} {
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
	if len(o.upstreams) == 0 {
		return nil, errors.New("--upstream is required: at least one HOST:PORT, e.g. --upstream 127.0.0.1:9000")
	}
	if _, err := relay.NewPool(o.upstreams); err != nil {
		return nil, fmt.Errorf("--upstream: %w", err)
	}
	if _, err := relay.ParseDatapath(o.datapath); err != nil {
		return nil, fmt.Errorf("--datapath: %w", err)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"--drain-timeout", o.drainTimeout},
		{"--client-header-timeout", o.clientHeaderTimeout},
		{"--connect-timeout", o.connectTimeout},
		{"--upstream-timeout", o.upstreamTimeout},
	} {
		if d.v <= 0 {
			return nil, fmt.Errorf("%s: %s is not a positive duration, e.g. 10s or 500ms", d.name, d.v)
		}
	}
	if o.maxHeaderBytes < 1024 {
		return nil, fmt.Errorf("--max-header-bytes: %d is too small; the least accepted is 1024", o.maxHeaderBytes)
	}
	if o.kernelHeldLimit < relay.MinKernelHeldLimit || o.kernelHeldLimit > relay.MaxKernelHeldLimit {
		return nil, fmt.Errorf("--kernel-held-limit: %d is out of range; accepted %d to %d bytes", o.kernelHeldLimit,
			relay.MinKernelHeldLimit, relay.MaxKernelHeldLimit)
	}
	if _, err := newLogger(io.Discard, o.logLevel, o.logFormat); err != nil {
		return nil, err
	}
	return o, nil
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
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format: %q is not one of text, json", format)
	}
}

// readyFunc, when not nil, is told the addresses the relay listens on once it serves; tests use it.
type readyFunc func(listen, admin net.Addr)

// runCommand runs the relay until ctx is done, then drains it. It returns the exit code.
func runCommand(ctx context.Context, args []string, stderr io.Writer, ready readyFunc) int {
	o, err := parseRunFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay run: %v\n", err)
		return 2
	}
	log, _ := newLogger(stderr, o.logLevel, o.logFormat)
	if err := serve(ctx, o, log, ready); err != nil {
		log.Error("sockrelay stopped", "err", err)
		return 1
	}
	return 0
}

func serve(ctx context.Context, o *runOptions, log *slog.Logger, ready readyFunc) error {
	datapath, _ := relay.ParseDatapath(o.datapath) // NewServer resolves auto and logs its choice
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := relay.NewServer(relay.Config{
		Upstreams:               o.upstreams,
		Datapath:                datapath,
		ClientHeaderTimeout:     o.clientHeaderTimeout,
		ConnectTimeout:          o.connectTimeout,
		UpstreamResponseTimeout: o.upstreamTimeout,
		MaxHeaderBytes:          o.maxHeaderBytes,
		KernelHeldLimit:         o.kernelHeldLimit,
		Logger:                  log,
		Registerer:              reg,
	})
	if err != nil {
		return fmt.Errorf("--datapath %s: %w", datapath, err)
	}

	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		srv.Shutdown(context.Background()) // releases the kernel datapath, if it was loaded
		return fmt.Errorf("--listen: %w", err)
	}
	var adminAddr net.Addr
	var adminSrv *http.Server
	if o.admin != "" {
		al, err := net.Listen("tcp", o.admin)
		if err != nil {
			ln.Close()
			srv.Shutdown(context.Background())
			return fmt.Errorf("--admin: %w", err)
		}
		adminAddr = al.Addr()
		adminSrv = &http.Server{Handler: srv.AdminHandler(reg), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := adminSrv.Serve(al); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin server stopped", "err", err)
			}
		}()
		defer adminSrv.Close()
	}

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	adminLogged := o.admin // the bound address, so that --admin :0 says which port it got, as --listen does
	if adminAddr != nil {
		adminLogged = adminAddr.String()
	}
	log.Info("sockrelay listening", "listen", ln.Addr().String(), "upstreams", strings.Join(o.upstreams, ","),
		"admin", adminLogged, "version", versionString())
	if ready != nil {
		ready(ln.Addr(), adminAddr)
	}

	select {
	case err := <-served:
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	log.Info("shutting down: no new clients; draining tunnels", "tunnels", srv.Tunnels().Len(), "drain_timeout", o.drainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	if err := srv.Shutdown(dctx); err != nil {
		log.Warn("drain time over: closed the remaining tunnels", "err", err)
	}
	log.Info("sockrelay stopped")
	return nil
}
