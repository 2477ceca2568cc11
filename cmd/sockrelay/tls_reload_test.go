package main

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// servedCert returns the certificate a TLS listener at addr serves for name.
func servedCert(t *testing.T, addr, name string) []byte {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
		&tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS to %s: %v", addr, err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].Raw
}

func tlsListenerConfig(listen, admin, echo, cert, key string) string {
	return fmt.Sprintf(`
admin: %s
listeners:
  - name: public
    address: %s
    tls: {certificates: [{cert: %s, key: %s}]}
    routes: [{pool: echo}]
pools:
  echo:
    servers: [%s]
`, admin, listen, cert, key, echo)
}

// TestReloadNewCertificatePaths: a reload that names other certificate files for a TLS listener
// is accepted ("configuration reloaded"); the listener must then serve the new certificate, or the reload
// must be refused / warned about as restart-only. Today the old files are re-read and the new paths are
// silently ignored.
func TestReloadNewCertificatePaths(t *testing.T) {
	echo := startCountingEcho(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "reload CA")
	oldLeaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}})
	oldCert, oldKey := oldLeaf.WriteFiles(t, dir, "old")
	newLeaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}})
	newCert, newKey := newLeaf.WriteFiles(t, dir, "new")
	listen, admin := freeAddr(t), freeAddr(t)
	r := startConfigRelay(t, tlsListenerConfig(listen, admin, echo.addr(), oldCert, oldKey))
	if got := servedCert(t, listen, "relay.test"); !bytes.Equal(got, oldLeaf.Cert.Raw) {
		t.Fatal("the listener does not serve its certificate")
	}
	if !r.reloadVia(t, "api", tlsListenerConfig(listen, admin, echo.addr(), newCert, newKey)) {
		t.Skip("reload refused: acceptable")
	}
	if got := servedCert(t, listen, "relay.test"); !bytes.Equal(got, newLeaf.Cert.Raw) {
		t.Errorf("reload accepted with new certificate files, but the listener still serves the old certificate\n%s", r.logs)
	}
}

// TestRefusedReloadKeepsCertificates: a reload that is refused ("the configuration in force is
// unchanged") must not have swapped the TLS listener's certificates; reloadLocked re-reads them before it
// checks the rest of the file.
func TestRefusedReloadKeepsCertificates(t *testing.T) {
	echo := startCountingEcho(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "reload CA")
	oldLeaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}})
	cert, key := oldLeaf.WriteFiles(t, dir, "leaf")
	listen, admin := freeAddr(t), freeAddr(t)
	r := startConfigRelay(t, tlsListenerConfig(listen, admin, echo.addr(), cert, key))
	// New contents at the same paths, and a file that changes the listener's address: refused.
	newLeaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}})
	newLeaf.WriteFiles(t, dir, "leaf")
	if r.reloadVia(t, "api", tlsListenerConfig(freeAddr(t), admin, echo.addr(), cert, key)) {
		t.Fatal("a reload that moves a listener was accepted")
	}
	if got := servedCert(t, listen, "relay.test"); !bytes.Equal(got, oldLeaf.Cert.Raw) {
		t.Errorf("reload refused (configuration in force said unchanged), yet the listener now serves the new certificate\n%s", r.logs)
	}
}
