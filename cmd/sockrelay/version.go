package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3"; builds without it report the module
// version or "dev".
var version = ""

// buildVersion is the version of this binary ("dev" when neither -X main.version nor the module says) and
// the VCS commit it was built from ("" when the build has no VCS stamp).
func buildVersion() (v, commit string) {
	v = version
	if info, ok := debug.ReadBuildInfo(); ok {
		if v == "" && info.Main.Version != "" && info.Main.Version != "(devel)" {
			v = info.Main.Version
		}
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" {
				commit = s.Value
			}
		}
	}
	if v == "" {
		v = "dev"
	}
	return v, commit
}

func versionString() string {
	v, commit := buildVersion()
	if len(commit) >= 12 {
		v += " (" + commit[:12] + ")"
	}
	return fmt.Sprintf("sockrelay %s %s %s/%s", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func versionCommand(stdout io.Writer) int {
	fmt.Fprintln(stdout, versionString())
	return 0
}

// buildInfoHelp is the help text of sockrelay_build_info.
const buildInfoHelp = "Always 1; the labels say which build of sockrelay runs: its version, VCS commit and Go version."

// buildInfo is the metric sockrelay_build_info{version,commit,goversion} 1, by which dashboards tell
// which build each relay runs.
func buildInfo() prometheus.Collector {
	v, commit := buildVersion()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "sockrelay_build_info",
		Help:        buildInfoHelp,
		ConstLabels: prometheus.Labels{"version": v, "commit": commit, "goversion": runtime.Version()},
	})
	g.Set(1)
	return g
}
