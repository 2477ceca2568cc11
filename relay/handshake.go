package relay

import (
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// websocketGUID is the fixed string RFC 6455 section 1.3 appends to the client's key.
const websocketGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// AcceptKey returns the Sec-WebSocket-Accept value that answers a Sec-WebSocket-Key (RFC 6455 section 4.2.2).
func AcceptKey(key string) string {
	h := sha1.New()
	h.Write([]byte(key))
	h.Write([]byte(websocketGUID))
	return base64.StdEncoding.EncodeToString(h.Sum(nil))
}

// hopHeaders are the hop-by-hop headers of RFC 9110 section 7.6.1 (plus the legacy ones proxies still see):
// they describe one connection, so a proxy must not forward them.
var hopHeaders = []string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// removeHopHeaders deletes the hop-by-hop headers and every header the Connection header names.
func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for v != "" {
			var name string
			name, v, _ = strings.Cut(v, ",")
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
}

// isUpgradeRequest reports whether a request asks to switch protocols at all. Such a request is never handed
// to the plain HTTP proxy: it is either a valid WebSocket handshake or it is refused.
func isUpgradeRequest(r *http.Request) bool {
	return len(r.Header["Upgrade"]) > 0 || httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade")
}

// A refusal is why a client's connection will not become a tunnel, whichever front it came through: the
// reason label counted in sockrelay_handshakes_failed_total, the HTTP status and headers a WebSocket client
// gets, and when to come back. The fronts map it at their edge: the WebSocket front answers with the status
// (and Retry-After), the tcp front closes the connection; both count and log the reason.
type refusal struct {
	status int
	reason string
	msg    string
	header http.Header
	// retryAfter, when positive, is sent as Retry-After (whole seconds, at least 1): a limit that will
	// let the client in again later.
	retryAfter time.Duration
	// local says the relay itself failed (out of descriptors, memory or ports), not the upstream: passive
	// health is not told, and no other server is tried.
	local bool
}

func (e *refusal) Error() string { return e.msg }

func badRequest(format string, args ...any) *refusal {
	return &refusal{status: http.StatusBadRequest, reason: "bad_request", msg: fmt.Sprintf(format, args...)}
}

// validateUpgrade checks a client's upgrade request against RFC 6455 section 4.2.1. It returns the
// Sec-WebSocket-Key on success.
func validateUpgrade(r *http.Request) (string, *refusal) {
	if r.Method != http.MethodGet {
		return "", badRequest("websocket handshake must use GET, not %s", r.Method)
	}
	if r.ProtoMajor != 1 || r.ProtoMinor != 1 {
		return "", badRequest("websocket handshake must use HTTP/1.1, not %s", r.Proto)
	}
	if !httpguts.HeaderValuesContainsToken(r.Header["Upgrade"], "websocket") {
		return "", badRequest("only websocket upgrades are relayed: Upgrade header must contain \"websocket\"")
	}
	if !httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade") {
		return "", badRequest("Connection header must contain \"upgrade\"")
	}
	// A body would be sent on as raw bytes ahead of the tunnel: refuse it rather than guess at framing.
	if r.ContentLength != 0 || len(r.TransferEncoding) > 0 {
		return "", badRequest("websocket handshake must not carry a body")
	}
	if v := r.Header.Values("Sec-WebSocket-Version"); len(v) != 1 || strings.TrimSpace(v[0]) != "13" {
		return "", &refusal{
			status: http.StatusUpgradeRequired,
			reason: "bad_version",
			msg:    "Sec-WebSocket-Version must be 13",
			header: http.Header{"Sec-Websocket-Version": {"13"}},
		}
	}
	keys := r.Header.Values("Sec-WebSocket-Key")
	if len(keys) != 1 {
		return "", badRequest("exactly one Sec-WebSocket-Key header is required, got %d", len(keys))
	}
	key := strings.TrimSpace(keys[0])
	raw, err := base64.StdEncoding.DecodeString(key)
	if err != nil || len(raw) != 16 {
		return "", badRequest("Sec-WebSocket-Key must be 16 bytes in base64")
	}
	return key, nil
}

// validateSwitch checks the upstream's answer to a forwarded handshake (RFC 6455 section 4.1, the client's
// checks). Only a response that passes it opens a tunnel.
func validateSwitch(resp *http.Response, key string) error {
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fmt.Errorf("status %d is not 101", resp.StatusCode)
	}
	if !httpguts.HeaderValuesContainsToken(resp.Header["Upgrade"], "websocket") {
		return fmt.Errorf("101 without \"Upgrade: websocket\" (got %q)", resp.Header.Get("Upgrade"))
	}
	if !httpguts.HeaderValuesContainsToken(resp.Header["Connection"], "upgrade") {
		return fmt.Errorf("101 without \"Connection: upgrade\" (got %q)", resp.Header.Get("Connection"))
	}
	if got, want := resp.Header.Get("Sec-WebSocket-Accept"), AcceptKey(key); got != want {
		return fmt.Errorf("101 with Sec-WebSocket-Accept %q, want %q", got, want)
	}
	return nil
}
