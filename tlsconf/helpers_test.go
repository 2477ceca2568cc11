package tlsconf

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"
)

// logBuffer collects log output from several goroutines (WatchFiles logs
// from its own).
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newTestLogger() (*slog.Logger, *logBuffer) {
	b := &logBuffer{}
	return slog.New(slog.NewTextHandler(b, nil)), b
}

// handshakeResult is both ends of one handshake.
type handshakeResult struct {
	client, server       tls.ConnectionState
	clientErr, serverErr error
}

// handshake runs one TLS handshake over loopback TCP (kernel buffers, so
// neither side blocks writing an alert the other does not read). It waits
// for both ends: a TLS 1.3 server rejects a client certificate only after
// the client's handshake has returned.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) handshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var res handshakeResult
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			res.serverErr = err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, serverCfg)
		res.serverErr = tc.Handshake()
		res.server = tc.ConnectionState()
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(raw, clientCfg)
	res.clientErr = tc.Handshake()
	res.client = tc.ConnectionState()
	if res.clientErr != nil {
		raw.Close()
	}
	<-done
	return res
}

// leafOf returns the certificate the client was served, or nil.
func leafOf(st tls.ConnectionState) []byte {
	if len(st.PeerCertificates) == 0 {
		return nil
	}
	return st.PeerCertificates[0].Raw
}
