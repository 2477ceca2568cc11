package relay

import (
	"fmt"
	"os"
	"testing"
)

// TestMain adds the kernel datapath to testDatapaths when this kernel passes its probe and self-test. With
// SOCKRELAY_REQUIRE_BPF=1 (CI sets it: the kernel datapath is tested for real there) a kernel that does not
// is a failure of the whole suite, never a silent skip.
func TestMain(m *testing.M) {
	if err := DatapathAvailable(DatapathSockmap); err != nil {
		if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" {
			fmt.Fprintf(os.Stderr, "SOCKRELAY_REQUIRE_BPF=1 but the kernel datapath cannot run: %v\n", err)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "note: sockmap tests skipped, the kernel datapath cannot run here: %v\n", err)
	} else {
		testDatapaths = append(testDatapaths, DatapathSockmap)
	}
	os.Exit(m.Run())
}

// requireSockmap skips a test of the kernel datapath where it cannot run; TestMain has already failed the
// suite if SOCKRELAY_REQUIRE_BPF=1.
func requireSockmap(t testing.TB) {
	t.Helper()
	for _, d := range testDatapaths {
		if d == DatapathSockmap {
			return
		}
	}
	t.Skip("the kernel datapath cannot run here (see the note at the start of the test output)")
}
