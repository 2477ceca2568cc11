package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/tlsconf"
)

// resolveTimeout bounds each host lookup of `sockrelay check`.
const resolveTimeout = 5 * time.Second

// hostResolver is what checkFiles resolves upstream hosts with; *net.Resolver satisfies it, tests give
// a fake.
type hostResolver interface {
	LookupHost(ctx context.Context, host string) ([]string, error)
}

// checkFiles does with cfg what run and a reload do before they serve, short of binding addresses: it
// loads the TLS listeners' certificates and keys and the pools' CA and client certificate files, and
// resolves the static servers' host names. Each problem is a *config.Error at the key that names the
// file or host. A DNS pool's name that does not resolve is a warning, not an error: run starts with it
// and keeps resolving.
func checkFiles(ctx context.Context, cfg *config.Config, r hostResolver) (errs config.ErrorList, warnings []string) {
	for i, l := range cfg.Listeners {
		if l.TLS == nil {
			continue
		}
		for j, c := range certFiles(l.TLS) {
			spec := tlsconf.ServerSpec{MinVersion: l.TLS.MinVersion, Certificates: []tlsconf.CertFiles{c}}
			if _, err := tlsconf.NewServer(spec, slog.New(slog.DiscardHandler)); err != nil {
				errs = append(errs, cfg.ErrorAt(fmt.Sprintf("listeners[%d].tls.certificates[%d]", i, j), err))
			}
		}
	}
	for _, p := range cfg.Pools {
		if p.TLS.Enabled {
			spec := upstreamTLSSpec(p.TLS)
			caOnly := spec
			caOnly.CertFile, caOnly.KeyFile = "", ""
			if _, err := tlsconf.NewClient(caOnly); err != nil {
				errs = append(errs, cfg.ErrorAt("pools."+p.Name+".tls.ca_file", err))
			} else if _, err := tlsconf.NewClient(spec); err != nil {
				errs = append(errs, cfg.ErrorAt("pools."+p.Name+".tls.cert", err))
			}
		}
		for i, s := range p.Servers {
			if err := resolvable(ctx, r, s.Address); err != nil {
				errs = append(errs, cfg.ErrorAt(fmt.Sprintf("pools.%s.servers[%d]", p.Name, i), err))
			}
		}
		if p.DNS != nil && p.DNS.Type != "SRV" {
			if err := resolvable(ctx, r, net.JoinHostPort(p.DNS.Name, "0")); err != nil {
				warnings = append(warnings, cfg.ErrorAt("pools."+p.Name+".dns.name", fmt.Errorf(
					"%w; run starts with no servers in this pool and resolves the name again every %s", err, p.DNS.Interval)).Error())
			}
		}
	}
	return errs, warnings
}

// resolvable says why the host of hostport does not resolve; nil for an IP address or a host that does.
func resolvable(ctx context.Context, r hostResolver, hostport string) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return err // the config package has checked the form
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	if _, err := r.LookupHost(ctx, host); err != nil {
		return fmt.Errorf("host %q does not resolve: %w; every connection to it would fail", host, err)
	}
	return nil
}
