package relay

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/tlsconf"
	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
	"github.com/sockrelay/sockrelay/upstream"
)

// tlsServerConfig is a TLS listener's settings with a certificate for relay.test from ca.
func tlsServerConfig(t *testing.T, ca *tlstest.CA) *tls.Config {
	t.Helper()
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"relay.test"}}).WriteFiles(t, t.TempDir(), "relay")
	srv, err := tlsconf.NewServer(tlsconf.ServerSpec{Certificates: []tlsconf.CertFiles{{Cert: cert, Key: key}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return srv.Config()
}

// TestTLSListener: a client through a TLS listener reaches a plain upstream; the tunnel is byte-exact
// both ways with half-close, runs on copy whatever the listener asked for (counted as a step down), and
// the upstream is told the client came over https.
func TestTLSListener(t *testing.T) {
	ca := tlstest.NewCA(t, "test CA")
	up := startUpstream(t)
	r := startRelay(t, DatapathAuto, []string{up.Addr})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.ServeListenerWith(ln, ListenerOptions{Name: "tls", TLS: tlsServerConfig(t, ca)})

	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c := tls.Client(raw, &tls.Config{ServerName: "relay.test", RootCAs: ca.Pool()})
	uc := make(chan *upstreamConn, 1)
	go func() { u := up.next(t); u.accept(t, []byte("first")); uc <- u }()
	c.Write(append([]byte(upgradeRequest("/")), "piped"...))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake over TLS: %v, %v", resp, err)
	}
	u := <-uc
	defer u.Close()
	if p := u.Req.Header.Get("X-Forwarded-Proto"); p != "https" {
		t.Errorf("upstream saw X-Forwarded-Proto %q, want https", p)
	}
	got := make([]byte, 5)
	if _, err := io.ReadFull(u.R, got); err != nil || string(got) != "piped" {
		t.Fatalf("upstream first bytes %q, %v", got, err)
	}
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "first" {
		t.Fatalf("client first bytes %q, %v", got, err)
	}
	ts := r.Tunnels().Tunnels()
	if len(ts) != 1 || ts[0].Datapath() != DatapathCopy || !ts[0].Info().TLS {
		t.Fatalf("tunnels %v; want one on copy, shown with TLS", ts)
	}
	// Copy is the TLS listener's datapath by design: the tunnel counts by datapath, not as a fallback.
	m := scrape(t, r)
	if !strings.Contains(m, `sockrelay_tunnels_total{datapath="copy",listener="tls",pool="default"} 1`) {
		t.Errorf("TLS tunnel not counted on copy:\n%s", grepLines(m, "tunnels_total"))
	}
	if n := metricSum(r.Reg, "sockrelay_datapath_fallbacks_total", nil); n != 0 {
		t.Errorf("TLS tunnel under datapath %s counted as %v fallbacks, want 0:\n%s", r.Server.cfg.Datapath, n, grepLines(m, "fallbacks"))
	}

	// 256 KiB each way, then half-close from the client: the upstream sees EOF after every byte, and its
	// own bytes still reach the client, then its FIN as a TLS close.
	want := make([]byte, 256<<10)
	rand.Read(want)
	go func() { c.Write(want); c.CloseWrite() }()
	gotUp, err := readAllWithin(u, u.R, 10*time.Second)
	if err != nil || !bytes.Equal(gotUp, want) {
		t.Fatalf("upstream got %d bytes, %v; want the 256 KiB then EOF", len(gotUp), err)
	}
	go func() { u.Write(want); u.CloseWrite() }()
	gotDown, err := readAllWithin(raw, br, 10*time.Second)
	if err != nil || !bytes.Equal(gotDown, want) {
		t.Fatalf("client got %d bytes, %v; want the 256 KiB then a clean TLS end", len(gotDown), err)
	}
	waitTunnelsGone(t, r)
}

// TestTLSUpstream: a wss pool: the relay speaks TLS to the upstream, verifying it against the pool's CA,
// and refuses an upstream whose certificate does not verify.
func TestTLSUpstream(t *testing.T) {
	ca := tlstest.NewCA(t, "upstream CA")
	cert, key := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"backend.test"}}).WriteFiles(t, t.TempDir(), "backend")
	srvTLS, err := tlsconf.NewServer(tlsconf.ServerSpec{Certificates: []tlsconf.CertFiles{{Cert: cert, Key: key}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	backend := serveEach(t, func(ln net.Listener) net.Listener { return tls.NewListener(ln, srvTLS.Config()) },
		func(c net.Conn) {
			br := bufio.NewReader(c)
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			c.Write([]byte(switchResponse(req)))
			io.Copy(c, br) // echo
		})
	caFile := ca.WriteFile(t, t.TempDir(), "ca.pem")
	for _, tc := range []struct {
		name   string
		spec   tlsconf.ClientSpec
		status int
	}{
		{"verified", tlsconf.ClientSpec{ServerName: "backend.test", CAFile: caFile}, http.StatusSwitchingProtocols},
		{"wrong name", tlsconf.ClientSpec{ServerName: "other.test", CAFile: caFile}, http.StatusBadGateway},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, err := tlsconf.NewClient(tc.spec)
			if err != nil {
				t.Fatal(err)
			}
			pool := newPool(t, "wss", []string{backend}, nil)
			r := startRelay(t, DatapathAuto, nil, func(c *Config) {
				c.Router = &pathRouter{routes: []pathRoute{{prefix: "/", pool: pool, upstreamTLS: client.Config}},
					pools: []*upstream.Pool{pool}}
			})
			c := dialRelay(t, r.Addr, upgradeRequest("/"), []byte("echo me"))
			if c.Resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", c.Resp.StatusCode, tc.status)
			}
			if tc.status != http.StatusSwitchingProtocols {
				if m := scrape(t, r); !strings.Contains(m, `reason="upstream_tls"}`) {
					t.Errorf("TLS failure not counted:\n%s", grepLines(m, "handshakes_failed"))
				}
				return
			}
			got := make([]byte, 7)
			if _, err := io.ReadFull(c.R, got); err != nil || string(got) != "echo me" {
				t.Errorf("echo through the wss upstream: %q, %v", got, err)
			}
			if ts := r.Tunnels().Tunnels(); len(ts) != 1 || ts[0].Datapath() != DatapathCopy {
				t.Errorf("tunnels %v; want one on copy", ts)
			}
		})
	}
}
