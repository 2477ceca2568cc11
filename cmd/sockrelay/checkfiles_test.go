package main

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// TestCheckLoadsWhatRunLoads: `sockrelay check` refuses what run would refuse or fail on before its first
// client: a certificate file that is missing, a key of another certificate, a CA file that is not PEM, a
// server host that does not resolve (RFC 6761 reserves .invalid for names that never do); each at the
// file's line of the key. A DNS pool's name that does not resolve is a warning, since run starts with it.
func TestCheckLoadsWhatRunLoads(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "check CA")
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, dir, "a")
	_, otherKey := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, dir, "b")
	notPEM := filepath.Join(dir, "ca.txt")
	writeFile(t, notPEM, "not a certificate\n")
	file := func(cert, key, server, pool string) string {
		return fmt.Sprintf(`listeners:
  - address: 127.0.0.1:8443
    tls:
      certificates:
        - {cert: %s, key: %s}
    routes: [{pool: echo}]
pools:
  echo:
%s
%s`, cert, key, server, pool)
	}
	const (
		ipServer   = "    servers: [127.0.0.1:9000]"
		usedByNone = "" // no second pool
	)
	for _, tc := range []struct {
		name string
		text string
		code int
		errs []string
	}{
		{"all there", file(cert, key, ipServer, usedByNone), 0, nil},
		{"missing certificate", file(filepath.Join(dir, "gone.pem"), key, ipServer, usedByNone), 1,
			[]string{":5: listeners[0].tls.certificates[0]: load certificate: read certificate: open " + filepath.Join(dir, "gone.pem")}},
		{"key of another certificate", file(cert, otherKey, ipServer, usedByNone), 1,
			[]string{":5: listeners[0].tls.certificates[0]: load certificate: key " + otherKey + " does not match certificate " + cert}},
		{"server host that does not resolve", file(cert, key, "    servers: [127.0.0.1:9000, relay-upstream.invalid:9000]", usedByNone), 1,
			[]string{`:9: pools.echo.servers[1]: host "relay-upstream.invalid" does not resolve`}},
		{"CA file that is not PEM", file(cert, key, ipServer+"\n    tls: {ca_file: "+notPEM+"}", usedByNone), 1,
			[]string{":10: pools.echo.tls.ca_file: load upstream CA: certificate " + notPEM + ": no PEM certificate found"}},
		{"DNS name that does not resolve", file(cert, key, ipServer, "  chat:\n    dns: {name: relay-upstream.invalid, port: 9000}\n"), 0,
			[]string{`warning: ` + dir, `:11: pools.chat.dns.name: host "relay-upstream.invalid" does not resolve`, "run starts with no servers"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "relay.yaml")
			writeFile(t, path, tc.text)
			var stdout, stderr bytes.Buffer
			if code := dispatch(context.Background(), []string{"check", "--config", path}, &stdout, &stderr); code != tc.code {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			for _, w := range tc.errs {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
			if tc.code == 0 && !strings.Contains(stdout.String(), "ok: 1 listeners") {
				t.Errorf("stdout lacks ok:\n%s", stdout.String())
			}
		})
	}
}
