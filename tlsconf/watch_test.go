package tlsconf

import (
	"bytes"
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// TestWatchFiles: a renewed certificate on disk is picked up without a
// call to Reload; a broken one is logged, naming the file, and the previous
// certificate stays in service.
func TestWatchFiles(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "test CA")
	first := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	certPath, keyPath := first.WriteFiles(t, dir, "a")
	logger, logs := newTestLogger()
	s, err := NewServer(ServerSpec{Certificates: []CertFiles{{certPath, keyPath}}}, logger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		s.WatchFiles(ctx, 10*time.Millisecond)
	}()
	t.Cleanup(func() { cancel(); <-stopped })
	cfg := s.Config()
	served := func() []byte {
		res := handshake(t, cfg, &tls.Config{ServerName: "a.example.com", RootCAs: ca.Pool()})
		if res.clientErr != nil {
			t.Fatal(res.clientErr)
		}
		return leafOf(res.client)
	}
	// eventually polls, because the watcher runs on its own clock; the
	// deadline only turns a hang into a failure.
	eventually := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; log:\n%s", what, logs)
			}
		}
	}

	second := ca.Issue(t, tlstest.LeafOptions{DNSNames: []string{"a.example.com"}})
	second.WriteFiles(t, dir, "a")
	eventually("the renewed certificate", func() bool { return bytes.Equal(served(), second.Cert.Raw) })
	if !strings.Contains(logs.String(), `msg="tls certificates reloaded"`) {
		t.Errorf("no reload line in the log:\n%s", logs)
	}

	tlstest.WriteFileAtomic(t, keyPath, []byte("truncated"))
	want := `level=ERROR msg="tls certificate files changed but could not be loaded; still serving the previous certificates" err="load certificate: key ` + keyPath + `: no PEM private key found`
	eventually("the error line", func() bool { return strings.Contains(logs.String(), want) })
	if !bytes.Equal(served(), second.Cert.Raw) {
		t.Error("after a failed reload the previous certificate is not served")
	}
	// (A tick between WriteFiles' two renames may have logged a transient
	// mismatch earlier; only the broken key's line is counted.)
	if n := strings.Count(logs.String(), "no PEM private key found"); n != 1 {
		t.Errorf("the failure was logged %d times; once per change is enough", n)
	}
}
