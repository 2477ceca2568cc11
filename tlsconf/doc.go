// Package tlsconf builds the crypto/tls configurations the relay uses:
// Server for TLS-terminating listeners (certificates chosen by SNI, reloaded
// without a restart), Client for wss:// upstreams, and PeekClientHello for
// TLS passthrough, which routes on the SNI name without terminating TLS.
//
// Every configuration offers only "http/1.1" by ALPN: the relay carries
// WebSocket, whose upgrade is an HTTP/1.1 mechanism (RFC 6455 §4). A client
// that negotiated h2 would need RFC 8441 extended CONNECT, which the relay
// does not speak, so h2 is never offered.
//
// Cipher suites and curves are left at Go's defaults: they are already
// modern (AEAD-only for TLS 1.3; ECDHE-only for TLS 1.2, RSA key exchange
// and 3DES being off unless GODEBUG tlsrsakex=1 or tls3des=1 turns them back
// on) and follow Go releases, which a hand-written list would not.
package tlsconf
