package relay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
)

// The interop tests put the relay between gorilla/websocket and a WebSocket implementation nobody here
// wrote, Python's websockets (Debian's python3-websockets), in both directions.

// python is the interpreter the interop peers run on: Debian's, the one python3-websockets installs into.
const python = "/usr/bin/python3"

// interopTimeout bounds every step of an interop exchange and every Python process, so a hang fails the
// test instead of blocking it.
const interopTimeout = 30 * time.Second

// interopSizes are the message sizes both directions exchange: the edges of RFC 6455's 7-bit, 16-bit and
// 64-bit payload length encodings, and 1 MiB. testdata/ws_client.py sends the same list.
var interopSizes = []int{0, 1, 125, 126, 65535, 65536, 1 << 20}

// requirePythonWebsockets fails (never skips) when the Python peer cannot run: CI must not go green
// without the interop tests.
func requirePythonWebsockets(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, python, "-c", "import websockets; print(websockets.__version__)").CombinedOutput()
	if err != nil {
		t.Fatalf("the interop tests need %s with Python's websockets library (%v: %s); install it with: "+
			"apt-get install python3-websockets", python, err, bytes.TrimSpace(out))
	}
	t.Logf("peer: python websockets %s", bytes.TrimSpace(out))
}

// startPythonEchoServer runs testdata/ws_echo_server.py until the test ends and returns its address.
func startPythonEchoServer(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	cmd := exec.CommandContext(ctx, python, filepath.Join("testdata", "ws_echo_server.py"))
	cmd.WaitDelay = 5 * time.Second
	stderr := &syncbuf.Buffer{}
	cmd.Stderr = stderr
	// The server exits at EOF on stdin: if this process dies without its cleanups, so does the server.
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start the python echo server: %v", err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("python echo server stderr:\n%s", stderr.String())
		}
	})
	port := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		port <- strings.TrimSpace(line)
	}()
	select {
	case p := <-port:
		if p == "" {
			t.Fatalf("python echo server exited without printing its port; stderr:\n%s", stderr.String())
		}
		return "127.0.0.1:" + p
	case <-time.After(interopTimeout):
		t.Fatalf("python echo server printed no port within %v; stderr:\n%s", interopTimeout, stderr.String())
		return ""
	}
}

// utf8Text is valid UTF-8 of exactly n bytes, mostly multi-byte runes (2, 3 and 4 bytes), padded with
// ASCII where the next rune would not fit.
func utf8Text(n int) string {
	const runes = "ünïcødé ✓ 日本語 🙂 "
	var b strings.Builder
	for b.Len() < n {
		for _, r := range runes {
			if b.Len()+utf8.RuneLen(r) > n {
				break
			}
			b.WriteRune(r)
		}
		if b.Len()+utf8.UTFMax > n {
			b.WriteString(strings.Repeat("x", n-b.Len()))
		}
	}
	return b.String()
}

// interopMessage is what one ReadMessage of a gorilla connection returned.
type interopMessage struct {
	typ  int
	data []byte
	err  error
}

// interopClient is a gorilla client connection whose read loop runs all along, so that control frames
// (pongs, the peer's close) are handled while the test waits for them.
type interopClient struct {
	ws    *websocket.Conn
	msgs  chan interopMessage
	pongs chan string
}

// dialInterop opens a gorilla client connection to ws://addr/echo and starts its read loop; the test's
// end closes it.
func dialInterop(t *testing.T, addr string) *interopClient {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: interopTimeout}
	ws, resp, err := d.Dial("ws://"+addr+"/echo", nil)
	if err != nil {
		t.Fatalf("dial ws://%s/echo: %v (response %v)", addr, err, resp)
	}
	deadline := time.Now().Add(interopTimeout)
	_ = ws.SetReadDeadline(deadline)
	_ = ws.SetWriteDeadline(deadline)
	c := &interopClient{ws: ws, msgs: make(chan interopMessage), pongs: make(chan string, 8)}
	ws.SetPongHandler(func(data string) error {
		select {
		case c.pongs <- data:
		default: // a flood of unsolicited pongs is not this test's business
		}
		return nil
	})
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			typ, data, err := ws.ReadMessage()
			select {
			case c.msgs <- interopMessage{typ, data, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		ws.Close()
		<-stopped
	})
	return c
}

// next waits for the next message (or read error) the read loop got.
func (c *interopClient) next(t *testing.T) interopMessage {
	t.Helper()
	select {
	case m := <-c.msgs:
		return m
	case <-time.After(interopTimeout):
		t.Fatalf("nothing read within %v", interopTimeout)
		return interopMessage{}
	}
}

// echo sends one message and checks the echo has the same type and the same bytes.
func (c *interopClient) echo(t *testing.T, typ int, data []byte) {
	t.Helper()
	kind := map[int]string{websocket.TextMessage: "text", websocket.BinaryMessage: "binary"}[typ]
	if err := c.ws.WriteMessage(typ, data); err != nil {
		t.Fatalf("send a %s message of %d bytes: %v", kind, len(data), err)
	}
	m := c.next(t)
	if m.err != nil {
		t.Fatalf("read the echo of a %s message of %d bytes: %v", kind, len(data), m.err)
	}
	if m.typ != typ {
		t.Fatalf("%s message of %d bytes came back as message type %d", kind, len(data), m.typ)
	}
	if d := diffStreams(m.data, data); d != "" {
		t.Fatalf("%s message of %d bytes came back different: %s", kind, len(data), d)
	}
}

// ping sends a ping with payload and waits for the pong, which must carry the same payload.
func (c *interopClient) ping(t *testing.T, payload string) {
	t.Helper()
	if err := c.ws.WriteControl(websocket.PingMessage, []byte(payload), time.Now().Add(interopTimeout)); err != nil {
		t.Fatalf("send a ping of %d bytes: %v", len(payload), err)
	}
	select {
	case got := <-c.pongs:
		if got != payload {
			t.Fatalf("pong payload %q, want the ping's %q", got, payload)
		}
	case <-time.After(interopTimeout):
		t.Fatalf("no pong within %v for a ping of %d bytes", interopTimeout, len(payload))
	}
}

// expectClose waits for the read loop to end with the peer's close frame, and checks its code and reason.
func (c *interopClient) expectClose(t *testing.T, code int, reason string) {
	t.Helper()
	m := c.next(t)
	var ce *websocket.CloseError
	if !errors.As(m.err, &ce) {
		t.Fatalf("read %d bytes (type %d, err %v), want the peer's close frame %d %q", len(m.data), m.typ, m.err, code, reason)
	}
	if ce.Code != code || ce.Text != reason {
		t.Fatalf("peer closed with %d %q, want %d %q", ce.Code, ce.Text, code, reason)
	}
}

func TestInteropPythonServerGorillaClient(t *testing.T) {
	requirePythonWebsockets(t)
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			r := startRelay(t, dp, []string{startPythonEchoServer(t)})

			t.Run("messages-ping-client-close", func(t *testing.T) {
				c := dialInterop(t, r.Addr)
				for i, n := range interopSizes {
					c.echo(t, websocket.BinaryMessage, stream(uint64(i), n))
					c.echo(t, websocket.TextMessage, []byte(utf8Text(n)))
				}
				// Control frames carry at most 125 bytes (RFC 6455 section 5.5).
				for _, p := range []string{"", "ping-payload ✓", utf8Text(125)} {
					c.ping(t, p)
				}
				c.echo(t, websocket.TextMessage, []byte("still open after the pings"))
				// Python's websockets answers a close with the very bytes it received, so the echo proves
				// the code and reason crossed the relay intact in both directions.
				msg := websocket.FormatCloseMessage(4001, "bye")
				if err := c.ws.WriteMessage(websocket.CloseMessage, msg); err != nil {
					t.Fatalf("send close 4001: %v", err)
				}
				c.expectClose(t, 4001, "bye")
				c.ws.Close()
				waitTunnelsGone(t, r)
			})

			t.Run("server-close", func(t *testing.T) {
				c := dialInterop(t, r.Addr)
				c.echo(t, websocket.TextMessage, []byte("before the server closes"))
				if err := c.ws.WriteMessage(websocket.TextMessage, []byte("close:4002:server bye")); err != nil {
					t.Fatalf("ask the server to close: %v", err)
				}
				c.expectClose(t, 4002, "server bye")
				c.ws.Close()
				waitTunnelsGone(t, r)
			})
		})
	}
}

// gorillaEchoServer is a gorilla/websocket echo server on 127.0.0.1 that records, for the test, the
// payload of every ping and the close frame it received.
type gorillaEchoServer struct {
	*httptest.Server
	closes chan string // "code reason" of each close frame received
	mu     sync.Mutex
	pings  []string
}

// Pings returns the payloads of the pings received so far.
func (s *gorillaEchoServer) Pings() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.pings)
}

// startGorillaEchoServer serves until the test ends. It echoes every message with its type, answers each
// ping with a pong of the same payload, and answers a close with the same code and reason (gorilla's
// default close handler would drop the reason).
func startGorillaEchoServer(t *testing.T) *gorillaEchoServer {
	t.Helper()
	s := &gorillaEchoServer{closes: make(chan string, 8)}
	upgrader := websocket.Upgrader{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		ws, err := upgrader.Upgrade(w, req, nil)
		if err != nil {
			return // Upgrade has answered the client
		}
		defer ws.Close()
		deadline := time.Now().Add(interopTimeout)
		_ = ws.SetReadDeadline(deadline)
		_ = ws.SetWriteDeadline(deadline)
		ws.SetPingHandler(func(data string) error {
			s.mu.Lock()
			s.pings = append(s.pings, data)
			s.mu.Unlock()
			err := ws.WriteControl(websocket.PongMessage, []byte(data), deadline)
			if errors.Is(err, websocket.ErrCloseSent) {
				return nil
			}
			return err
		})
		ws.SetCloseHandler(func(code int, text string) error {
			select {
			case s.closes <- fmt.Sprintf("%d %s", code, text):
			default:
			}
			msg := websocket.FormatCloseMessage(code, text)
			if code == websocket.CloseNoStatusReceived {
				msg = websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
			}
			_ = ws.WriteControl(websocket.CloseMessage, msg, deadline)
			return nil
		})
		for {
			typ, msg, err := ws.ReadMessage()
			if err != nil {
				return
			}
			if err := ws.WriteMessage(typ, msg); err != nil {
				return
			}
		}
	}))
	t.Cleanup(s.Close)
	return s
}

// pythonClientResult is the JSON line testdata/ws_client.py prints.
type pythonClientResult struct {
	OK          bool   `json:"ok"`
	Binary      []int  `json:"binary"` // sizes of the binary messages whose echo matched
	Text        []int  `json:"text"`   // UTF-8 lengths of the text messages whose echo matched
	Pong        string `json:"pong"`   // payload of the ping whose pong came back
	CloseCode   int    `json:"close_code"`
	CloseReason string `json:"close_reason"`
	Error       string `json:"error"`
}

func TestInteropGorillaServerPythonClient(t *testing.T) {
	requirePythonWebsockets(t)
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			srv := startGorillaEchoServer(t)
			r := startRelay(t, dp, []string{srv.Listener.Addr().String()})

			ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
			defer cancel()
			cmd := exec.CommandContext(ctx, python, filepath.Join("testdata", "ws_client.py"), "ws://"+r.Addr+"/echo")
			cmd.WaitDelay = 5 * time.Second
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if err != nil {
				t.Fatalf("python client: %v (context: %v)\nstdout: %s\nstderr:\n%s", err, ctx.Err(), stdout.String(), stderr.String())
			}
			var res pythonClientResult
			if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
				t.Fatalf("python client printed %q, not its JSON result: %v\nstderr:\n%s", stdout.String(), err, stderr.String())
			}
			if !res.OK || res.Error != "" {
				t.Errorf("python client exited 0 but reports ok=%v error %q", res.OK, res.Error)
			}
			if !slices.Equal(res.Binary, interopSizes) {
				t.Errorf("python client checked binary echoes of sizes %v, want %v", res.Binary, interopSizes)
			}
			if len(res.Text) < 3 || !slices.ContainsFunc(res.Text, func(n int) bool { return n > 65535 }) {
				t.Errorf("python client checked text echoes of sizes %v, want several, one over 64 KiB", res.Text)
			}
			const ping = "ping-payload ✓"
			if res.Pong != ping {
				t.Errorf("python client got a pong for %q, want %q", res.Pong, ping)
			}
			if res.CloseCode != 4001 || res.CloseReason != "bye" {
				t.Errorf("python client saw the close echoed as %d %q, want 4001 \"bye\"", res.CloseCode, res.CloseReason)
			}
			// What the gorilla server itself received: the ping's payload and the client's close frame.
			if got := srv.Pings(); !slices.Equal(got, []string{ping}) {
				t.Errorf("gorilla server received pings %q, want [%q]", got, ping)
			}
			select {
			case c := <-srv.closes:
				if c != "4001 bye" {
					t.Errorf("gorilla server received the close as %q, want \"4001 bye\"", c)
				}
			case <-time.After(interopTimeout):
				t.Error("gorilla server never received the client's close frame")
			}
			if t.Failed() {
				t.Logf("python client stderr:\n%s", stderr.String())
			}
			waitTunnelsGone(t, r)
		})
	}
}
