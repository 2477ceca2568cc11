package loader

import (
	"testing"
)

func TestOpenClose(t *testing.T) {
	s, err := Open(Options{})
	if err != nil {
		requireBPF(t, err)
	}
	n, err := s.Entries()
	if err != nil {
		t.Fatal(err)
	}
	t.Log(n)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
