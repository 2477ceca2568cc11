// Package failing holds one test that passes and one that fails on purpose: scripts/vmtest_test.sh boots a
// kernel with it (VMTEST_STEPS=failing) to prove that scripts/vmtest.sh reports a failure inside the VM as a
// failure of that kernel. It lives under testdata so that `go test ./...` never builds it.
package failing

import "testing"

func TestPasses(t *testing.T) {}

func TestFailsOnPurpose(t *testing.T) {
	t.Fatal("this test fails on purpose: the VM runner must report it")
}
