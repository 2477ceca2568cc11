package auto

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Settings are the thresholds the configuration's auto section may set over the policy in force (keys
// auto.chatty_segments, auto.busy_segments, auto.quiet, auto.min_dwell and auto.max_dwell); 0 keeps the
// policy's own.
type Settings struct {
	ChattySegments, BusySegments float64
	QuietFor, MinDwell, MaxDwell time.Duration
}

// The ranges the configuration accepts for a dwell and a rate alone; Check adds what the policies' own
// values require of them.
const (
	MinSettingDwell = 100 * time.Millisecond
	MaxSettingDwell = time.Hour
	MaxSettingRate  = 1e6
)

// Named is a policy and the name its errors and the log give it.
type Named struct {
	Name   string
	Policy Policy
}

// StartPolicies are the policies a start setting (configuration auto.start: measured, the default, copy or
// sockmap) may put in force: under measured, either of those Measured returns. nil for another value.
func StartPolicies(start string) []Named {
	switch start {
	case "", "measured":
		return []Named{{"LoopFirst", LoopFirst}, {"KernelForBusy", KernelForBusy}}
	case "copy":
		return []Named{{"LoopFirst", LoopFirst}}
	case "sockmap":
		return []Named{{"KernelFirst", KernelFirst}}
	}
	return nil
}

// Over is p with the settings that are set.
func (s Settings) Over(p Policy) Policy {
	if s.ChattySegments != 0 {
		p.ChattySegments = s.ChattySegments
	}
	if s.BusySegments != 0 {
		p.BusySegments = s.BusySegments
	}
	if s.QuietFor != 0 {
		p.QuietFor = s.QuietFor
	}
	if s.MinDwell != 0 {
		p.MinDwell = s.MinDwell
	}
	if s.MaxDwell != 0 {
		p.MaxDwell = s.MaxDwell
	}
	return p
}

// SettingError is a setting that the policy it is set over does not accept beside its own values.
type SettingError struct {
	// Key is the setting's key in the configuration's auto section (min_dwell); Msg says what is wrong
	// with its value and what is accepted.
	Key, Msg string
}

func (e *SettingError) Error() string { return "auto." + e.Key + ": " + e.Msg }

// Check says which setting, over n's policy, makes a policy Validate refuses (a *SettingError naming it,
// its value and the range accepted there), or one whose tunnels would move back and forth; each setting
// is taken to be within its range alone (the configuration checks that).
func (s Settings) Check(n Named) error {
	p := s.Over(n.Policy)
	def := n.Policy
	switch {
	case s.MaxDwell != 0 && s.MinDwell != 0 && p.MaxDwell < p.MinDwell:
		return &SettingError{"max_dwell", fmt.Sprintf("%s is below auto.min_dwell, %s; accepted %s to %s",
			short(s.MaxDwell), short(s.MinDwell), short(s.MinDwell), short(MaxSettingDwell))}
	case s.MinDwell != 0 && p.MaxDwell < p.MinDwell:
		return &SettingError{"min_dwell", fmt.Sprintf("%s is above the %s policy's max dwell, %s; accepted %s to %s, or set auto.max_dwell too",
			short(s.MinDwell), n.Name, short(def.MaxDwell), short(MinSettingDwell), short(def.MaxDwell))}
	case s.MaxDwell != 0 && p.MaxDwell < p.MinDwell:
		return &SettingError{"max_dwell", fmt.Sprintf("%s is below the %s policy's min dwell, %s; accepted %s to %s",
			short(s.MaxDwell), n.Name, short(def.MinDwell), short(def.MinDwell), short(MaxSettingDwell))}
	case s.ChattySegments != 0 && p.ChattySegments <= p.CalmSegments:
		calm := rate(p.CalmSegments)
		return &SettingError{"chatty_segments", fmt.Sprintf("%s is at or below the %s policy's calm threshold, %s segments a second, so tunnels between them would move back and forth; accepted above %s to %s",
			rate(s.ChattySegments), n.Name, calm, calm, rate(MaxSettingRate))}
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("the auto settings over the %s policy: %w", n.Name, err)
	}
	return nil
}

// short is d as the configuration writes it: 5m, 1h, 100ms (not 5m0s, 1h0m0s).
func short(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// rate is a rate as the configuration writes it: 200, 1000000.
func rate(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
