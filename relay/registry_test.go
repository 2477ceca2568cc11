package relay

import (
	"context"
	"testing"
)

// TestRegistryWaitEmptyPastContext: with no tunnel live, Wait reports the registry empty even when ctx is
// done already, as it is when a drain's holds are released only by its timeout: a drain that ended with no
// tunnel left has closed none, and says so.
func TestRegistryWaitEmptyPastContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := NewRegistry()
	for i := range 100 { // a select of the two alone would choose at random
		if err := r.Wait(ctx); err != nil {
			t.Fatalf("Wait on an empty registry, try %d: %v, want nil", i+1, err)
		}
	}
}
