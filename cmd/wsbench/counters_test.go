package main

import (
	"os"
	"strings"
	"testing"
)

func TestParseProcPidStat(t *testing.T) {
	for _, tc := range []struct {
		name, stat string
		want       int64
		wantErr    string
	}{
		{"plain", "1234 (sockrelay) S 1 1234 1234 0 -1 4194560 500 0 0 0 70 30 0 0 20 0 9 0 100 0 0", 100, ""},
		// A command name may hold spaces and parentheses: fields count after the last ')'.
		{"odd name", "99 (a) b (c) R 1 99 99 0 -1 0 0 0 0 0 5 6 0 0 20 0", 11, ""},
		{"no name", "99 a R 1", 0, "no command name"},
		{"short", "99 (a) R 1 2 3", 0, "fields after the command name"},
		{"not a number", "1 (x) S 1 1 1 0 -1 0 0 0 0 0 x 30 0", 0, `utime or stime "x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseProcPidStat(tc.stat)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v; want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("parseProcPidStat = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestParseCtxtSwitches(t *testing.T) {
	const status = "Name:\tsockrelay\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t1200\nnonvoluntary_ctxt_switches:\t34\n"
	if v, n, err := parseCtxtSwitches(status); err != nil || v != 1200 || n != 34 {
		t.Errorf("parseCtxtSwitches = %d, %d, %v; want 1200, 34", v, n, err)
	}
	for _, bad := range []string{"Name:\tx\n", "voluntary_ctxt_switches:\t1\n", "voluntary_ctxt_switches:\tx\nnonvoluntary_ctxt_switches:\t1\n"} {
		if _, _, err := parseCtxtSwitches(bad); err == nil {
			t.Errorf("parseCtxtSwitches(%q): no error", bad)
		}
	}
}

// TestReadProcCounts: this test's own process has CPU time and threads with context switches.
func TestReadProcCounts(t *testing.T) {
	c, err := readProcCounts([]int{os.Getpid()})
	if err != nil || c.Voluntary+c.Involuntary == 0 {
		t.Errorf("readProcCounts(self) = %+v, %v; want context switches", c, err)
	}
	if _, err := readProcCounts([]int{1 << 30}); err == nil {
		t.Error("readProcCounts of a process that does not exist: no error")
	}
}

func TestParseTraceStats(t *testing.T) {
	const stats = "entries: 120\noverrun: 30\ncommit overrun: 0\nbytes: 4000\noldest event ts: 1.0\n"
	if got, err := parseTraceStats(stats); err != nil || got != 150 {
		t.Errorf("parseTraceStats = %d, %v; want 150 (entries + overrun)", got, err)
	}
	for _, bad := range []string{"entries: 1\n", "entries: x\noverrun: 0\n"} {
		if _, err := parseTraceStats(bad); err == nil {
			t.Errorf("parseTraceStats(%q): no error", bad)
		}
	}
}
