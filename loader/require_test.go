package loader

import (
	"os"
	"testing"
)

// requireBPF fails the test when SOCKRELAY_REQUIRE_BPF=1 (CI sets it: the kernel datapath is tested for
// real there) and skips it otherwise, so a laptop without root can still run the rest of the suite.
func requireBPF(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" {
		t.Fatalf("kernel datapath unavailable and SOCKRELAY_REQUIRE_BPF=1: %v", err)
	}
	t.Skipf("kernel datapath unavailable: %v", err)
}
