package upstream

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// TestPassiveHealth: Failures failures within Window mark a server down for DownFor, and then it is
// back by itself; older failures, or a success in between, do not count.
func TestPassiveHealth(t *testing.T) {
	type step struct {
		advance time.Duration
		fail    bool // otherwise a success
		// wantDown is the server's state after the step.
		wantDown bool
	}
	fail := func(after time.Duration, down bool) step { return step{after, true, down} }
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"three quick failures", []step{fail(0, false), fail(time.Second, false), fail(time.Second, true)}},
		{"oldest failure left the window", []step{fail(0, false), fail(6*time.Second, false), fail(5*time.Second, false),
			fail(time.Second, true)}},
		{"a success clears the count", []step{fail(0, false), fail(time.Second, false), {time.Second, false, false},
			fail(time.Second, false), fail(time.Second, false), fail(time.Second, true)}},
		{"failures while down do not lengthen it", []step{fail(0, false), fail(0, false), fail(0, true),
			fail(29*time.Second, true), fail(0, true), fail(0, true), {time.Second, false, false}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			p := newTestPool(t, PoolSpec{Servers: servers(2), Passive: DefaultPassiveHealth()}, clock)
			a := server(t, p, addrA)
			for i, st := range tc.steps {
				clock.Advance(st.advance)
				if st.fail {
					p.ReportFailure(a)
				} else {
					p.ReportSuccess(a)
				}
				if got := state(t, p, addrA).State; (got == StateDown) != st.wantDown {
					t.Fatalf("after step %d: %s; want down %v", i, got, st.wantDown)
				}
			}
		})
	}
}

// TestPassiveDownAndBack: a passively downed server gets no picks, is back after DownFor exactly, and
// passive health off (Failures 0) never downs a server.
func TestPassiveDownAndBack(t *testing.T) {
	clock := newFakeClock()
	p := newTestPool(t, PoolSpec{Servers: servers(2), Passive: DefaultPassiveHealth()}, clock)
	a := server(t, p, addrA)
	for range 3 {
		p.ReportFailure(a)
	}
	st := state(t, p, addrA)
	if st.State != StateDown || !st.DownUntil.Equal(clock.Now().Add(30*time.Second)) || st.Failures != 3 {
		t.Fatalf("after 3 failures: %+v; want down for 30s with 3 failures", st)
	}
	for range 10 {
		l := pick(t, p, "")
		if l.Server == a {
			t.Fatal("picked a server that is down")
		}
		l.Release()
	}
	clock.Advance(30*time.Second - time.Nanosecond)
	if st := state(t, p, addrA).State; st != StateDown {
		t.Fatalf("just before DownFor: %s; want down", st)
	}
	clock.Advance(time.Nanosecond)
	if st := state(t, p, addrA); st.State != StateUp || !st.DownUntil.IsZero() {
		t.Fatalf("after DownFor: %+v; want up", st)
	}

	off := newTestPool(t, PoolSpec{Servers: servers(1)}, nil)
	for range 100 {
		off.ReportFailure(server(t, off, addrA))
	}
	if st := state(t, off, addrA); st.State != StateUp || st.Failures != 100 {
		t.Fatalf("passive health off: %+v; want up, with the 100 failures counted", st)
	}
}

// closedAddr is a loopback address where nothing listens.
func closedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// activePool is a pool over addrs with the given active check; Interval and Timeout are long enough
// for a loaded machine, since these tests run the checks by hand (checkAll), not on a timer.
func activePool(t *testing.T, a ActiveHealthSpec, clock *fakeClock, addrs ...string) *Pool {
	a.Interval, a.Timeout = 10*time.Second, 5*time.Second
	spec := PoolSpec{Active: &a}
	for _, addr := range addrs {
		spec.Servers = append(spec.Servers, ServerSpec{Address: addr})
	}
	return newTestPool(t, spec, clock)
}

// runChecks runs n rounds of active checks and returns addr's state after them.
func runChecks(t *testing.T, p *Pool, n int, addr string) ServerState {
	t.Helper()
	for range n {
		p.checkAll(t.Context())
	}
	return state(t, p, addr)
}

// TestActiveTCPClosedPort: a TCP check against a closed port marks the server down after Fall failures,
// not before, and says why.
func TestActiveTCPClosedPort(t *testing.T) {
	addr := closedAddr(t)
	p := activePool(t, ActiveHealthSpec{Type: CheckTCP, Fall: 3}, nil, addr)
	if st := runChecks(t, p, 2, addr); st.State != StateUp || st.LastCheckError == "" {
		t.Fatalf("after 2 failed checks: %+v; want still up, with the error", st)
	}
	st := runChecks(t, p, 1, addr)
	if st.State != StateDown {
		t.Fatalf("after 3 failed checks: %+v; want down", st)
	}
	if !strings.HasPrefix(st.LastCheckError, "tcp check: ") || !strings.Contains(st.LastCheckError, "refused") {
		t.Errorf("last check error %q", st.LastCheckError)
	}
	if _, err := p.Pick("", nil); err == nil {
		t.Error("Pick found a server that failed its checks")
	}
}

// statusServer is an HTTP server answering every request with the status it holds, and remembering the
// last path asked for.
func statusServer(t *testing.T, status int) (addr string, set func(int), path func() string) {
	var code atomic.Int64
	var last atomic.Value
	code.Store(int64(status))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		last.Store(r.URL.RequestURI())
		w.WriteHeader(int(code.Load()))
		w.Write([]byte("body"))
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), func(c int) { code.Store(int64(c)) }, func() string { s, _ := last.Load().(string); return s }
}

// TestActiveHTTP: an HTTP check against a server answering the wrong status marks it down after Fall;
// Rise passes in a row bring it back, fewer do not.
func TestActiveHTTP(t *testing.T) {
	addr, setStatus, lastPath := statusServer(t, http.StatusServiceUnavailable)
	p := activePool(t, ActiveHealthSpec{Type: CheckHTTP, Path: "/healthz?deep=1", ExpectStatus: 200, Rise: 2, Fall: 2}, nil, addr)
	st := runChecks(t, p, 2, addr)
	if st.State != StateDown || st.LastCheckError != "http check GET /healthz?deep=1: status 503; expected 200" {
		t.Fatalf("after 2 checks answered 503: %+v", st)
	}
	if got := lastPath(); got != "/healthz?deep=1" {
		t.Errorf("checked %q; want /healthz?deep=1", got)
	}
	setStatus(http.StatusOK)
	if st := runChecks(t, p, 1, addr); st.State != StateDown || st.LastCheckError != "" {
		t.Fatalf("after 1 passing check of Rise 2: %+v; want still down, last check clean", st)
	}
	if st := runChecks(t, p, 1, addr); st.State != StateUp {
		t.Fatalf("after 2 passing checks: %+v; want up", st)
	}
	// A pass between failures restarts the count toward Fall.
	for _, code := range []int{500, 200, 500} {
		setStatus(code)
		runChecks(t, p, 1, addr)
	}
	if st := state(t, p, addr); st.State != StateUp {
		t.Fatalf("after fail, pass, fail with Fall 2: %s; want up", st.State)
	}
}

// TestActiveRiseEndsPassiveDown: a server passive health took down for DownFor is back as soon as Rise
// checks pass after it went down; checks that passed before do not count.
func TestActiveRiseEndsPassiveDown(t *testing.T) {
	addr, _, _ := statusServer(t, http.StatusOK)
	p := activePool(t, ActiveHealthSpec{Type: CheckHTTP, Path: "/", ExpectStatus: 200, Rise: 2, Fall: 2}, nil, addr)
	p.mu.Lock()
	p.spec.Passive = DefaultPassiveHealth()
	p.mu.Unlock()
	runChecks(t, p, 3, addr) // passes before the failures must not count toward Rise
	s := server(t, p, addr)
	for range 3 {
		p.ReportFailure(s)
	}
	if st := runChecks(t, p, 1, addr); st.State != StateDown {
		t.Fatalf("after passive failures and 1 passing check of Rise 2: %+v; want down", st)
	}
	if st := runChecks(t, p, 1, addr); st.State != StateUp || !st.DownUntil.IsZero() {
		t.Fatalf("after 2 passing checks: %+v; want up, the passive period ended", st)
	}
}

// wsServer answers the WebSocket upgrade at /ws with gorilla's Upgrader while ok holds true, and 403
// otherwise; it counts the upgrades that completed with a clean close from the checker.
func wsServer(t *testing.T, ok *atomic.Bool, cleanCloses *atomic.Int64) string {
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ws" || !ok.Load() {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, _, err := c.ReadMessage(); websocket.IsCloseError(err, websocket.CloseNormalClosure) {
			cleanCloses.Add(1)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// TestActiveWebSocket: the websocket check is a real upgrade: a server answering 101 passes (and sees a
// clean close), one refusing the upgrade fails, and Rise brings a down server back up.
func TestActiveWebSocket(t *testing.T) {
	var ok atomic.Bool
	var clean atomic.Int64
	addr := wsServer(t, &ok, &clean)
	p := activePool(t, ActiveHealthSpec{Type: CheckWebSocket, Path: "/ws", ExpectStatus: 101, Rise: 1, Fall: 1}, nil, addr)
	st := runChecks(t, p, 1, addr)
	if st.State != StateDown || st.LastCheckError != "websocket check GET /ws: status 403; expected 101" {
		t.Fatalf("upgrade refused: %+v", st)
	}
	ok.Store(true)
	if st := runChecks(t, p, 1, addr); st.State != StateUp || st.LastCheckError != "" {
		t.Fatalf("upgrade accepted: %+v; want up", st)
	}
	// The server's handler sees the close frame after the check returned; wait for it by polling
	// rather than timing.
	deadline := time.Now().Add(10 * time.Second)
	for clean.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if clean.Load() == 0 {
		t.Error("the server never saw a clean WebSocket close from the check")
	}

	// A plain HTTP server answering 200 to everything is not a WebSocket server.
	plain, _, _ := statusServer(t, http.StatusOK)
	p2 := activePool(t, ActiveHealthSpec{Type: CheckWebSocket, Path: "/", ExpectStatus: 101, Rise: 1, Fall: 1}, nil, plain)
	if st := runChecks(t, p2, 1, plain); st.State != StateDown || st.LastCheckError != "websocket check GET /: status 200; expected 101" {
		t.Fatalf("plain HTTP server: %+v", st)
	}
}

// TestActiveWebSocketBadAccept: a 101 whose Sec-WebSocket-Accept is wrong fails the check, since the
// relay would refuse it too.
func TestActiveWebSocketBadAccept(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Upgrade", "websocket")
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Sec-WebSocket-Accept", "d3Jvbmc=")
		w.WriteHeader(http.StatusSwitchingProtocols)
	}))
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	p := activePool(t, ActiveHealthSpec{Type: CheckWebSocket, Path: "/", ExpectStatus: 101, Rise: 1, Fall: 1}, nil, addr)
	if st := runChecks(t, p, 1, addr); st.State != StateDown || st.LastCheckError != "websocket check GET /: 101 with a wrong Sec-WebSocket-Accept" {
		t.Fatalf("wrong accept: %+v", st)
	}
}

// TestSlowStart: a server back up takes its weight linearly over SlowStart, from whichever kind of down
// it comes back: active checks, passive failures or an operator's MarkDown.
func TestSlowStart(t *testing.T) {
	addr, setStatus, _ := statusServer(t, http.StatusOK)
	other, _, _ := statusServer(t, http.StatusOK)
	clock := newFakeClock()
	a := ActiveHealthSpec{Type: CheckHTTP, Path: "/", ExpectStatus: 200, Interval: 10 * time.Second, Timeout: 5 * time.Second,
		Rise: 1, Fall: 1, SlowStart: 20 * time.Second}
	spec := PoolSpec{Servers: []ServerSpec{{Address: addr, Weight: 4}, {Address: other, Weight: 1}}, Active: &a, Passive: DefaultPassiveHealth()}
	p := newTestPool(t, spec, clock)
	srv := server(t, p, addr)

	ramp := func(how string) {
		t.Helper()
		for _, tc := range []struct {
			after time.Duration
			want  float64
		}{
			{0, 0.001}, {5 * time.Second, 1}, {10 * time.Second, 2}, {15 * time.Second, 3}, {20 * time.Second, 4}, {time.Hour, 4},
		} {
			clock.Advance(tc.after)
			if got := state(t, p, addr).EffectiveWeight; got != tc.want {
				t.Fatalf("%s: effective weight %v; want %v", how, got, tc.want)
			}
			clock.Advance(-tc.after)
		}
	}

	if st := runChecks(t, p, 1, addr); st.EffectiveWeight != 4 {
		t.Fatalf("up from the start: effective weight %v; want 4 (no slow start)", st.EffectiveWeight)
	}
	setStatus(http.StatusInternalServerError)
	if st := runChecks(t, p, 1, addr); st.State != StateDown || st.EffectiveWeight != 0 {
		t.Fatalf("down: %+v; want effective weight 0", st)
	}
	clock.Advance(time.Minute)
	setStatus(http.StatusOK)
	runChecks(t, p, 1, addr)
	ramp("after active checks")

	clock.Advance(time.Hour)
	for range 3 {
		p.ReportFailure(srv)
	}
	clock.Advance(30 * time.Second) // DownFor: back up now
	ramp("after passive down")

	clock.Advance(time.Hour)
	mustOK(t, p.MarkDown(addr, true))
	clock.Advance(time.Minute)
	mustOK(t, p.MarkDown(addr, false))
	ramp("after forced down")

	// The ramp shows in the picks: at a quarter of its weight 4, round-robin treats it as weight 1.
	clock.Advance(5 * time.Second)
	count := map[string]int{}
	for range 100 {
		l := pick(t, p, "")
		count[l.Server.Address()]++
		l.Release()
	}
	if count[addr] != 50 {
		t.Errorf("at effective weight 1 against 1: %d of 100 picks; want 50", count[addr])
	}
}

// TestStartRunsChecks: Start runs the checks on their own; Close stops them, twice is fine, and a closed
// pool does not start again.
func TestStartRunsChecks(t *testing.T) {
	addr := closedAddr(t)
	a := ActiveHealthSpec{Type: CheckTCP, Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond, Rise: 1, Fall: 1}
	p, err := New(PoolSpec{Name: "p", Servers: []ServerSpec{{Address: addr}}, Active: &a}.WithDefaults(), Options{})
	mustOK(t, err)
	mustOK(t, p.Start(context.Background()))
	if err := p.Start(context.Background()); err == nil {
		t.Error("second Start succeeded")
	}
	// Wait for the first round, however slow the machine; no assertion on how long it took.
	deadline := time.Now().Add(30 * time.Second)
	for state(t, p, addr).State != StateDown && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if st := state(t, p, addr); st.State != StateDown {
		t.Fatalf("Start ran no check: %+v", st)
	}
	mustOK(t, p.Close())
	mustOK(t, p.Close())
	if err := p.Start(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: %v; want ErrClosed", err)
	}
}

// TestActiveCheckLocalResourceErrors: a check whose own socket could not be had (the relay out of
// descriptors, buffers, memory or local ports) says nothing about the server: it neither takes the server
// down nor counts towards its Fall, and the error still shows.
func TestActiveCheckLocalResourceErrors(t *testing.T) {
	addr := closedAddr(t) // real checks fail: refused
	var failing atomic.Bool
	failing.Store(true)
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		if failing.Load() {
			return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("socket", syscall.EMFILE)}
		}
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	}
	a := ActiveHealthSpec{Type: CheckTCP, Interval: 10 * time.Second, Timeout: 5 * time.Second, Rise: 1, Fall: 2}
	p := newTestPool(t, PoolSpec{Servers: []ServerSpec{{Address: addr}}, Active: &a}, nil,
		func(o *Options) { o.Dial = dial })
	st := runChecks(t, p, 3, addr)
	if st.State != StateUp {
		t.Errorf("after 3 checks that could not open a socket: %s; want up", st.State)
	}
	if !strings.Contains(st.LastCheckError, "too many open files") {
		t.Errorf("last check error %q should give the cause", st.LastCheckError)
	}
	// The refused checks that follow count from the first: fall 2 takes the second.
	failing.Store(false)
	if st := runChecks(t, p, 1, addr); st.State != StateUp {
		t.Errorf("after one refused check, with fall 2: %s; want up", st.State)
	}
	if st := runChecks(t, p, 1, addr); st.State != StateDown {
		t.Errorf("after two refused checks, with fall 2: %s; want down", st.State)
	}
}

// rawServer answers each request it reads with what answer writes on the connection.
func rawServer(t *testing.T, answer func(c net.Conn, req *http.Request)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if req, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
					answer(c, req)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// TestActiveWebSocketAnswerRead: the websocket check skips interim responses before the 101, as the
// relay does, and gives up on a head that never ends once it passed its cap.
func TestActiveWebSocketAnswerRead(t *testing.T) {
	switched := func(req *http.Request) string {
		sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + websocketGUID))
		return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
			base64.StdEncoding.EncodeToString(sum[:]) + "\r\n\r\n"
	}
	t.Run("interim responses first", func(t *testing.T) {
		addr := rawServer(t, func(c net.Conn, req *http.Request) {
			c.Write([]byte("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + switched(req)))
			io.Copy(io.Discard, c)
		})
		p := activePool(t, ActiveHealthSpec{Type: CheckWebSocket, Path: "/", ExpectStatus: 101, Rise: 1, Fall: 1}, nil, addr)
		if st := runChecks(t, p, 1, addr); st.State != StateUp || st.LastCheckError != "" {
			t.Fatalf("101 after 100 and 103: %+v; want up", st)
		}
	})
	t.Run("endless head", func(t *testing.T) {
		addr := rawServer(t, func(c net.Conn, req *http.Request) {
			c.Write([]byte("HTTP/1.1 101 Switching Protocols\r\nX-Endless: "))
			chunk := bytes.Repeat([]byte("a"), 32<<10)
			for range 1024 { // 32 MiB, then it holds the connection until the check gives up
				if _, err := c.Write(chunk); err != nil {
					return
				}
			}
			io.Copy(io.Discard, c)
		})
		p := activePool(t, ActiveHealthSpec{Type: CheckWebSocket, Path: "/", ExpectStatus: 101, Rise: 1, Fall: 1}, nil, addr)
		st := runChecks(t, p, 1, addr)
		if st.State != StateDown || !strings.Contains(st.LastCheckError, "larger than") {
			t.Fatalf("endless head: %+v; want down, the head too large", st)
		}
	})
}
