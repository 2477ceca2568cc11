package wsecho

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// dialEcho opens a WebSocket to path on srv with the given request headers.
func dialEcho(t *testing.T, srv *httptest.Server, path string, h http.Header) *websocket.Conn {
	t.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+path, h)
	if err != nil {
		t.Fatalf("dial %s: %v", path, err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	return c
}

// TestWhoami: on WhoamiPath the first message names the server and the client as the server saw it (its
// peer, X-Forwarded-For, X-Real-IP), and messages are echoed after it; other paths only echo.
func TestWhoami(t *testing.T) {
	srv := httptest.NewServer(NamedHandler("up2", slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)

	h := http.Header{"X-Forwarded-For": {"192.0.2.7, 10.0.0.1"}, "X-Real-Ip": {"192.0.2.7"}}
	c := dialEcho(t, srv, WhoamiPath, h)
	kind, msg, err := c.ReadMessage()
	if err != nil {
		t.Fatalf("read identity: %v", err)
	}
	var id Identity
	if kind != websocket.TextMessage || json.Unmarshal(msg, &id) != nil {
		t.Fatalf("first message on %s: kind %d %q, want an Identity in a text message", WhoamiPath, kind, msg)
	}
	want := Identity{Server: "up2", Peer: c.LocalAddr().String(), XForwardedFor: "192.0.2.7, 10.0.0.1", XRealIP: "192.0.2.7"}
	if id != want {
		t.Errorf("identity %+v, want %+v", id, want)
	}
	echoes(t, c, "after the identity")

	// Any other path echoes at once: the first message back is the client's own.
	echoes(t, dialEcho(t, srv, "/", h), "on /")
}

func echoes(t *testing.T, c *websocket.Conn, msg string) {
	t.Helper()
	if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatalf("send %q: %v", msg, err)
	}
	if _, got, err := c.ReadMessage(); err != nil || string(got) != msg {
		t.Fatalf("echo of %q: %q, %v", msg, got, err)
	}
}
