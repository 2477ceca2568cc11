package auto

import (
	"errors"
	"testing"
	"time"
)

// TestSettingsCheck: settings each within their range alone are checked against the policies a start may put
// in force, and a bad one is named by its configuration key; the policies' own values pass.
func TestSettingsCheck(t *testing.T) {
	for _, start := range []string{"", "measured", "copy", "sockmap"} {
		if len(StartPolicies(start)) == 0 {
			t.Fatalf("start %q: no policy", start)
		}
		for _, n := range StartPolicies(start) {
			if err := (Settings{}).Check(n); err != nil {
				t.Errorf("%s with no setting: %v", n.Name, err)
			}
		}
	}
	if StartPolicies("kernel") != nil {
		t.Error("an unknown start has policies")
	}
	for _, tc := range []struct {
		name  string
		start string
		s     Settings
		key   string // "" for none
	}{
		{"min dwell above the default max", "measured", Settings{MinDwell: 10 * time.Minute}, "min_dwell"},
		{"max dwell below the default min", "copy", Settings{MaxDwell: time.Second}, "max_dwell"},
		{"max dwell below min dwell", "sockmap", Settings{MinDwell: time.Minute, MaxDwell: 30 * time.Second}, "max_dwell"},
		{"both dwells past the defaults", "measured", Settings{MinDwell: 10 * time.Minute, MaxDwell: time.Hour}, ""},
		{"chatty at calm under sockmap", "sockmap", Settings{ChattySegments: 200}, "chatty_segments"},
		{"chatty low under copy", "copy", Settings{ChattySegments: 1}, ""},
		{"busy under every start", "measured", Settings{BusySegments: 1}, ""},
	} {
		for _, n := range StartPolicies(tc.start) {
			err := tc.s.Check(n)
			var bad *SettingError
			switch {
			case tc.key == "" && err != nil:
				t.Errorf("%s over %s: %v", tc.name, n.Name, err)
			case tc.key != "" && (!errors.As(err, &bad) || bad.Key != tc.key):
				t.Errorf("%s over %s: %v, want an error naming auto.%s", tc.name, n.Name, err, tc.key)
			}
		}
	}
}
