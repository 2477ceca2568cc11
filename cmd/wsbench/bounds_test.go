package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestCheckBounds(t *testing.T) {
	up := func(v map[string]float64) boundsRow { return boundsRow{Name: "bulk", Better: "higher", Values: v} }
	down := func(v map[string]float64) boundsRow { return boundsRow{Name: "p99", Better: "lower", Values: v} }
	for _, tc := range []struct {
		name    string
		rows    []boundsRow
		want    []string
		wantErr string
	}{
		{"direct fastest", []boundsRow{up(map[string]float64{"direct": 20, "copy": 5, "nginx": 19.9})}, nil, ""},
		{"a tie is bounded", []boundsRow{up(map[string]float64{"direct": 5, "copy": 5}), down(map[string]float64{"direct": 80, "nginx": 80})}, nil, ""},
		{"relay faster in throughput", []boundsRow{up(map[string]float64{"direct": 0.69, "nginx": 1.5, "splice": 1.25, "copy": 0.5})},
			[]string{"bulk: nginx 1.5 is above direct 0.69", "bulk: splice 1.25 is above direct 0.69"}, ""},
		{"relay lower in latency", []boundsRow{down(map[string]float64{"direct": 58, "sockmap": 54, "nginx": 106})},
			[]string{"p99: sockmap 54 is below direct 58"}, ""},
		{"large figures in whole numbers", []boundsRow{down(map[string]float64{"direct": 110935.4, "auto": 68626.2})},
			[]string{"p99: auto 68626 is below direct 110935"}, ""},
		{"rows keep their order", []boundsRow{down(map[string]float64{"direct": 9, "a": 1}), up(map[string]float64{"direct": 1, "b": 9})},
			[]string{"p99: a 1 is below direct 9", "bulk: b 9 is above direct 1"}, ""},
		// Round trips come as ratios to direct in alternated rounds (bench_report.py): direct is 1, and a relay
		// whose median ratio is below 1 beat no relay in most pairs.
		{"ratios to direct", []boundsRow{down(map[string]float64{"direct": 1, "copy": 0.93, "haproxy": 1.2})},
			[]string{"p99: copy 0.93 is below direct 1"}, ""},
		{"no direct", []boundsRow{up(map[string]float64{"copy": 1})}, nil, `row "bulk" has no direct figure`},
		{"bad direction", []boundsRow{{Name: "x", Better: "faster", Values: map[string]float64{"direct": 1}}}, nil, `better "faster"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := checkBounds(tc.rows)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("checkBounds error %v; want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var lines []string
			for _, v := range got {
				lines = append(lines, v.String())
			}
			if !slices.Equal(lines, tc.want) {
				t.Errorf("checkBounds = %q, want %q", lines, tc.want)
			}
		})
	}
}

func TestRunBounds(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, body string
		code       int
		want       string
	}{
		{"valid", `{"rows":[{"name":"bulk","better":"higher","values":{"direct":2,"copy":1}}]}`, 0, "valid: direct bounds every relay in all 1 rows"},
		{"invalid", `{"rows":[{"name":"bulk","better":"higher","values":{"direct":1,"copy":2}}]}`, 3, "INVALID: in 1 place(s)"},
		{"no rows", `{"rows":[]}`, 2, "no rows"},
		{"not json", `{`, 2, "unexpected end of JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(t.Context(), []string{"bounds", write(tc.name+".json", tc.body)}, &stdout, &stderr)
			if code != tc.code || !strings.Contains(stdout.String()+stderr.String(), tc.want) {
				t.Errorf("exit %d, output %q; want %d and %q", code, stdout.String()+stderr.String(), tc.code, tc.want)
			}
		})
	}
}
