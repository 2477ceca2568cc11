package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// chromium is a headless Chromium started for one test and killed, with all its processes, when the
// test ends.
type chromium struct {
	stderrPath string
	exited     chan struct{} // closed once the browser's main process has exited
	cdp        *cdpConn      // the browser-level DevTools connection
}

// startChromium starts headless Chromium from path with extra flags and connects to its DevTools
// endpoint, which it finds in the DevToolsActivePort file Chromium writes into its user-data-dir.
func startChromium(ctx context.Context, t *testing.T, path string, extra ...string) *chromium {
	t.Helper()
	home := t.TempDir() // registered before the kill below, so removed after it (cleanups run last first)
	profile := filepath.Join(home, "profile")
	c := &chromium{stderrPath: filepath.Join(home, "stderr"), exited: make(chan struct{})}
	stderr, err := os.Create(c.stderrPath)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	args := append([]string{
		"--headless=new",
		"--no-sandbox", // the tests run as root, where Chromium refuses its sandbox
		"--disable-gpu",
		"--disable-dev-shm-usage",
		"--no-first-run",
		"--no-default-browser-check",
		"--disable-extensions",
		"--disable-background-networking",
		"--disable-component-update",
		"--disable-sync",
		"--no-proxy-server", // a proxy from the environment must not carry the test's requests
		"--remote-debugging-port=0",
		"--user-data-dir=" + profile,
	}, extra...)
	cmd := exec.Command(path, append(args, "about:blank")...)
	// HOME in the temporary folder: nothing is read from or written to the user's own profile or caches.
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+home, "XDG_CACHE_HOME="+home)
	cmd.Stdout = stderr
	cmd.Stderr = stderr // a file, not a pipe: Wait must not wait for helper processes that inherited it
	// Its own process group, so that the renderer, GPU and zygote processes die with the browser. (The
	// crashpad handlers make groups of their own; they exit once the browser is gone.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	go func() {
		_ = cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() {
		if c.cdp != nil {
			c.cdp.close()
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-c.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("chromium (pid %d) still running 10 s after SIGKILL", cmd.Process.Pid)
		}
	})

	var url string
	for url == "" {
		// Line 1: the port; line 2: the browser target's path (/devtools/browser/<id>). Chromium writes
		// the file once it listens; a partly written file has fewer than two lines.
		if b, err := os.ReadFile(filepath.Join(profile, "DevToolsActivePort")); err == nil {
			if lines := strings.Split(strings.TrimSpace(string(b)), "\n"); len(lines) == 2 {
				url = "ws://127.0.0.1:" + lines[0] + lines[1]
				break
			}
		}
		select {
		case <-c.exited:
			t.Fatalf("chromium exited before its DevTools endpoint was up:\n%s", c.stderr())
		case <-ctx.Done():
			t.Fatalf("chromium's DevTools endpoint not up: %v:\n%s", ctx.Err(), c.stderr())
		case <-time.After(50 * time.Millisecond):
		}
	}
	c.cdp, err = dialCDP(ctx, url)
	if err != nil {
		t.Fatalf("%v:\n%s", err, c.stderr())
	}
	return c
}

// stderr is what Chromium printed so far, its last 4 KiB, for failure messages.
func (c *chromium) stderr() string {
	b, _ := os.ReadFile(c.stderrPath)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// cdpConn is a DevTools protocol connection: commands go out with an id and, for a page, the session id
// Target.attachToTarget gave (flat mode); answers come back with the same id. Events are ignored: the test
// polls the page state instead.
type cdpConn struct {
	ws   *websocket.Conn
	done chan struct{} // closed when the reader stops; err says why

	mu      sync.Mutex // guards next, pending, err and writes to ws
	next    int64
	pending map[int64]chan cdpMessage
	err     error
}

type cdpMessage struct {
	ID        int64           `json:"id,omitempty"`
	SessionID string          `json:"sessionId,omitempty"`
	Method    string          `json:"method,omitempty"`
	Params    any             `json:"params,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

func dialCDP(ctx context.Context, url string) (*cdpConn, error) {
	ws, _, err := websocket.DefaultDialer.DialContext(ctx, url, nil)
	if err != nil {
		return nil, fmt.Errorf("connect to chromium's DevTools at %s: %w", url, err)
	}
	c := &cdpConn{ws: ws, done: make(chan struct{}), pending: map[int64]chan cdpMessage{}}
	go c.read()
	return c, nil
}

func (c *cdpConn) read() {
	defer close(c.done)
	for {
		var m cdpMessage
		if err := c.ws.ReadJSON(&m); err != nil {
			c.mu.Lock()
			c.err = fmt.Errorf("DevTools connection: %w", err)
			c.mu.Unlock()
			return
		}
		if m.ID == 0 {
			continue // an event
		}
		c.mu.Lock()
		ch := c.pending[m.ID]
		delete(c.pending, m.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
}

func (c *cdpConn) close() { c.ws.Close() }

// call sends method with params to the target of session ("" for the browser) and decodes its result
// into result (when not nil).
func (c *cdpConn) call(ctx context.Context, session, method string, params, result any) error {
	ch := make(chan cdpMessage, 1)
	c.mu.Lock()
	c.next++
	id := c.next
	c.pending[id] = ch
	err := c.ws.WriteJSON(cdpMessage{ID: id, SessionID: session, Method: method, Params: params})
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: send: %w", method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return fmt.Errorf("%s: %s (code %d)", method, m.Error.Message, m.Error.Code)
		}
		if result == nil {
			return nil
		}
		if err := json.Unmarshal(m.Result, result); err != nil {
			return fmt.Errorf("%s: decode %s: %w", method, m.Result, err)
		}
		return nil
	case <-c.done:
		c.mu.Lock()
		defer c.mu.Unlock()
		return fmt.Errorf("%s: %w", method, c.err)
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", method, ctx.Err())
	}
}

// newPage opens a blank tab and attaches to it in flat mode; it returns the session id for the tab's
// commands.
func (c *cdpConn) newPage(ctx context.Context) (string, error) {
	var target struct {
		TargetID string `json:"targetId"`
	}
	if err := c.call(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank"}, &target); err != nil {
		return "", err
	}
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	err := c.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached)
	return attached.SessionID, err
}

// navigate loads url in the page and fails with Chromium's reason (net::ERR_…) when it cannot.
func (c *cdpConn) navigate(ctx context.Context, session, url string) error {
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	if err := c.call(ctx, session, "Page.navigate", map[string]any{"url": url}, &nav); err != nil {
		return err
	}
	if nav.ErrorText != "" {
		return fmt.Errorf("navigate to %s: %s", url, nav.ErrorText)
	}
	return nil
}

// evaluate runs a JavaScript expression in the page, waits for it when it is a promise, and decodes its
// value (JSON-serialisable) into result. A thrown exception or a rejected promise is an error.
func (c *cdpConn) evaluate(ctx context.Context, session, expr string, result any) error {
	var out struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception *struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	params := map[string]any{"expression": expr, "awaitPromise": true, "returnByValue": true}
	if err := c.call(ctx, session, "Runtime.evaluate", params, &out); err != nil {
		return err
	}
	if e := out.ExceptionDetails; e != nil {
		if e.Exception != nil && e.Exception.Description != "" {
			return errors.New(e.Exception.Description)
		}
		return errors.New(e.Text)
	}
	if err := json.Unmarshal(out.Result.Value, result); err != nil {
		return fmt.Errorf("decode the page's answer %s: %w", out.Result.Value, err)
	}
	return nil
}
