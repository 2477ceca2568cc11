package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// version and commit are set at build time with -ldflags "-X main.version=v1.2.3 -X main.commit=abc…"
// (make build and make release take them from git describe and git rev-parse). Builds without them report
// the module version or "dev", and the revision Go stamped from the checkout, if any.
var (
	version = ""
	commit  = ""
)

// buildVersion is what this binary says it is: its version and its commit ("" when unknown, shortened to
// 12 hex digits).
func buildVersion() (v, rev string) {
	v, rev = version, commit
	if info, ok := debug.ReadBuildInfo(); ok {
		if v == "" && info.Main.Version != "" && info.Main.Version != "(devel)" {
			v = info.Main.Version
		}
		for _, s := range info.Settings {
			if rev == "" && s.Key == "vcs.revision" {
				rev = s.Value
			}
		}
	}
	if v == "" {
		v = "dev"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	return v, rev
}

func versionString() string {
	v, rev := buildVersion()
	if rev != "" {
		v += " (" + rev + ")"
	}
	return fmt.Sprintf("sockrelay %s %s %s/%s", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func versionCommand(stdout io.Writer) int {
	fmt.Fprintln(stdout, versionString())
	return 0
}

// buildInfo is the sockrelay_build_info metric: always 1, with the same version and commit as `sockrelay
// version` as labels, so that a fleet's dashboards can tell which build each relay runs.
func buildInfo() prometheus.Collector {
	v, rev := buildVersion()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "sockrelay_build_info",
		Help:        "The build of this relay: its version, commit and Go version as labels; always 1.",
		ConstLabels: prometheus.Labels{"version": v, "commit": rev, "goversion": runtime.Version()},
	})
	g.Set(1)
	return g
}
