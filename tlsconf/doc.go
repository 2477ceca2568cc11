// Package tlsconf builds the crypto/tls configurations the relay uses:
// Server for TLS-terminating listeners (certificates chosen by SNI, reloaded
// without a restart) and Client for wss:// upstreams.
//
// Every configuration offers only "http/1.1" by ALPN: the relay carries
// WebSocket, whose upgrade is an HTTP/1.1 mechanism (RFC 6455 §4). A client
// that negotiated h2 would need RFC 8441 extended CONNECT, which the relay
// does not speak, so h2 is never offered.
//
// Cipher suites and curves are left at Go's defaults: they are already
// modern (AEAD-only for TLS 1.3, ECDHE-only for TLS 1.2 in the default list)
// and follow Go releases, which a hand-written list would not.
package tlsconf
