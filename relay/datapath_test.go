package relay

import (
	"errors"
	"strings"
	"testing"
)

func TestParseDatapath(t *testing.T) {
	for _, s := range []string{"auto", "sockmap", "splice", "copy"} {
		if d, err := ParseDatapath(s); err != nil || string(d) != s {
			t.Errorf("ParseDatapath(%q) = %q, %v", s, d, err)
		}
	}
	for _, s := range []string{"", "Copy", "kernel", "splice "} {
		_, err := ParseDatapath(s)
		if err == nil || !strings.Contains(err.Error(), "accepted values are auto, sockmap, splice, copy") {
			t.Errorf("ParseDatapath(%q) = %v, want an error listing the accepted values", s, err)
		}
	}
}

func TestNewServerResolvesDatapath(t *testing.T) {
	for _, tc := range []struct {
		requested, want Datapath
	}{
		{DatapathCopy, DatapathCopy},
		{DatapathSplice, DatapathSplice},
		{DatapathSockmap, DatapathSockmap},
		{DatapathAuto, testDatapaths[len(testDatapaths)-1]}, // sockmap wherever it can run, else splice
	} {
		t.Run(string(tc.requested), func(t *testing.T) {
			if tc.want == DatapathSockmap {
				requireSockmap(t)
			}
			r := startRelay(t, tc.requested, []string{"127.0.0.1:1"})
			if got := r.Datapath(); got != tc.want {
				t.Fatalf("datapath %s resolved to %s, want %s", tc.requested, got, tc.want)
			}
			if !strings.Contains(r.Log.String(), "datapath chosen") {
				t.Errorf("no 'datapath chosen' line in the log:\n%s", r.Log)
			}
		})
	}
}

func TestNewServerRefusesUnknownDatapath(t *testing.T) {
	if _, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: "bogus"}); !errors.Is(err, ErrDatapathUnavailable) {
		t.Errorf("NewServer with datapath bogus: %v, want ErrDatapathUnavailable", err)
	}
}
