// Package wsecho is the WebSocket echo server that cmd/wsecho runs as the bundled upstream and that the
// tests and benchmarks put behind the relay: every message comes back as it came, text as text and
// binary as binary; pings get pongs and a close frame its own close code. A plain GET (no upgrade) gets a
// small page, so the relay's HTTP proxying can be seen in a browser too.
package wsecho

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/gorilla/websocket"
)

const page = `<!doctype html>
<title>wsecho</title>
<p>wsecho: a WebSocket echo server. This page came through plain HTTP; the line below through a WebSocket.</p>
<pre id=out>connecting…</pre>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/echo");
ws.onopen = () => ws.send("hello through the relay");
ws.onmessage = (e) => { document.getElementById("out").textContent = "echoed: " + e.data; };
ws.onerror = () => { document.getElementById("out").textContent = "websocket failed"; };
</script>
`

// SinkPath is the path on which the server discards what it receives instead of echoing it.
const SinkPath = "/sink"

// WhoamiPath is the path on which the server first says who it is and who it sees (an Identity as one
// JSON text message), then echoes like any other path: the fleet test (scripts/fleettest.sh) asks it
// which upstream a relay chose and which client address the relay passed on.
const WhoamiPath = "/whoami"

// Identity is the message a WebSocket on WhoamiPath gets first.
type Identity struct {
	// Server is the name the server was given (wsecho -name).
	Server string `json:"server"`
	// Peer is the address the connection came from: the relay's, behind a relay.
	Peer string `json:"peer"`
	// XForwardedFor and XRealIP are the request's headers: the client as the relay describes it.
	XForwardedFor string `json:"x_forwarded_for"`
	XRealIP       string `json:"x_real_ip"`
}

// Handler echoes WebSocket messages on every path but SinkPath (which discards them) and BulkPath (which
// echoes frames in large batches), and serves the page to plain GETs.
func Handler(log *slog.Logger) http.Handler {
	return NamedHandler("", log)
}

// NamedHandler is Handler for a server that tells its name on WhoamiPath.
func NamedHandler(name string, log *slog.Logger) http.Handler {
	upgrader := websocket.Upgrader{
		ReadBufferSize:  4096,
		WriteBufferSize: 4096,
		// The echo server is a test upstream: any origin may use it.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !websocket.IsWebSocketUpgrade(r) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			fmt.Fprint(w, page)
			return
		}
		c, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return // Upgrade has answered the client
		}
		defer c.Close()
		switch r.URL.Path {
		case SinkPath:
			// One-way streams (wsbench throughput -mode sink): read and discard at the socket, answer nothing.
			// Upgrade refuses a client that sent data before the handshake ended, so gorilla holds none.
			discard(c.NetConn())
			return
		case BulkPath:
			if err := echoFrames(c.NetConn()); err != nil {
				log.Debug("bulk echo ended", "client", r.RemoteAddr, "err", err)
			}
			return
		}
		if r.URL.Path == WhoamiPath {
			id, _ := json.Marshal(Identity{Server: name, Peer: r.RemoteAddr,
				XForwardedFor: r.Header.Get("X-Forwarded-For"), XRealIP: r.Header.Get("X-Real-IP")})
			if err := c.WriteMessage(websocket.TextMessage, id); err != nil {
				return
			}
		}
		c.SetCloseHandler(func(code int, text string) error {
			// Echo the close code, so a client can check it crossed the relay intact.
			msg := websocket.FormatCloseMessage(code, text)
			if code == websocket.CloseNoStatusReceived {
				msg = websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
			}
			_ = c.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
			return nil
		})
		for {
			kind, msg, err := c.ReadMessage()
			if err != nil {
				var ce *websocket.CloseError
				if !errors.As(err, &ce) {
					log.Debug("echo connection ended", "client", r.RemoteAddr, "err", err)
				}
				return
			}
			if err := c.WriteMessage(kind, msg); err != nil {
				return
			}
		}
	})
}
