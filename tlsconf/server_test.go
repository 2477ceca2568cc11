package tlsconf

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// TestSNISelection: the certificate served depends on the SNI name: exact
// name, then a one-label wildcard, else the first certificate.
func TestSNISelection(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	def := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"default.example.com"}})
	a := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	wild := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"*.b.example.com"}})
	var spec ServerSpec
	for _, l := range []struct {
		base string
		leaf *tlstest.Leaf
	}{{"default", def}, {"a", a}, {"wild", wild}} {
		c, k := l.leaf.WriteFiles(t, dir, l.base)
		spec.Certificates = append(spec.Certificates, CertFiles{Cert: c, Key: k})
	}
	s, err := NewServer(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := s.Names(), []string{"default.example.com", "a.example.com", "*.b.example.com"}; !slices.Equal(got, want) {
		t.Errorf("Names() = %q, want %q", got, want)
	}

	tests := []struct {
		sni  string
		want *tlstest.Leaf
	}{
		{"a.example.com", a},
		{"A.Example.COM", a}, // DNS names are case-insensitive
		{"x.b.example.com", wild},
		{"b.example.com", def},     // a wildcard does not match its own base
		{"y.x.b.example.com", def}, // nor two labels
		{"other.org", def},
		{"", def}, // no SNI
	}
	for _, tt := range tests {
		t.Run("sni="+tt.sni, func(t *testing.T) {
			// Skip verification: the default cases are name mismatches by
			// design; what is checked is which leaf was served.
			res := handshake(t, s.Config(), &tls.Config{ServerName: tt.sni, InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
			if res.clientErr != nil || res.serverErr != nil {
				t.Fatalf("handshake: client %v, server %v", res.clientErr, res.serverErr)
			}
			if !bytes.Equal(leafOf(res.client), tt.want.Cert.Raw) {
				t.Errorf("served %v, want %v", res.client.PeerCertificates[0].DNSNames, tt.want.Cert.DNSNames)
			}
			if res.client.NegotiatedProtocol != "http/1.1" {
				t.Errorf("ALPN = %q, want http/1.1", res.client.NegotiatedProtocol)
			}
		})
	}

	t.Run("verified", func(t *testing.T) {
		res := handshake(t, s.Config(), &tls.Config{ServerName: "x.b.example.com", RootCAs: ca.Pool()})
		if res.clientErr != nil {
			t.Fatalf("a verifying client rejected the wildcard certificate: %v", res.clientErr)
		}
	})
	t.Run("h2 only", func(t *testing.T) {
		// A client that can only speak h2 cannot carry a WebSocket upgrade
		// here, and is told so at the handshake.
		res := handshake(t, s.Config(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if res.serverErr == nil || !strings.Contains(res.serverErr.Error(), "unsupported application protocols") {
			t.Errorf("server error = %v, want unsupported application protocols", res.serverErr)
		}
	})
}

// TestSNIPrefersSupportedKey: two certificates for one name, the client
// gets the first one it can use.
func TestSNIPrefersSupportedKey(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	first := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	second := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	c1, k1 := first.WriteFiles(t, dir, "first")
	c2, k2 := second.WriteFiles(t, dir, "second")
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{c1, k1}, {c2, k2}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	res := handshake(t, s.Config(), &tls.Config{ServerName: "a.example.com", RootCAs: ca.Pool()})
	if res.clientErr != nil {
		t.Fatal(res.clientErr)
	}
	if !bytes.Equal(leafOf(res.client), first.Cert.Raw) {
		t.Error("with two usable certificates for one name, the first in the spec should be served")
	}
	if got := s.Names(); !slices.Equal(got, []string{"a.example.com"}) {
		t.Errorf("Names() = %q, want one a.example.com", got)
	}
}

// TestMinVersion: "1.2" (the default) refuses TLS 1.1 clients, "1.3"
// refuses TLS 1.2 clients.
func TestMinVersion(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	c, k := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}}).WriteFiles(t, dir, "a")
	tests := []struct {
		min       string
		clientMax uint16
		ok        bool
	}{
		{"", tls.VersionTLS11, false},
		{"", tls.VersionTLS12, true},
		{"1.2", tls.VersionTLS11, false},
		{"1.2", tls.VersionTLS12, true},
		{"1.2", tls.VersionTLS13, true},
		{"1.3", tls.VersionTLS12, false},
		{"1.3", tls.VersionTLS13, true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("min=%q/client=%s", tt.min, tls.VersionName(tt.clientMax)), func(t *testing.T) {
			s, err := NewServer(ServerSpec{Certificates: []CertFiles{{c, k}}, MinVersion: tt.min}, nil)
			if err != nil {
				t.Fatal(err)
			}
			res := handshake(t, s.Config(), &tls.Config{
				ServerName: "a.example.com", RootCAs: ca.Pool(),
				MinVersion: tls.VersionTLS10, MaxVersion: tt.clientMax,
			})
			if tt.ok {
				if res.clientErr != nil || res.serverErr != nil {
					t.Fatalf("handshake: client %v, server %v", res.clientErr, res.serverErr)
				}
				if res.client.Version != tt.clientMax {
					t.Errorf("negotiated %s, want %s", tls.VersionName(res.client.Version), tls.VersionName(tt.clientMax))
				}
				return
			}
			if res.serverErr == nil || !strings.Contains(res.serverErr.Error(), "unsupported versions") {
				t.Errorf("server error = %v, want a refusal of the client's versions", res.serverErr)
			}
			if res.clientErr == nil {
				t.Error("client handshake succeeded")
			}
		})
	}
}

// TestReload: a reload with new files serves the new certificate at once
// and leaves established connections alone; a reload that fails on any
// file returns an error naming it and keeps serving the whole old set.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	oldA := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	oldB := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"b.example.com"}})
	certA, keyA := oldA.WriteFiles(t, dir, "a")
	certB, keyB := oldB.WriteFiles(t, dir, "b")
	logger, logs := newTestLogger()
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{certA, keyA}, {certB, keyB}}}, logger)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.Config() // one Config across reloads, as a listener keeps it
	served := func(t *testing.T, name string) []byte {
		t.Helper()
		res := handshake(t, cfg, &tls.Config{ServerName: name, RootCAs: ca.Pool()})
		if res.clientErr != nil {
			t.Fatalf("handshake for %s: %v", name, res.clientErr)
		}
		return leafOf(res.client)
	}

	// A connection established before the reload.
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	established, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "a.example.com", RootCAs: ca.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { established.Close() })
	echo := func(b byte) {
		t.Helper()
		established.SetDeadline(time.Now().Add(10 * time.Second))
		got := []byte{0}
		if _, err := established.Write([]byte{b}); err != nil {
			t.Fatalf("established connection: write: %v", err)
		}
		if _, err := established.Read(got); err != nil || got[0] != b {
			t.Fatalf("established connection: read %q, %v", got, err)
		}
	}
	echo('1')

	newA := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	newA.WriteFiles(t, dir, "a")
	if got := served(t, "a.example.com"); !bytes.Equal(got, oldA.Cert.Raw) {
		t.Fatal("new files served before Reload")
	}
	if err := s.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if got := served(t, "a.example.com"); !bytes.Equal(got, newA.Cert.Raw) {
		t.Error("after Reload the old certificate is still served")
	}
	if !strings.Contains(logs.String(), `msg="tls certificates reloaded" certificates=2 names="[a.example.com b.example.com]"`) {
		t.Errorf("no reload line in the log:\n%s", logs)
	}
	echo('2')

	// A third certificate for a, and a broken key for b: all or nothing.
	newerA := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	newerA.WriteFiles(t, dir, "a")
	tlstest.WriteFileAtomic(t, keyB, []byte("not a key\n"))
	err = s.Reload()
	want := fmt.Sprintf("load certificate: key %s: no PEM private key found (expected a block starting with -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)", keyB)
	if err == nil || err.Error() != want {
		t.Fatalf("Reload with a broken key:\n got %v\nwant %s", err, want)
	}
	if got := served(t, "a.example.com"); !bytes.Equal(got, newA.Cert.Raw) {
		t.Error("a failed Reload replaced a's certificate: the set must be swapped whole or not at all")
	}
	if got := served(t, "b.example.com"); !bytes.Equal(got, oldB.Cert.Raw) {
		t.Error("after a failed Reload b's old certificate is not served")
	}
	echo('3')
}

// TestReloadConcurrent: handshakes racing reloads always get a complete
// certificate (run under -race, this also checks the swap is atomic).
func TestReloadConcurrent(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	leaves := []*tlstest.Leaf{
		ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}}),
		ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}}),
	}
	c, k := leaves[0].WriteFiles(t, dir, "a")
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{c, k}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 10 {
			leaves[i%2].WriteFiles(t, dir, "a")
			if err := s.Reload(); err != nil {
				t.Error(err)
			}
		}
	})
	for range 10 {
		res := handshake(t, s.Config(), &tls.Config{ServerName: "a.example.com", RootCAs: ca.Pool()})
		if res.clientErr != nil {
			t.Fatal(res.clientErr)
		}
	}
	wg.Wait()
}

// TestLoadErrors: each load failure says which file and what is wrong.
func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	certA, keyA := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}}).WriteFiles(t, dir, "a")
	_, keyB := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"b.example.com"}}).WriteFiles(t, dir, "b")
	garbage := filepath.Join(dir, "garbage.pem")
	tlstest.WriteFileAtomic(t, garbage, []byte("hello, I am not PEM\n"))
	badDER := filepath.Join(dir, "bad-der.crt")
	tlstest.WriteFileAtomic(t, badDER, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	encrypted := filepath.Join(dir, "encrypted.key")
	tlstest.WriteFileAtomic(t, encrypted, []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"))
	missing := filepath.Join(dir, "missing.pem")

	tests := []struct {
		name string
		spec ServerSpec
		want string
	}{
		{"no certificates", ServerSpec{},
			"no TLS certificates configured: a TLS listener needs at least one certificate and key"},
		{"bad min version", ServerSpec{Certificates: []CertFiles{{certA, keyA}}, MinVersion: "1.1"},
			`TLS minimum version "1.1" is not supported: use "1.2" or "1.3"`},
		{"missing certificate", ServerSpec{Certificates: []CertFiles{{missing, keyA}}},
			"load certificate: read certificate: open " + missing + ": no such file or directory"},
		{"missing key", ServerSpec{Certificates: []CertFiles{{certA, missing}}},
			"load certificate: read key: open " + missing + ": no such file or directory"},
		{"garbage certificate", ServerSpec{Certificates: []CertFiles{{garbage, keyA}}},
			"load certificate: certificate " + garbage + ": no PEM certificate found (expected a block starting with -----BEGIN CERTIFICATE-----)"},
		{"certificate block not DER", ServerSpec{Certificates: []CertFiles{{badDER, keyA}}},
			"load certificate: certificate " + badDER + ": certificate 1 in the file: x509: malformed certificate"},
		{"garbage key", ServerSpec{Certificates: []CertFiles{{certA, garbage}}},
			"load certificate: key " + garbage + ": no PEM private key found (expected a block starting with -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"},
		{"encrypted key", ServerSpec{Certificates: []CertFiles{{certA, encrypted}}},
			"load certificate: key " + encrypted + ": the key is encrypted; decrypt it first (openssl pkey -in KEY -out KEY.plain)"},
		{"mismatched key", ServerSpec{Certificates: []CertFiles{{certA, keyB}}},
			"load certificate: key " + keyB + " does not match certificate " + certA + " (the key belongs to another certificate)"},
		{"second pair bad", ServerSpec{Certificates: []CertFiles{{certA, keyA}, {certA, keyB}}},
			"load certificate: key " + keyB + " does not match certificate " + certA + " (the key belongs to another certificate)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := NewServer(tt.spec, nil)
			if err == nil {
				t.Fatalf("NewServer succeeded (%v)", s.Names())
			}
			if err.Error() != tt.want {
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
		})
	}
	if _, err := NewServer(ServerSpec{}, nil); !errors.Is(err, ErrNoCertificates) {
		t.Errorf("empty spec: %v, want ErrNoCertificates", err)
	}
}

// TestExpiredCertificateLoadsWithWarning: an expired certificate is served
// (a missed renewal must not stop the listener) and a warning names it.
func TestExpiredCertificateLoadsWithWarning(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	expired := ca.Issue(t, tlstest.LeafOptions{
		DNSNames:  []string{"old.example.com"},
		NotBefore: time.Now().Add(-48 * time.Hour),
		NotAfter:  time.Now().Add(-24 * time.Hour),
	})
	c, k := expired.WriteFiles(t, dir, "old")
	logger, logs := newTestLogger()
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{c, k}}}, logger)
	if err != nil {
		t.Fatalf("an expired certificate should load: %v", err)
	}
	if want := `level=WARN msg="tls certificate expired; serving it anyway" cert=` + c + ` names=[old.example.com]`; !strings.Contains(logs.String(), want) {
		t.Errorf("log lacks %q:\n%s", want, logs)
	}
	res := handshake(t, s.Config(), &tls.Config{ServerName: "old.example.com", InsecureSkipVerify: true})
	if res.clientErr != nil || !bytes.Equal(leafOf(res.client), expired.Cert.Raw) {
		t.Errorf("expired certificate not served: %v", res.clientErr)
	}
}

// TestKeyFormats: the key encodings openssl, certbot and cert-manager
// write, and a combined certificate+key file, all load.
func TestKeyFormats(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	leaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	certPath, pkcs8Path := leaf.WriteFiles(t, dir, "a")
	sec1Path := filepath.Join(dir, "sec1.key")
	tlstest.WriteFileAtomic(t, sec1Path, sec1PEM(t, leaf.KeyPEM))
	combined := filepath.Join(dir, "combined.pem")
	tlstest.WriteFileAtomic(t, combined, append(append([]byte{}, leaf.KeyPEM...), leaf.CertPEM...))

	for _, tt := range []struct {
		name string
		pair CertFiles
	}{
		{"PKCS #8", CertFiles{certPath, pkcs8Path}},
		{"SEC 1 EC PRIVATE KEY", CertFiles{certPath, sec1Path}},
		{"combined file, key first", CertFiles{Cert: combined}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := NewServer(ServerSpec{Certificates: []CertFiles{tt.pair}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			res := handshake(t, s.Config(), &tls.Config{ServerName: "a.example.com", RootCAs: ca.Pool()})
			if res.clientErr != nil {
				t.Fatal(res.clientErr)
			}
		})
	}
}

// TestConfigDefaults pins the settings the package doc promises.
func TestConfigDefaults(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	c, k := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}}).WriteFiles(t, dir, "a")
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{c, k}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.Config()
	if cfg.MinVersion != tls.VersionTLS12 || cfg.CipherSuites != nil || !slices.Equal(cfg.NextProtos, []string{"http/1.1"}) || cfg.GetCertificate == nil || cfg.Certificates != nil {
		t.Errorf("Config() = MinVersion %x, CipherSuites %v, NextProtos %q, Certificates %d", cfg.MinVersion, cfg.CipherSuites, cfg.NextProtos, len(cfg.Certificates))
	}
	if s.Config() == cfg {
		t.Error("Config() returned the same *tls.Config twice; callers may modify theirs")
	}
}

// sec1PEM re-encodes a PKCS #8 ECDSA key as an "EC PRIVATE KEY" block.
func sec1PEM(t *testing.T, pkcs8PEM []byte) []byte {
	t.Helper()
	block, _ := pem.Decode(pkcs8PEM)
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

// TestStageInstall: staged certificates are not served until installed; installing them switches the
// files Reload reads; staging a broken file fails, naming it, and changes nothing.
func TestStageInstall(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	oldLeaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	newLeaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	oldCert, oldKey := oldLeaf.WriteFiles(t, dir, "old")
	newCert, newKey := newLeaf.WriteFiles(t, dir, "new")
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{oldCert, oldKey}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.Config()
	served := func() []byte {
		t.Helper()
		res := handshake(t, cfg, &tls.Config{ServerName: "a.example.com", RootCAs: ca.Pool()})
		if res.clientErr != nil {
			t.Fatal(res.clientErr)
		}
		return leafOf(res.client)
	}
	if _, err := s.Stage([]CertFiles{{newCert, dir + "/missing.key"}}); err == nil || !strings.Contains(err.Error(), "missing.key") {
		t.Errorf("staging a missing key: %v; want an error naming it", err)
	}
	st, err := s.Stage([]CertFiles{{newCert, newKey}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(served(), oldLeaf.Cert.Raw) {
		t.Fatal("staged certificates served before Install")
	}
	st.Install()
	if !bytes.Equal(served(), newLeaf.Cert.Raw) {
		t.Fatal("installed certificates not served")
	}
	// Reload now reads the new files: rewriting them is picked up.
	newer := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	newer.WriteFiles(t, dir, "new")
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(served(), newer.Cert.Raw) {
		t.Error("Reload after Install did not read the installed files")
	}
}
