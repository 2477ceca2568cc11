package config

import (
	"os"
	"strings"
	"testing"
)

// TestExample checks that the example file shipped for users is valid and clean.
func TestExample(t *testing.T) {
	c, err := Load("example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) > 0 {
		t.Errorf("warnings: %q", c.Warnings)
	}
	if c.Admin != "127.0.0.1:9180" || len(c.Listeners) != 1 || c.Listeners[0].Address != "127.0.0.1:8080" ||
		c.Pool("echo") == nil || c.Pool("echo").Servers[0].Address != "127.0.0.1:9000" {
		t.Errorf("example: %+v", c)
	}
}

// TestExampleTLS checks that the tls blocks that the example shows commented out are valid once
// uncommented, as a user would enable them.
func TestExampleTLS(t *testing.T) {
	data, err := os.ReadFile("example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	blocks := 0
	for i := 0; i < len(lines); i++ {
		text := strings.TrimLeft(lines[i], " ")
		if !strings.HasPrefix(text, "# tls:") {
			continue
		}
		blocks++
		indent := lines[i][:len(lines[i])-len(text)]
		lines[i] = indent + text[2:]
		for i+1 < len(lines) && strings.HasPrefix(lines[i+1], indent+"#   ") {
			i++
			lines[i] = indent + lines[i][len(indent)+2:]
		}
	}
	if blocks != 2 {
		t.Fatalf("found %d commented tls blocks, want 2 (a listener's and a pool's)", blocks)
	}
	c, err := Parse("example.yaml", []byte(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	if l := c.Listeners[0].TLS; l == nil || len(l.Certificates) != 1 || l.MinVersion != TLS12 {
		t.Errorf("listener tls %+v, want one certificate and min_version 1.2", l)
	}
	if p := c.Pool("echo").TLS; p != (PoolTLS{Enabled: true}) {
		t.Errorf("pool tls %+v, want enabled with defaults", p)
	}
}
