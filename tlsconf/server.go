package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// CertFiles names one certificate and its key, both PEM. Cert may hold the
// chain (leaf first, then intermediates). An empty Key means the key is in
// the Cert file too.
type CertFiles struct {
	Cert string
	Key  string
}

// ServerSpec describes a TLS-terminating listener.
type ServerSpec struct {
	// Certificates are tried by SNI name; the first one is also the
	// default, served when the client sends no SNI or a name no
	// certificate holds (as nginx's default server).
	Certificates []CertFiles
	// MinVersion is "1.2" (the default when empty) or "1.3". Nothing older
	// is offered: TLS 1.0 and 1.1 are deprecated by RFC 8996.
	MinVersion string
}

// ErrNoCertificates is returned by NewServer for a spec without certificates.
var ErrNoCertificates = errors.New("no TLS certificates configured: a TLS listener needs at least one certificate and key")

// Server holds a listener's certificates and hands out tls.Configs that
// choose among them by SNI. The set is swapped atomically by Reload, so new
// handshakes use new certificates at once while established connections,
// which no longer consult the set, are untouched.
type Server struct {
	files      atomic.Pointer[[]CertFiles] // replaced by Staged.Install
	minVersion uint16
	log        *slog.Logger

	reloadMu sync.Mutex // serialises loads so an older load cannot replace a newer one
	set      atomic.Pointer[certSet]
}

// certSet is one immutable generation of loaded certificates.
type certSet struct {
	certs    []*tls.Certificate            // spec order; certs[0] is the default
	exact    map[string][]*tls.Certificate // lower-case DNS name → certificates holding it
	wildcard map[string][]*tls.Certificate // "*.b.example.com" is stored under "b.example.com"
	names    []string                      // DNS names in spec order, for logs
	stamps   []fileStamp                   // the files as they were just before reading, for WatchFiles
}

// NewServer loads every certificate in spec. Any load error fails it; the
// error names the file and what is wrong with it.
//
// An expired (or not yet valid) certificate is loaded anyway and logged as a
// warning on log: refusing it would turn a missed renewal into a listener
// that does not start at all, whereas serving it lets clients that pin or
// skip verification keep working and leaves the choice to them; nginx and
// HAProxy do the same. A nil log discards.
func NewServer(spec ServerSpec, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(spec.Certificates) == 0 {
		return nil, ErrNoCertificates
	}
	minVersion, err := parseMinVersion(spec.MinVersion)
	if err != nil {
		return nil, err
	}
	s := &Server{minVersion: minVersion, log: log}
	files := slices.Clone(spec.Certificates)
	s.files.Store(&files)
	set, err := s.load(files)
	if err != nil {
		return nil, err
	}
	s.set.Store(set)
	return s, nil
}

func parseMinVersion(v string) (uint16, error) {
	switch v {
	case "", "1.2":
		return tls.VersionTLS12, nil
	case "1.3":
		return tls.VersionTLS13, nil
	}
	return 0, fmt.Errorf("TLS minimum version %q is not supported: use \"1.2\" or \"1.3\"", v)
}

// load reads every pair of files into a new set; it does not install it.
func (s *Server) load(files []CertFiles) (*certSet, error) {
	set := &certSet{
		exact:    make(map[string][]*tls.Certificate),
		wildcard: make(map[string][]*tls.Certificate),
		stamps:   stampFiles(files),
	}
	now := time.Now()
	for _, f := range files {
		cert, err := loadPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("load certificate: %w", err)
		}
		s.warnValidity(f.Cert, cert.Leaf, now)
		c := &cert
		set.certs = append(set.certs, c)
		for _, name := range cert.Leaf.DNSNames {
			name = strings.ToLower(name)
			if !slices.Contains(set.names, name) {
				set.names = append(set.names, name)
			}
			if suffix, ok := strings.CutPrefix(name, "*."); ok {
				set.wildcard[suffix] = append(set.wildcard[suffix], c)
			} else {
				set.exact[name] = append(set.exact[name], c)
			}
		}
	}
	return set, nil
}

func (s *Server) warnValidity(path string, leaf *x509.Certificate, now time.Time) {
	switch {
	case now.After(leaf.NotAfter):
		s.log.Warn("tls certificate expired; serving it anyway", "cert", path, "names", leaf.DNSNames, "not_after", leaf.NotAfter)
	case now.Before(leaf.NotBefore):
		s.log.Warn("tls certificate not yet valid; serving it anyway", "cert", path, "names", leaf.DNSNames, "not_before", leaf.NotBefore)
	}
}

// Config returns a tls.Config for the listener: TLS 1.2 (or 1.3) minimum,
// Go's default cipher suites, ALPN "http/1.1" only (see the package doc), and
// GetCertificate reading the current certificate set, so one Config serves
// across reloads. Each call returns a new Config; the caller may adjust it
// (for example ClientAuth) before first use.
func (s *Server) Config() *tls.Config {
	return &tls.Config{
		MinVersion:     s.minVersion,
		NextProtos:     []string{"http/1.1"},
		GetCertificate: s.getCertificate,
	}
}

// getCertificate picks the certificate for a handshake: an exact DNS name
// match first, then a wildcard covering exactly one label (RFC 6125 §6.4.3:
// "*.b.example.com" matches "x.b.example.com" but neither "b.example.com"
// nor "y.x.b.example.com"), else the default. Names compare case-insensitively.
func (s *Server) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	set := s.set.Load()
	if name := strings.ToLower(hello.ServerName); name != "" {
		if c := pick(hello, set.exact[name]); c != nil {
			return c, nil
		}
		if i := strings.IndexByte(name, '.'); i > 0 {
			if c := pick(hello, set.wildcard[name[i+1:]]); c != nil {
				return c, nil
			}
		}
	}
	return set.certs[0], nil
}

// pick returns the first certificate the client can use, so that an RSA and
// an ECDSA certificate for one name can be served side by side; if the
// client supports none, the first, and the handshake fails on its merits.
func pick(hello *tls.ClientHelloInfo, certs []*tls.Certificate) *tls.Certificate {
	if len(certs) > 1 {
		for _, c := range certs {
			if hello.SupportsCertificate(c) == nil {
				return c
			}
		}
	}
	if len(certs) > 0 {
		return certs[0]
	}
	return nil
}

// Reload re-reads every certificate and key. If any pair fails, the current
// set stays in use and the error, naming the file, is returned: a half-updated
// set is never served. On success the new set replaces the old one
// atomically and one line is logged.
func (s *Server) Reload() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	set, err := s.load(*s.files.Load())
	if err != nil {
		return err
	}
	s.set.Store(set)
	s.log.Info("tls certificates reloaded", "certificates", len(set.certs), "names", set.names)
	return nil
}

// Staged is a set of certificates loaded from files but not yet served: a configuration reload stages
// every listener's certificates first and installs them only once nothing else can fail, so that a
// refused reload changes no certificate.
type Staged struct {
	s     *Server
	files []CertFiles
	set   *certSet
}

// Stage loads the certificates of files (which may name other files than the server's so far) without
// serving them. The error names the file that failed.
func (s *Server) Stage(files []CertFiles) (*Staged, error) {
	if len(files) == 0 {
		return nil, ErrNoCertificates
	}
	files = slices.Clone(files)
	set, err := s.load(files)
	if err != nil {
		return nil, err
	}
	return &Staged{s: s, files: files, set: set}, nil
}

// Install serves the staged certificates from now on, and makes their files the ones Reload and
// WatchFiles read.
func (st *Staged) Install() {
	st.s.reloadMu.Lock()
	defer st.s.reloadMu.Unlock()
	st.s.files.Store(&st.files)
	st.s.set.Store(st.set)
	st.s.log.Info("tls certificates reloaded", "certificates", len(st.set.certs), "names", st.set.names)
}

// Names returns the DNS names of the loaded certificates (wildcards as
// "*.example.com"), lower-case, in spec order, without duplicates. A
// certificate without DNS names is only reachable as the default.
func (s *Server) Names() []string {
	return slices.Clone(s.set.Load().names)
}
