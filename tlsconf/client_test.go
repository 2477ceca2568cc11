package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"testing"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// upstreamServer is a TLS server config for an upstream holding leaf, which
// records the SNI name it was sent.
func upstreamServer(t *testing.T, leaf *tlstest.Leaf, sni *string) *tls.Config {
	t.Helper()
	cert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"http/1.1"},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			*sni = hello.ServerName
			return nil, nil
		},
	}
}

// TestClient: each upstream TLS setting against a real handshake.
func TestClient(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "upstream CA")
	caFile := ca.WriteFile(t, dir, "ca.pem")
	otherCAFile := tlstest.NewCA(t, "other CA").WriteFile(t, dir, "other-ca.pem")
	upstream := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"up.example.com"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	nameOnly := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"up.example.com"}})

	tests := []struct {
		name     string
		spec     ClientSpec
		server   *tlstest.Leaf
		host     string // Config's argument
		wantSNI  string
		checkErr func(error) bool // nil: the handshake must succeed
	}{
		{name: "test CA", spec: ClientSpec{CAFile: caFile}, server: upstream,
			host: "up.example.com:443", wantSNI: "up.example.com"},
		{name: "wrong CA", spec: ClientSpec{CAFile: otherCAFile}, server: upstream,
			host: "up.example.com", wantSNI: "up.example.com",
			checkErr: func(err error) bool { return errors.As(err, new(x509.UnknownAuthorityError)) }},
		{name: "system roots do not trust a test CA", spec: ClientSpec{}, server: upstream,
			host: "up.example.com", wantSNI: "up.example.com",
			checkErr: func(err error) bool {
				// SystemRootsError where the machine has no CA bundle.
				return errors.As(err, new(x509.UnknownAuthorityError)) || errors.As(err, new(x509.SystemRootsError))
			}},
		{name: "name mismatch", spec: ClientSpec{CAFile: caFile}, server: upstream,
			host: "other.example.com", wantSNI: "other.example.com",
			checkErr: func(err error) bool { return errors.As(err, new(x509.HostnameError)) }},
		{name: "ServerName overrides an IP host", spec: ClientSpec{CAFile: caFile, ServerName: "up.example.com"}, server: nameOnly,
			host: "127.0.0.1:8443", wantSNI: "up.example.com"},
		{name: "IP host: no SNI, IP SAN verified", spec: ClientSpec{CAFile: caFile}, server: upstream,
			host: "127.0.0.1", wantSNI: ""},
		{name: "IP host without IP SAN fails", spec: ClientSpec{CAFile: caFile}, server: nameOnly,
			host: "127.0.0.1", wantSNI: "",
			checkErr: func(err error) bool { return errors.As(err, new(x509.HostnameError)) }},
		{name: "InsecureSkipVerify", spec: ClientSpec{InsecureSkipVerify: true}, server: nameOnly,
			host: "127.0.0.1", wantSNI: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := NewClient(tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			var sni string
			res := handshake(t, upstreamServer(t, tt.server, &sni), c.Config(tt.host))
			if sni != tt.wantSNI {
				t.Errorf("server saw SNI %q, want %q", sni, tt.wantSNI)
			}
			if tt.checkErr != nil {
				if res.clientErr == nil || !tt.checkErr(res.clientErr) {
					t.Fatalf("client error = %v (%T), want a verification failure", res.clientErr, res.clientErr)
				}
				return
			}
			if res.clientErr != nil {
				t.Fatal(res.clientErr)
			}
			if res.client.NegotiatedProtocol != "http/1.1" {
				t.Errorf("ALPN = %q, want http/1.1", res.client.NegotiatedProtocol)
			}
		})
	}
}

// TestClientCertificate: an upstream that requires a client certificate
// gets the configured one and verifies it; without one it refuses.
func TestClientCertificate(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	caFile := ca.WriteFile(t, dir, "ca.pem")
	upstream := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"up.example.com"}})
	clientCert, clientKey := ca.Issue(t, tlstest.LeafOptions{CommonName: "sockrelay", Client: true}).WriteFiles(t, dir, "client")

	var sni string
	serverCfg := upstreamServer(t, upstream, &sni)
	serverCfg.ClientAuth = tls.RequireAndVerifyClientCert
	serverCfg.ClientCAs = ca.Pool()

	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			c, err := NewClient(ClientSpec{CAFile: caFile, CertFile: clientCert, KeyFile: clientKey})
			if err != nil {
				t.Fatal(err)
			}
			cfg := c.Config("up.example.com")
			cfg.MaxVersion = version
			res := handshake(t, serverCfg, cfg)
			if res.clientErr != nil || res.serverErr != nil {
				t.Fatalf("handshake: client %v, server %v", res.clientErr, res.serverErr)
			}
			if got := res.server.PeerCertificates[0].Subject.CommonName; got != "sockrelay" {
				t.Errorf("upstream saw client certificate %q, want sockrelay", got)
			}

			without, err := NewClient(ClientSpec{CAFile: caFile})
			if err != nil {
				t.Fatal(err)
			}
			cfg = without.Config("up.example.com")
			cfg.MaxVersion = version
			res = handshake(t, serverCfg, cfg)
			if res.serverErr == nil {
				t.Error("the upstream accepted a client without a certificate")
			}
		})
	}
}

// TestClientErrors: each NewClient failure names the file or the setting.
func TestClientErrors(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	caFile := ca.WriteFile(t, dir, "ca.pem")
	certA, keyA := ca.Issue(t, tlstest.LeafOptions{CommonName: "a", Client: true}).WriteFiles(t, dir, "a")
	_, keyB := ca.Issue(t, tlstest.LeafOptions{CommonName: "b", Client: true}).WriteFiles(t, dir, "b")
	garbage := filepath.Join(dir, "garbage.pem")
	tlstest.WriteFileAtomic(t, garbage, []byte("not PEM"))
	missing := filepath.Join(dir, "missing.pem")

	tests := []struct {
		name string
		spec ClientSpec
		want string
	}{
		{"missing CA file", ClientSpec{CAFile: missing},
			"load upstream CA: read CA file: open " + missing + ": no such file or directory"},
		{"garbage CA file", ClientSpec{CAFile: garbage},
			"load upstream CA: certificate " + garbage + ": no PEM certificate found (expected a block starting with -----BEGIN CERTIFICATE-----)"},
		{"CA file and InsecureSkipVerify", ClientSpec{CAFile: caFile, InsecureSkipVerify: true},
			"upstream TLS: a CA file (" + caFile + ") and InsecureSkipVerify are both set; remove one"},
		{"key without certificate", ClientSpec{KeyFile: keyA},
			"upstream TLS: a client key file is set without its certificate file"},
		{"missing client key", ClientSpec{CertFile: certA, KeyFile: missing},
			"load client certificate: read key: open " + missing + ": no such file or directory"},
		{"mismatched client key", ClientSpec{CertFile: certA, KeyFile: keyB},
			"load client certificate: key " + keyB + " does not match certificate " + certA + " (the key belongs to another certificate)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewClient(tt.spec)
			if err == nil || err.Error() != tt.want {
				t.Errorf("error:\n got %v\nwant %s", err, tt.want)
			}
		})
	}
}

// TestClientConfig pins the settings and the host forms Config accepts.
func TestClientConfig(t *testing.T) {
	c, err := NewClient(ClientSpec{})
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]string{
		"up.example.com":      "up.example.com",
		"up.example.com:8443": "up.example.com",
		"10.0.0.1:443":        "10.0.0.1",
		"[::1]:443":           "::1",
		"[::1]":               "::1",
		"::1":                 "::1",
	} {
		cfg := c.Config(host)
		if cfg.ServerName != want {
			t.Errorf("Config(%q).ServerName = %q, want %q", host, cfg.ServerName, want)
		}
		if cfg.MinVersion != tls.VersionTLS12 || !slices.Equal(cfg.NextProtos, []string{"http/1.1"}) || cfg.RootCAs != nil || cfg.InsecureSkipVerify {
			t.Errorf("Config(%q) = MinVersion %x, NextProtos %q, RootCAs %v, Insecure %v", host, cfg.MinVersion, cfg.NextProtos, cfg.RootCAs, cfg.InsecureSkipVerify)
		}
	}
}
