package config

import "testing"

// TestExample checks that the example file shipped for users is valid and clean.
func TestExample(t *testing.T) {
	c, err := Load("example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) > 0 {
		t.Errorf("warnings: %q", c.Warnings)
	}
	if c.Admin != "127.0.0.1:9090" || len(c.Listeners) != 1 || c.Listeners[0].Address != "127.0.0.1:8080" ||
		c.Pool("echo") == nil || c.Pool("echo").Servers[0].Address != "127.0.0.1:9000" {
		t.Errorf("example: %+v", c)
	}
}
