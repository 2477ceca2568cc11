package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sockrelay/sockrelay/internal/wsecho"
	"github.com/sockrelay/sockrelay/tlsconf/tlstest"
)

// seenRequest is what the echo upstream noted of one request that reached it.
type seenRequest struct {
	path, host, proto, userAgent string
	upgrade                      bool
}

// TestChromium: a real browser, headless Chromium driven over the DevTools protocol, loads the echo
// upstream's page over https through a TLS listener of the relay, the page's own script echoes a message
// over wss, and then a script of the test's sends text and binary messages (one of 100 KB) over wss and
// gets each back unchanged, with a clean close. The upstream saw the browser's requests with
// X-Forwarded-Proto https, and the tunnels ran on copy (TLS tunnels always do).
//
// Chromium trusts the leaf certificate's key through --ignore-certificate-errors-spki-list (honoured
// because --user-data-dir is given), rather than --ignore-certificate-errors, which would accept any
// certificate; the name relay.test maps to 127.0.0.1 through --host-resolver-rules, so the certificate's
// name is the one the browser asks for.
func TestChromium(t *testing.T) {
	path, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("chromium is not installed (scripts/deps.sh installs it): %v", err)
		}
		t.Skipf("chromium is not installed (Debian: apt-get install chromium, or run scripts/deps.sh as root): %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 45*time.Second)
	defer cancel()

	// The upstream: wsecho, noting each request.
	var (
		mu   sync.Mutex
		seen []seenRequest
	)
	echo := wsecho.Handler(slog.New(slog.DiscardHandler))
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, seenRequest{path: r.URL.Path, host: r.Host, proto: r.Header.Get("X-Forwarded-Proto"),
			userAgent: r.UserAgent(), upgrade: websocket.IsWebSocketUpgrade(r)})
		mu.Unlock()
		echo.ServeHTTP(w, r)
	}))
	t.Cleanup(upstream.Close)

	// The relay: one TLS listener for relay.test in front of the upstream.
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "sockrelay test CA")
	leaf := ca.Issue(t, tlstest.LeafOptions{CommonName: "relay.test", DNSNames: []string{"relay.test"}})
	certPath, keyPath := leaf.WriteFiles(t, dir, "relay.test")
	listen := freeAddr(t)
	r := startConfigRelay(t, fmt.Sprintf(`admin: %s
listeners:
  - name: public
    address: %s
    tls:
      certificates:
        - {cert: %s, key: %s}
    routes:
      - {pool: echo}
pools:
  echo:
    servers: [%s]
`, freeAddr(t), listen, certPath, keyPath, upstream.Listener.Addr()))
	_, port, err := net.SplitHostPort(listen)
	if err != nil {
		t.Fatal(err)
	}
	origin := "https://relay.test:" + port

	spki := sha256.Sum256(leaf.Cert.RawSubjectPublicKeyInfo)
	browser := startChromium(ctx, t, path,
		"--host-resolver-rules=MAP relay.test 127.0.0.1",
		"--ignore-certificate-errors-spki-list="+base64.StdEncoding.EncodeToString(spki[:]))
	var version struct {
		Product string `json:"product"`
	}
	if err := browser.cdp.call(ctx, "", "Browser.getVersion", nil, &version); err != nil {
		t.Fatal(err)
	}
	t.Logf("browser: %s", version.Product)
	page, err := browser.cdp.newPage(ctx)
	if err != nil {
		t.Fatalf("open a tab: %v\n%s", err, browser.stderr())
	}

	// The page, through the relay; its script opens wss://relay.test:PORT/echo and shows the echo.
	if err := browser.cdp.navigate(ctx, page, origin+"/"); err != nil {
		t.Fatalf("%v\nrelay log:\n%s", err, r.logs)
	}
	type pageState struct {
		Href, Title, Out, Protocol string
	}
	var state pageState
	var lastErr error
	for {
		lastErr = browser.cdp.evaluate(ctx, page, `({
			href: location.href,
			title: document.title,
			out: document.getElementById("out")?.textContent ?? "",
			protocol: performance.getEntriesByType("navigation")[0]?.nextHopProtocol ?? "",
		})`, &state)
		// Until the page has parsed #out, it reads ""; until its WebSocket has answered, "connecting…".
		if lastErr == nil && state.Href == origin+"/" && state.Out != "" && state.Out != "connecting…" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the page never showed its echo: last state %+v, %v\nrelay log:\n%s", state, lastErr, r.logs)
		case <-time.After(100 * time.Millisecond):
		}
	}
	want := pageState{Href: origin + "/", Title: "wsecho", Out: "echoed: hello through the relay", Protocol: "http/1.1"}
	if state != want {
		t.Fatalf("the page through the relay: %+v, want %+v\nrelay log:\n%s", state, want, r.logs)
	}
	// The page's WebSocket stays open: it is a live tunnel, on copy.
	var tunnels []tunnelInfo
	if err := json.Unmarshal([]byte(r.get(t, "/debug/tunnels", 200)), &tunnels); err != nil {
		t.Fatal(err)
	}
	if len(tunnels) != 1 || tunnels[0].Datapath != "copy" {
		t.Errorf("/debug/tunnels with the page open: %+v; want one tunnel, on copy", tunnels)
	}

	// The test's own messages: text (empty, ASCII, beyond ASCII, 70 000 characters: a 64-bit frame
	// length) and binary (all 256 byte values, 100 KB at random), echoed in order.
	big := make([]byte, 100_000)
	rand.Read(big)
	allBytes := make([]byte, 256)
	for i := range allBytes {
		allBytes[i] = byte(i)
	}
	type message struct {
		Text   *string `json:"text,omitempty"`
		Binary *string `json:"binary,omitempty"` // base64
	}
	text := func(s string) message { return message{Text: &s} }
	binary := func(b []byte) message { s := base64.StdEncoding.EncodeToString(b); return message{Binary: &s} }
	sent := []message{
		text(""), text("hello over wss"), text("héllo wörld ✓ 🎉"), text(strings.Repeat("0123456789", 7000)),
		binary(allBytes), binary(big),
	}
	sentJSON, err := json.Marshal(sent)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Messages []message
		Code     int
		Clean    bool
	}
	script := `new Promise((resolve, reject) => {
		const sent = ` + string(sentJSON) + `;
		const messages = [];
		const ws = new WebSocket("wss://relay.test:` + port + `/chromium");
		ws.binaryType = "arraybuffer";
		const timer = setTimeout(() => reject(new Error("timed out with " + messages.length + " messages back")), 20000);
		ws.onopen = () => {
			for (const m of sent) {
				ws.send(m.text !== undefined ? m.text : Uint8Array.from(atob(m.binary), (c) => c.charCodeAt(0)));
			}
		};
		ws.onmessage = (e) => {
			if (typeof e.data === "string") {
				messages.push({text: e.data});
			} else {
				const b = new Uint8Array(e.data);
				let s = "";
				for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
				messages.push({binary: btoa(s)});
			}
			if (messages.length === sent.length) ws.close(1000, "done");
		};
		ws.onerror = () => { clearTimeout(timer); reject(new Error("WebSocket error with " + messages.length + " messages back")); };
		ws.onclose = (e) => { clearTimeout(timer); resolve({messages, code: e.code, clean: e.wasClean}); };
	})`
	if err := browser.cdp.evaluate(ctx, page, script, &got); err != nil {
		t.Fatalf("the page's WebSocket: %v\nrelay log:\n%s", err, r.logs)
	}
	if len(got.Messages) != len(sent) {
		t.Fatalf("%d messages came back, want %d", len(got.Messages), len(sent))
	}
	for i := range sent {
		if w, g := describe(sent[i].Text, sent[i].Binary), describe(got.Messages[i].Text, got.Messages[i].Binary); g != w {
			t.Errorf("message %d came back as %s, want %s", i, g, w)
		}
	}
	if got.Code != websocket.CloseNormalClosure || !got.Clean {
		t.Errorf("the browser saw the close with code %d, clean %v; want %d, clean", got.Code, got.Clean, websocket.CloseNormalClosure)
	}

	// The test's tunnel is over: its end, logged, says copy, a close both ways, and the bytes.
	var payload uint64 // the messages' bytes; the frames around them add more
	for _, m := range sent {
		if m.Text != nil {
			payload += uint64(len(*m.Text))
		}
	}
	payload += uint64(len(allBytes) + len(big))
	var closed map[string]any
	waitFor(t, "the log line of the tunnel's end", func() bool {
		for _, l := range r.logLines(t, "tunnel closed") {
			if n, _ := l["bytes_to_upstream"].(float64); uint64(n) >= payload {
				closed = l
				return true
			}
		}
		return false
	})
	if closed["datapath"] != "copy" || closed["reason"] != "closed" {
		t.Errorf("the test's tunnel ended on datapath %v, reason %v; want copy, closed: %v", closed["datapath"], closed["reason"], closed)
	}
	if n, _ := closed["bytes_to_client"].(float64); uint64(n) < payload {
		t.Errorf("the test's tunnel carried %v bytes to the client, want at least %d: %v", closed["bytes_to_client"], payload, closed)
	}
	// TLS tunnels run on copy by design: counted there, not as fallbacks.
	if n := metricValue(t, r.get(t, "/metrics", 200), `sockrelay_tunnels_total{datapath="copy",listener="public",pool="echo"}`); n < 2 {
		t.Errorf(`sockrelay_tunnels_total{datapath="copy",listener="public",pool="echo"} is %v, want at least 2 (two TLS tunnels)`, n)
	}

	// What the upstream saw: the page and both WebSockets, from Chromium, as https.
	mu.Lock()
	defer mu.Unlock()
	wantSeen := map[string]bool{"/ page": false, "/echo websocket": false, "/chromium websocket": false}
	for _, s := range seen {
		key := s.path + " page"
		if s.upgrade {
			key = s.path + " websocket"
		}
		if s.path == "/favicon.ico" {
			continue
		}
		if _, ok := wantSeen[key]; !ok {
			t.Errorf("the upstream got an unexpected request: %+v", s)
			continue
		}
		wantSeen[key] = true
		if s.proto != "https" || s.host != "relay.test:"+port || !strings.Contains(s.userAgent, "HeadlessChrome") {
			t.Errorf("%s reached the upstream with X-Forwarded-Proto %q, Host %q, User-Agent %q; want https, relay.test:%s, HeadlessChrome",
				key, s.proto, s.host, s.userAgent, port)
		}
	}
	for key, ok := range wantSeen {
		if !ok {
			t.Errorf("the upstream never got %s", key)
		}
	}
}

// describe names a message for comparison: its text, or its binary's length and hash.
func describe(text, binary *string) string {
	switch {
	case text != nil && len(*text) > 100:
		return fmt.Sprintf("text of %d bytes, sha256 %x", len(*text), sha256.Sum256([]byte(*text)))
	case text != nil:
		return strconv.Quote(*text)
	case binary != nil:
		b, err := base64.StdEncoding.DecodeString(*binary)
		if err != nil {
			return "undecodable binary: " + err.Error()
		}
		return fmt.Sprintf("binary of %d bytes, sha256 %x", len(b), sha256.Sum256(b))
	}
	return "nothing"
}

// metricValue is the value of the sample named exactly so in a Prometheus text exposition, 0 when absent.
func metricValue(t *testing.T, exposition, sample string) float64 {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(exposition))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", sample, err)
			}
			return f
		}
	}
	return 0
}
