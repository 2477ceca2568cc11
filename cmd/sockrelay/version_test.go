package main

import (
	"bytes"
	"context"
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestVersion: every spelling of the version command prints one line: the version set at build time
// (-ldflags "-X main.version=...") or "dev", then the Go version and the platform.
func TestVersion(t *testing.T) {
	platform := " " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	for _, tc := range []struct {
		arg, built, want string // built is what -X main.version set; want is the line's start
	}{
		{"version", "", "sockrelay dev"},
		{"--version", "", "sockrelay dev"},
		{"-version", "", "sockrelay dev"},
		{"version", "v1.2.3", "sockrelay v1.2.3"},
	} {
		t.Run(tc.arg+" "+tc.built, func(t *testing.T) {
			old := version
			version = tc.built
			t.Cleanup(func() { version = old })
			var stdout, stderr bytes.Buffer
			if code := dispatch(context.Background(), []string{tc.arg}, &stdout, &stderr); code != 0 {
				t.Errorf("exit code %d, want 0", code)
			}
			out := stdout.String()
			// A test binary has no VCS stamp, so nothing stands between the version and the Go version.
			if !strings.HasPrefix(out, tc.want+" ") || !strings.HasSuffix(out, platform) || strings.Count(out, "\n") != 1 {
				t.Errorf("printed %q, want one line %q...%q", out, tc.want, platform)
			}
			if stderr.Len() != 0 {
				t.Errorf("wrote to stderr: %q", stderr.String())
			}
		})
	}
}

// TestBuildInfoMetric: sockrelay_build_info is 1 with the version the version command prints, the
// commit and the Go version as labels.
func TestBuildInfoMetric(t *testing.T) {
	old := version
	version = "v1.2.3"
	t.Cleanup(func() { version = old })
	reg := prometheus.NewRegistry()
	reg.MustRegister(buildInfo())
	want := `# HELP sockrelay_build_info ` + buildInfoHelp + `
# TYPE sockrelay_build_info gauge
sockrelay_build_info{commit="",goversion="` + runtime.Version() + `",version="v1.2.3"} 1
`
	// A test binary has no VCS stamp: the commit is empty.
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "sockrelay_build_info"); err != nil {
		t.Error(err)
	}
}
