package main

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// TestVersion: every spelling of the version command prints one line: the version set at build time
// (-ldflags "-X main.version=...") or "dev", then the Go version and the platform.
func TestVersion(t *testing.T) {
	platform := " " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	for _, tc := range []struct {
		arg, built, commit, want string // built and commit are what -X set; want is the line's start
	}{
		{"version", "", "", "sockrelay dev"},
		{"--version", "", "", "sockrelay dev"},
		{"-version", "", "", "sockrelay dev"},
		{"version", "v1.2.3", "", "sockrelay v1.2.3"},
		{"version", "v1.2.3-4-g0123456789ab", "0123456789abcdef0123", "sockrelay v1.2.3-4-g0123456789ab (0123456789ab)"},
	} {
		t.Run(tc.arg+" "+tc.built, func(t *testing.T) {
			stamp(t, tc.built, tc.commit)
			var stdout, stderr bytes.Buffer
			if code := dispatch(context.Background(), []string{tc.arg}, &stdout, &stderr); code != 0 {
				t.Errorf("exit code %d, want 0", code)
			}
			out := stdout.String()
			// A test binary has no VCS stamp, so only a stamped commit stands between the version and the Go
			// version.
			if !strings.HasPrefix(out, tc.want+" ") || !strings.HasSuffix(out, platform) || strings.Count(out, "\n") != 1 {
				t.Errorf("printed %q, want one line %q...%q", out, tc.want, platform)
			}
			if stderr.Len() != 0 {
				t.Errorf("wrote to stderr: %q", stderr.String())
			}
		})
	}
}

// TestBuildInfoMetric: the relay's /metrics has sockrelay_build_info with the version and commit that
// `sockrelay version` prints.
func TestBuildInfoMetric(t *testing.T) {
	stamp(t, "v1.2.3-4-g0123456789ab", "0123456789abcdef0123")
	var out bytes.Buffer
	versionCommand(&out)
	if !strings.HasPrefix(out.String(), "sockrelay v1.2.3-4-g0123456789ab (0123456789ab) ") {
		t.Fatalf("sockrelay version printed %q", out.String())
	}
	r := startRelay(t, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--datapath", "copy")
	want := fmt.Sprintf(`sockrelay_build_info{commit="0123456789ab",goversion=%q,version="v1.2.3-4-g0123456789ab"} 1`, runtime.Version())
	if metrics := r.get(t, "/metrics", 200); !strings.Contains(metrics, want+"\n") {
		t.Errorf("/metrics lacks %s", want)
	}
}

// stamp sets what -ldflags -X would have set, for the test.
func stamp(t *testing.T, v, rev string) {
	oldVersion, oldCommit := version, commit
	version, commit = v, rev
	t.Cleanup(func() { version, commit = oldVersion, oldCommit })
}
