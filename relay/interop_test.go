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
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// python is the interpreter of the interop peers: Debian's, which has python3-websockets.
const python = "/usr/bin/python3"

// requirePythonWebsockets fails (never skips) when the interop peer is missing: CI must not go green
// without it.
func requirePythonWebsockets(t *testing.T) {
	t.Helper()
	if out, err := exec.Command(python, "-c", "import websockets").CombinedOutput(); err != nil {
		t.Fatalf("the interop tests need Python's websockets library: %v %s; install it with: apt-get install python3-websockets", err, out)
	}
}

// startPythonEchoServer runs testdata/ws_echo_server.py until the test ends and returns its address.
func startPythonEchoServer(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, python, "testdata/ws_echo_server.py")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if t.Failed() {
			t.Logf("python echo server stderr:\n%s", stderr.String())
		}
	})
	port := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		port <- strings.TrimSpace(line)
	}()
	select {
	case p := <-port:
		if p == "" {
			t.Fatalf("python echo server did not start: %s", stderr.String())
		}
		return "127.0.0.1:" + p
	case <-time.After(20 * time.Second):
		t.Fatalf("python echo server printed no port in 20s: %s", stderr.String())
	}
	return ""
}

// interopMessages are the binary sizes both interop directions exchange: around the 7-bit, 16-bit and
// 64-bit length encodings of RFC 6455, and 1 MiB.
var interopMessages = []int{0, 1, 125, 126, 65535, 65536, 1 << 20}

func TestInteropPythonServerGorillaClient(t *testing.T) {
	requirePythonWebsockets(t)
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			r := startRelay(t, dp, []string{startPythonEchoServer(t)})
			dialer := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
			ws, resp, err := dialer.Dial("ws://"+r.Addr+"/echo", nil)
			if err != nil {
				t.Fatalf("dial through the relay: %v (response %v)", err, resp)
			}
			defer ws.Close()
			ws.SetReadDeadline(time.Now().Add(30 * time.Second))

			pongs := make(chan string, 1)
			ws.SetPongHandler(func(data string) error { pongs <- data; return nil })
			for i, n := range interopMessages {
				want := stream(uint64(i), n)
				if err := ws.WriteMessage(websocket.BinaryMessage, want); err != nil {
					t.Fatal(err)
				}
				typ, got, err := ws.ReadMessage()
				if err != nil || typ != websocket.BinaryMessage || !bytes.Equal(got, want) {
					t.Fatalf("binary message of %d bytes: got type %d, %s, %v", n, typ, diffStreams(got, want), err)
				}
			}
			text := "ünïcødé ✓ 日本語"
			ws.WriteMessage(websocket.TextMessage, []byte(text))
			if typ, got, err := ws.ReadMessage(); err != nil || typ != websocket.TextMessage || string(got) != text {
				t.Fatalf("text message: got type %d %q, %v", typ, got, err)
			}
			// The pong handler runs inside a read, so a message is sent after the ping to read it.
			ws.WriteControl(websocket.PingMessage, []byte("ping-payload"), time.Now().Add(5*time.Second))
			ws.WriteMessage(websocket.TextMessage, []byte("after ping"))
			if _, got, err := ws.ReadMessage(); err != nil || string(got) != "after ping" {
				t.Fatalf("message after ping: %q, %v", got, err)
			}
			select {
			case p := <-pongs:
				if p != "ping-payload" {
					t.Errorf("pong payload %q, want %q", p, "ping-payload")
				}
			default:
				t.Error("no pong for the ping")
			}
			// The server closes with the code and reason it is asked for.
			ws.WriteMessage(websocket.TextMessage, []byte("close:4002:server bye"))
			_, _, err = ws.ReadMessage()
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != 4002 || ce.Text != "server bye" {
				t.Fatalf("read after asking the server to close: %v, want close 4002 \"server bye\"", err)
			}
		})
	}
}

func TestInteropGorillaServerPythonClient(t *testing.T) {
	requirePythonWebsockets(t)
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			closes := make(chan string, 1)
			upgrader := websocket.Upgrader{}
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
				ws, err := upgrader.Upgrade(w, req, nil)
				if err != nil {
					return
				}
				defer ws.Close()
				for {
					typ, msg, err := ws.ReadMessage()
					if err != nil {
						var ce *websocket.CloseError
						if errors.As(err, &ce) {
							closes <- fmt.Sprintf("%d %s", ce.Code, ce.Text)
						} else {
							closes <- err.Error()
						}
						return
					}
					if err := ws.WriteMessage(typ, msg); err != nil {
						return
					}
				}
			}))
			defer srv.Close()
			r := startRelay(t, dp, []string{srv.Listener.Addr().String()})

			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, python, "testdata/ws_client.py", "ws://"+r.Addr+"/echo")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("python client: %v\n%s", err, stderr.String())
			}
			var res struct {
				Binary, Text int
				Pong         bool
				CloseCode    int    `json:"close_code"`
				CloseReason  string `json:"close_reason"`
			}
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("python client printed %q: %v", out, err)
			}
			// gorilla's default close handler echoes the code with an empty reason; the reason the client
			// sent is checked on the server's side below.
			if res.Binary != len(interopMessages) || res.Text != 3 || !res.Pong || res.CloseCode != 4001 {
				t.Errorf("python client result %+v; want 7 binary, 3 text, a pong and close code 4001 echoed", res)
			}
			select {
			case c := <-closes:
				if c != "4001 bye" {
					t.Errorf("gorilla server saw the close as %q, want \"4001 bye\"", c)
				}
			case <-time.After(10 * time.Second):
				t.Error("gorilla server never saw the close")
			}
		})
	}
}
