package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
)

// ClientSpec describes TLS towards a wss:// upstream.
type ClientSpec struct {
	// ServerName is sent as SNI and is the name the upstream's certificate
	// must hold. Empty: the upstream host from Config's argument.
	ServerName string
	// CAFile is a PEM bundle of the CAs to trust. Empty: the system roots.
	CAFile string
	// CertFile and KeyFile are a client certificate for upstreams that
	// require one (mutual TLS). Both or neither; an empty KeyFile with a
	// CertFile means the key is in CertFile.
	CertFile string
	KeyFile  string
	// InsecureSkipVerify accepts any upstream certificate. For tests and
	// emergencies only: it allows anyone on the path to read the traffic.
	InsecureSkipVerify bool
}

// Client holds what a wss:// upstream's TLS needs, loaded once. Files are
// read by NewClient, not per connection; a configuration reload makes a new
// Client.
type Client struct {
	serverName string
	roots      *x509.CertPool // nil: system roots
	certs      []tls.Certificate
	insecure   bool
}

// NewClient loads the CA bundle and the client certificate named in spec.
// Errors name the file and what is wrong with it.
func NewClient(spec ClientSpec) (*Client, error) {
	c := &Client{serverName: spec.ServerName, insecure: spec.InsecureSkipVerify}
	if spec.InsecureSkipVerify && spec.CAFile != "" {
		// Contradictory: the CA file would be silently ignored.
		return nil, fmt.Errorf("upstream TLS: a CA file (%s) and InsecureSkipVerify are both set; remove one", spec.CAFile)
	}
	if spec.CAFile != "" {
		pool, err := loadCAFile(spec.CAFile)
		if err != nil {
			return nil, fmt.Errorf("load upstream CA: %w", err)
		}
		c.roots = pool
	}
	switch {
	case spec.CertFile != "":
		cert, err := loadPair(spec.CertFile, spec.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load client certificate: %w", err)
		}
		c.certs = []tls.Certificate{cert}
	case spec.KeyFile != "":
		return nil, errors.New("upstream TLS: a client key file is set without its certificate file")
	}
	return c, nil
}

// Config returns a tls.Config for one connection to upstreamHost (a host
// name or IP address; a ":port" suffix and IPv6 brackets are dropped).
//
// The name verified, and sent as SNI, is ServerName, else the host. For an
// IP address crypto/tls sends no SNI, as RFC 6066 §3 forbids literal
// addresses there, but still verifies that the certificate holds the
// address as an IP SAN.
func (c *Client) Config(upstreamHost string) *tls.Config {
	name := c.serverName
	if name == "" {
		name = hostOnly(upstreamHost)
	}
	return &tls.Config{
		ServerName:         name,
		RootCAs:            c.roots,
		Certificates:       c.certs,
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"http/1.1"},
		InsecureSkipVerify: c.insecure,
	}
}

// hostOnly strips a port and IPv6 brackets: "[::1]:443" → "::1",
// "example.com:443" → "example.com".
func hostOnly(hostport string) string {
	if host, _, err := net.SplitHostPort(hostport); err == nil {
		return host
	}
	return strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]")
}
