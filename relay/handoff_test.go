package relay

import "testing"

// TestRegistryAdoptKeepsIDs: a process started by an upgrade numbers its own tunnels past the old
// process's, so that an adopted tunnel keeps its id; one whose id is taken, or lies in this process's own
// range, gets a new one. No two live tunnels share an id.
func TestRegistryAdoptKeepsIDs(t *testing.T) {
	r := NewRegistry()
	r.ContinueIDs(10)
	own := &Tunnel{}
	if err := r.add(own); err != nil {
		t.Fatal(err)
	}
	if own.ID != 10+adoptIDs+1 {
		t.Fatalf("this process's first tunnel got id %d, want %d", own.ID, 10+adoptIDs+1)
	}
	for _, tc := range []struct {
		name string
		id   uint64
		keep bool
	}{
		{"the old process's id", 7, true},
		{"an id the old process gave after its offer", 12, true},
		{"an id already adopted", 7, false},
		{"an id of this process's own range", own.ID, false},
		{"no id", 0, false},
	} {
		tn := &Tunnel{}
		if err := r.adopt(tn, tc.id); err != nil {
			t.Fatal(err)
		}
		if kept := tn.ID == tc.id; kept != tc.keep {
			t.Errorf("%s: adopting id %d gave id %d; kept %v, want %v", tc.name, tc.id, tn.ID, kept, tc.keep)
		}
	}
	if n := r.Len(); n != 6 {
		t.Errorf("%d tunnels registered, want 6 (each under an id of its own)", n)
	}
}
