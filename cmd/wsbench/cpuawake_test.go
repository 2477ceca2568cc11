package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestHoldCPUsAwakeWritesZero(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu_dma_latency")
	if err := os.WriteFile(path, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	release, err := holdCPUsAwake(path)
	if err != nil {
		t.Fatal(err)
	}
	release()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte{0, 0, 0, 0}) {
		t.Errorf("wrote %v, want a 4-byte 0 (µs)", got)
	}
}

func TestHoldCPUsAwakeSaysWhatFailed(t *testing.T) {
	_, err := holdCPUsAwake(filepath.Join(t.TempDir(), "missing"))
	if err == nil || !strings.Contains(err.Error(), "-cpus-awake") {
		t.Errorf("err = %v, want one that names -cpus-awake", err)
	}
}

func TestRTTTakesCPUsAwake(t *testing.T) {
	w, _, err := parseRTT([]string{"-url", "ws://127.0.0.1:1/", "-cpus-awake"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if !w.cpusAwake {
		t.Error("-cpus-awake did not set cpusAwake")
	}
}
