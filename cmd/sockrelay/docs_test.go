package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// readDoc returns a page of docs/ as text.
func readDoc(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("../../docs/" + name)
	if err != nil {
		t.Fatalf("read the documentation: %v", err)
	}
	return string(b)
}

// usageFlag is a flag's line in the flag package's usage: "  -name TYPE".
var usageFlag = regexp.MustCompile(`(?m)^  -(\S+)`)

// TestFlagsAreDocumented: every flag of run, check and reload, as their -h lists it, is named as --flag
// in docs/configuration.md, and every flag of upgrade in docs/upgrade.md, so that a new flag cannot be
// added without its documentation.
func TestFlagsAreDocumented(t *testing.T) {
	for _, c := range []struct {
		command, page string
		help          func(stderr io.Writer)
	}{
		{"run", "configuration.md", func(stderr io.Writer) { _, _ = parseRunFlags([]string{"-h"}, stderr) }},
		{"check", "configuration.md", func(stderr io.Writer) { checkCommand([]string{"-h"}, io.Discard, stderr) }},
		{"reload", "configuration.md", func(stderr io.Writer) { reloadCommand(context.Background(), []string{"-h"}, io.Discard, stderr) }},
		{"upgrade", "upgrade.md", func(stderr io.Writer) { upgradeCommand(context.Background(), []string{"-h"}, io.Discard, stderr) }},
	} {
		t.Run(c.command, func(t *testing.T) {
			doc := readDoc(t, c.page)
			var usage bytes.Buffer
			c.help(&usage)
			flags := usageFlag.FindAllStringSubmatch(usage.String(), -1)
			if len(flags) == 0 {
				t.Fatalf("sockrelay %s -h listed no flag:\n%s", c.command, usage.String())
			}
			for _, f := range flags {
				if !strings.Contains(doc, "`--"+f[1]) {
					t.Errorf("sockrelay %s --%s is not documented in docs/%s", c.command, f[1], c.page)
				}
			}
		})
	}
}

var (
	metricFamily = regexp.MustCompile(`(?m)^# TYPE (sockrelay_\w+) `)
	labelValue   = regexp.MustCompile(`(?m)^sockrelay_\w+\{.*\b(reason|state|direction)="([^"]*)"`)
)

// TestMetricsAreDocumented: every sockrelay_* metric a running relay serves, and every reason, state and
// direction its labels take, is named in docs/operations.md. The relay's counters start at 0 for every
// reason, so one scrape of an idle relay lists them all.
func TestMetricsAreDocumented(t *testing.T) {
	doc := readDoc(t, "operations.md")
	r := startRelay(t, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", newEchoUpstream(t),
		"--datapath", "copy")
	// The listeners' series start at 0 once each listener serves, which can be a moment after the relay
	// says it is ready: scrape until they are there.
	var metrics string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var status int
		status, metrics = httpGet(t, "http://"+r.admin+"/metrics")
		if status != 200 {
			t.Fatalf("GET /metrics: %d\n%s", status, metrics)
		}
		if strings.Contains(metrics, "sockrelay_tunnels_closed_total{") || time.Now().After(deadline) {
			break
		}
	}
	var names []string
	for _, m := range metricFamily.FindAllStringSubmatch(metrics, -1) {
		names = append(names, m[1])
	}
	for _, m := range labelValue.FindAllStringSubmatch(metrics, -1) {
		names = append(names, m[2])
	}
	slices.Sort(names)
	names = slices.Compact(names)
	for _, want := range []string{"sockrelay_tunnels_closed_total", "idle_timeout", "no_upstream", "sockmap_unavailable"} {
		if !slices.Contains(names, want) {
			t.Fatalf("the scrape has no %s: the parsing is broken\n%s", want, metrics)
		}
	}
	for _, name := range names {
		if !strings.Contains(doc, "`"+name+"`") {
			t.Errorf("%s is not documented in docs/operations.md", name)
		}
	}
}
