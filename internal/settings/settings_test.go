package settings

import (
	"fmt"
	"testing"
	"time"
)

func TestDurationRanges(t *testing.T) {
	for _, tc := range []struct {
		r    Duration
		text string
		in   []time.Duration
		out  []time.Duration
	}{
		{Timeout, "more than 0s", []time.Duration{1, time.Hour}, []time.Duration{0, -time.Second}},
		{TunnelTimeout, "0s (off) or 1s or more", []time.Duration{0, time.Second, 24 * time.Hour},
			[]time.Duration{time.Millisecond, 999 * time.Millisecond, -time.Second}},
		{Duration{Min: time.Second, Max: time.Hour}, "1s to 1h", []time.Duration{time.Second, time.Hour},
			[]time.Duration{0, time.Hour + 1}},
		{Duration{Off: true, Min: time.Nanosecond, Max: time.Hour}, "0s (off) to 1h", []time.Duration{0, time.Hour},
			[]time.Duration{-1, 2 * time.Hour}},
		{Duration{Min: 10 * time.Millisecond}, "10ms or more", []time.Duration{10 * time.Millisecond}, []time.Duration{time.Millisecond}},
	} {
		if got := tc.r.String(); got != tc.text {
			t.Errorf("%+v: String() = %q, want %q", tc.r, got, tc.text)
		}
		for _, v := range tc.in {
			if err := tc.r.Check(v); err != nil {
				t.Errorf("%s: %v refused: %v", tc.text, v, err)
			}
		}
		for _, v := range tc.out {
			if err := tc.r.Check(v); err == nil {
				t.Errorf("%s: %v accepted", tc.text, v)
			}
		}
	}
}

func TestCheckSaysValueAndRange(t *testing.T) {
	if err := TunnelTimeout.Check(500 * time.Millisecond); err == nil || err.Error() != "500ms is out of range; accepted 0s (off) or 1s or more" {
		t.Errorf("err = %v", err)
	}
	if err := KernelHeldLimit.Check(32 << 10); err == nil || err.Error() != "32768 is out of range; accepted 64KiB to 1GiB" {
		t.Errorf("err = %v", err)
	}
	if err := MaxHeaderBytes.Check(1 << 20); err != nil {
		t.Errorf("1 MiB refused: %v", err)
	}
	for _, v := range []int64{-1, 1025} {
		want := fmt.Sprintf("%d is out of range; accepted 0 (the default, one per two CPUs) or 1 to 1024", v)
		if err := EventLoops.Check(v); err == nil || err.Error() != want {
			t.Errorf("EventLoops.Check(%d) = %v, want %s", v, err, want)
		}
	}
	for _, v := range []int64{0, 1, 1024} {
		if err := EventLoops.Check(v); err != nil {
			t.Errorf("EventLoops.Check(%d) refused: %v", v, err)
		}
	}
}

func TestFormat(t *testing.T) {
	for d, want := range map[time.Duration]string{time.Hour: "1h", 90 * time.Minute: "1h30m", 2 * time.Minute: "2m", 1500 * time.Millisecond: "1.5s"} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q, want %q", d, got, want)
		}
	}
	for v, want := range map[int]string{0: "0", 1024: "1KiB", 1 << 30: "1GiB", 1500: "1500", 3 << 20: "3MiB"} {
		if got := FormatSize(v); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", v, got, want)
		}
	}
}
