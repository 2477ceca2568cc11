package tlsconf

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
)

// loadPair reads a certificate chain and its private key. keyPath may be
// empty, in which case the key is read from certPath (a combined PEM file,
// as HAProxy uses). Every error names the file it is about and says what is
// wrong with it.
func loadPair(certPath, keyPath string) (tls.Certificate, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("read certificate: %w", err)
	}
	chain, certs, err := parseChain(certPath, certPEM)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf := certs[0]
	keyPEM := certPEM
	if keyPath == "" {
		keyPath = certPath
	} else if keyPEM, err = os.ReadFile(keyPath); err != nil {
		return tls.Certificate{}, fmt.Errorf("read key: %w", err)
	}
	key, err := parseKey(keyPath, keyPEM)
	if err != nil {
		return tls.Certificate{}, err
	}
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return tls.Certificate{}, fmt.Errorf("key %s does not match certificate %s (the key belongs to another certificate)", keyPath, certPath)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// parseChain returns every CERTIFICATE block in data, as DER and parsed, in
// file order (for a chain: leaf first). Other block types (a key in a
// combined file) are skipped. At least one certificate is returned.
func parseChain(path string, data []byte) (chain [][]byte, certs []*x509.Certificate, err error) {
	for n := 1; ; {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("certificate %s: certificate %d in the file: %w", path, n, err)
		}
		chain = append(chain, block.Bytes)
		certs = append(certs, cert)
		n++
	}
	if len(certs) == 0 {
		return nil, nil, fmt.Errorf("certificate %s: no PEM certificate found (expected a block starting with -----BEGIN CERTIFICATE-----)", path)
	}
	return chain, certs, nil
}

// parseKey returns the first private key in data: PKCS #8 ("PRIVATE KEY"),
// PKCS #1 ("RSA PRIVATE KEY") or SEC 1 ("EC PRIVATE KEY"), the forms that
// openssl, certbot and cert-manager write.
func parseKey(path string, data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, fmt.Errorf("key %s: no PEM private key found (expected a block starting with -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)", path)
		}
		var key any
		var err error
		switch {
		case block.Type == "ENCRYPTED PRIVATE KEY" || block.Headers["Proc-Type"] == "4,ENCRYPTED":
			return nil, fmt.Errorf("key %s: the key is encrypted; decrypt it first (openssl pkey -in KEY -out KEY.plain)", path)
		case block.Type == "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case block.Type == "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case block.Type == "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		default:
			continue // certificates in a combined file, EC PARAMETERS
		}
		if err != nil {
			return nil, fmt.Errorf("key %s: %s block: %w", path, block.Type, err)
		}
		// RSA, ECDSA and Ed25519 keys are crypto.Signers; an X25519 key
		// (crypto/ecdh) is not and cannot sign a handshake.
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("key %s: %T cannot sign; use an RSA, ECDSA or Ed25519 key", path, key)
		}
		return signer, nil
	}
}

// loadCAFile reads a PEM bundle of CA certificates. Unlike
// x509.CertPool.AppendCertsFromPEM, which skips blocks it cannot parse, a
// bad block is an error: a silently shortened bundle fails later, far from
// its cause.
func loadCAFile(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA file: %w", err)
	}
	_, certs, err := parseChain(path, data)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, cert := range certs {
		pool.AddCert(cert)
	}
	return pool, nil
}
