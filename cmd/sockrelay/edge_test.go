package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/proxyproto"
	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// TestRunEdgeConfig: a file with the edge settings runs as it says: a TLS listener (wss through it), a
// route with an Origin allow-list, a per-address tunnel limit, and a tcp listener behind a PROXY
// protocol balancer.
func TestRunEdgeConfig(t *testing.T) {
	echo := startCountingEcho(t)
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "edge CA")
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, dir, "relay")
	tlsAddr, tcpAddr, passAddr, admin := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	backend := tlsEchoBackend(t, ca, "backend.test")
	r := startConfigRelay(t, fmt.Sprintf(`
admin: %s
listeners:
  - name: public
    address: %s
    tls: {certificates: [{cert: %s, key: %s}]}
    limits: {max_tunnels_per_ip: 2}
    routes:
      - {path_prefix: /app, pool: echo, origins: ["https://app.example.com"]}
      - {pool: echo}
  - name: raw
    address: %s
    type: tcp
    proxy_protocol: true
    routes: [{pool: echo}]
  - name: passthrough
    address: %s
    type: tcp
    tls_passthrough: true
    routes: [{host: backend.test, pool: backend}]
pools:
  echo:
    servers: [%s]
  backend:
    servers: [%s]
`, admin, tlsAddr, cert, key, tcpAddr, passAddr, echo.addr(), backend))
	_ = r

	d := websocket.Dialer{TLSClientConfig: &tls.Config{ServerName: "relay.test", RootCAs: ca.Pool()},
		HandshakeTimeout: 5 * time.Second}
	url := "wss://" + tlsAddr
	ws1, _, err := d.Dial(url+"/", nil)
	if err != nil {
		t.Fatalf("wss through the TLS listener: %v", err)
	}
	defer ws1.Close()
	echoThrough(t, ws1, "over tls")

	// Origins: refused, allowed.
	if _, resp, err := d.Dial(url+"/app", http.Header{"Origin": {"https://evil.example"}}); err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Errorf("foreign origin: %v, %v; want 403", resp, err)
	}
	ws2, _, err := d.Dial(url+"/app", http.Header{"Origin": {"https://app.example.com"}})
	if err != nil {
		t.Fatalf("allowed origin: %v", err)
	}
	defer ws2.Close()
	// Two tunnels from 127.0.0.1 are the listener's limit per address.
	if _, resp, err := d.Dial(url+"/", nil); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable ||
		resp.Header.Get("Retry-After") == "" {
		t.Errorf("third tunnel from one address: %v, %v; want 503 with Retry-After", resp, err)
	}

	// The tcp listener expects a PROXY header, then relays the raw stream: here a WebSocket handshake
	// written by hand, which the echo upstream answers.
	c, err := net.Dial("tcp", tcpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src, dst := netip.MustParseAddrPort("198.51.100.9:4000"), netip.MustParseAddrPort(tcpAddr)
	c.Write(proxyproto.AppendV1(nil, src, dst))
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 12)
	if _, err := c.Read(buf); err != nil || !strings.HasPrefix(string(buf), "HTTP/1.1 101") {
		t.Errorf("raw handshake through the tcp listener: %q, %v", buf, err)
	}
	// TLS passthrough: the relay routes by the SNI and never sees the plaintext; the backend's own
	// certificate reaches the client.
	pc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", passAddr,
		&tls.Config{ServerName: "backend.test", RootCAs: ca.Pool()})
	if err != nil {
		t.Fatalf("TLS through the passthrough listener: %v", err)
	}
	defer pc.Close()
	pc.SetDeadline(time.Now().Add(5 * time.Second))
	pc.Write([]byte("through"))
	got := make([]byte, 7)
	if _, err := io.ReadFull(pc, got); err != nil || string(got) != "through" {
		t.Errorf("echo through TLS passthrough: %q, %v", got, err)
	}
	if name := pc.ConnectionState().PeerCertificates[0].DNSNames[0]; name != "backend.test" {
		t.Errorf("the client got the certificate of %q; passthrough must leave the backend's", name)
	}
	if _, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", passAddr,
		&tls.Config{ServerName: "other.test", RootCAs: ca.Pool()}); err == nil {
		t.Error("a server name with no route got through")
	}

	var tunnels []struct {
		Client   string `json:"client"`
		Datapath string `json:"datapath"`
		TLS      bool   `json:"tls"`
	}
	if code, body := httpGet(t, "http://"+admin+"/debug/tunnels"); code != 200 || json.Unmarshal([]byte(body), &tunnels) != nil {
		t.Fatalf("/debug/tunnels: %d %s", code, body)
	}
	var sawTLS, sawProxied bool
	for _, tn := range tunnels {
		sawTLS = sawTLS || (tn.TLS && tn.Datapath == "copy")
		sawProxied = sawProxied || tn.Client == "198.51.100.9:4000"
	}
	if !sawTLS || !sawProxied {
		t.Errorf("/debug/tunnels %+v; want a TLS tunnel on copy and one from the PROXY header's client", tunnels)
	}
}

// tlsEchoBackend is a TLS server for name, issued by ca, that echoes what it reads.
func tlsEchoBackend(t *testing.T, ca *tlstest.CA, name string) string {
	t.Helper()
	leaf := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{name}})
	cert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}
