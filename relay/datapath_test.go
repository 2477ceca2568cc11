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

func TestChooseDatapath(t *testing.T) {
	cases := []struct {
		requested Datapath
		want      Datapath
		why       string // substring of the reason for the choice
		err       bool
	}{
		{DatapathAuto, DatapathSplice, "sockmap", false}, // auto says why sockmap was skipped
		{DatapathSplice, DatapathSplice, "requested", false},
		{DatapathCopy, DatapathCopy, "requested", false},
		{DatapathSockmap, "", "", true},
	}
	for _, tc := range cases {
		got, why, err := ChooseDatapath(tc.requested)
		if tc.err {
			if !errors.Is(err, ErrDatapathUnavailable) || !strings.Contains(err.Error(), "splice or copy") {
				t.Errorf("ChooseDatapath(%s) = %v, want ErrDatapathUnavailable that names the alternatives", tc.requested, err)
			}
			continue
		}
		if err != nil || got != tc.want || !strings.Contains(why, tc.why) {
			t.Errorf("ChooseDatapath(%s) = %s, %q, %v; want %s and a reason mentioning %q", tc.requested, got, why, err, tc.want, tc.why)
		}
	}
}

func TestNewServerRefusesUnrunnableDatapath(t *testing.T) {
	for _, d := range []Datapath{DatapathAuto, DatapathSockmap, "bogus"} {
		if _, err := NewServer(Config{Upstreams: []string{"127.0.0.1:1"}, Datapath: d}); !errors.Is(err, ErrDatapathUnavailable) {
			t.Errorf("NewServer with datapath %q: %v, want ErrDatapathUnavailable", d, err)
		}
	}
}

func TestNewPool(t *testing.T) {
	for _, tc := range []struct {
		addrs []string
		err   string
	}{
		{nil, "at least one"},
		{[]string{"localhost"}, "HOST:PORT"},
		{[]string{":9000"}, "empty host"},
		{[]string{"127.0.0.1:0"}, "1 to 65535"},
		{[]string{"127.0.0.1:http"}, "1 to 65535"},
		{[]string{"127.0.0.1:9000", "[::1]:9001", "example.com:443"}, ""},
	} {
		p, err := NewPool(tc.addrs)
		if tc.err == "" {
			if err != nil {
				t.Errorf("NewPool(%q) = %v", tc.addrs, err)
				continue
			}
			for i := range 2 * len(tc.addrs) {
				if got := p.Next(); got != tc.addrs[i%len(tc.addrs)] {
					t.Errorf("Next #%d = %s, want %s", i, got, tc.addrs[i%len(tc.addrs)])
				}
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("NewPool(%q) = %v, want an error saying %q", tc.addrs, err, tc.err)
		}
	}
}
