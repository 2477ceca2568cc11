package upstream

import (
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ReportFailure tells the pool that the relay failed to open a tunnel or request on s: the connection
// was refused or timed out, or the server broke the handshake. Passive health counts these: Failures
// of them within Window, with no success in between, mark s down for DownFor. Failures reported while
// s is already down (tunnels begun before) do not lengthen the period.
func (p *Pool) ReportFailure(s *Server) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s.failures++
	ph := p.spec.Passive
	if ph.Failures == 0 {
		return
	}
	now := p.now()
	if now.Before(s.downUntil) {
		return
	}
	cutoff := now.Add(-ph.Window)
	s.fails = slices.DeleteFunc(s.fails, func(t time.Time) bool { return !t.After(cutoff) })
	s.fails = append(s.fails, now)
	if len(s.fails) >= ph.Failures {
		s.fails = s.fails[:0]
		s.downUntil = now.Add(ph.DownFor)
		// With active checks, Rise passes from now on end the period early (recordCheckLocked).
		s.okStreak = 0
		p.log.Warn("server down: passive failures", "server", s.addr,
			"failures", ph.Failures, "window", ph.Window, "down_for", ph.DownFor)
	}
}

// IsLocalResourceError says whether a connect failed for want of this process's or host's own resources
// (descriptors, socket buffers, memory, local ports) rather than because of the server it was for: such
// a failure must not count against the server.
func IsLocalResourceError(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.EADDRNOTAVAIL} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// ReportSuccess tells the pool that s opened a tunnel or answered a request. It clears the failures
// counted so far: passive health is about a server that keeps failing, not one that fails now and then.
func (p *Pool) ReportSuccess(s *Server) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s.fails = s.fails[:0]
}

// Start runs the pool's background work until ctx ends or Close: active health checks, if the spec has
// them (every Interval, all servers at once), and DNS discovery, if it has that. A reload that adds or
// changes either takes effect without a new Start.
func (p *Pool) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("pool %q: start: %w", p.spec.Name, ErrClosed)
	}
	if p.started {
		return fmt.Errorf("pool %q: start: already started", p.spec.Name)
	}
	p.started = true
	ctx, p.cancel = context.WithCancel(ctx)
	p.wg.Go(func() {
		every(ctx, p.wakeHealth, func() time.Duration {
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.spec.Active == nil {
				return 0
			}
			return p.spec.Active.Interval
		}, p.checkAll)
	})
	p.wg.Go(func() {
		every(ctx, p.wakeDNS, func() time.Duration {
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.spec.DNS == nil {
				return 0
			}
			return p.spec.DNS.Interval
		}, func(ctx context.Context) { p.refreshDNS(ctx) })
	})
	return nil
}

// Close stops the background work and waits for it; checks in flight are abandoned, not counted. Pick
// and the leases keep working, so that tunnels may drain after Close. Calling Close again does nothing.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	cancel := p.cancel
	p.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	p.wg.Wait()
	return nil
}

// wake nudges a background loop to read the spec again (after Update), without blocking.
func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// every runs work, then waits interval (read afresh from the spec each time), until ctx ends; a nudge
// on wakeup runs it again at once. While interval says 0 (the spec has no such work) it only waits for
// a nudge. Health checks and DNS discovery each run in one such loop.
func every(ctx context.Context, wakeup <-chan struct{}, interval func() time.Duration, work func(context.Context)) {
	for {
		var timer *time.Timer
		var tick <-chan time.Time
		if d := interval(); d > 0 {
			work(ctx)
			timer = time.NewTimer(d)
			tick = timer.C
		}
		select {
		case <-ctx.Done():
			return
		case <-wakeup:
		case <-tick:
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

// maxParallelChecks bounds the checks in flight at once, so that a pool of thousands of DNS-discovered
// servers does not open thousands of sockets in the same instant.
const maxParallelChecks = 64

// checkAll runs one active check on every server and records the results.
func (p *Pool) checkAll(ctx context.Context) {
	p.mu.Lock()
	if p.spec.Active == nil {
		p.mu.Unlock()
		return
	}
	spec := *p.spec.Active
	targets := slices.Clone(p.servers)
	p.mu.Unlock()

	results := make([]error, len(targets))
	sem := make(chan struct{}, maxParallelChecks)
	var wg sync.WaitGroup
	for i, s := range targets {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i] = p.check(ctx, spec, s.addr)
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return // closing: a cancelled check says nothing about the server
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	for i, s := range targets {
		if IsLocalResourceError(results[i]) {
			// The check could not get a socket: that says nothing about the server, so it neither
			// passes nor fails; the error shows in the snapshot.
			s.checkErr = results[i].Error()
			p.log.Warn("health check skipped: out of local resources", "server", s.addr, "err", results[i])
			continue
		}
		p.recordCheckLocked(s, spec, results[i], now)
	}
}

// recordCheckLocked counts one check result: Fall failures in a row mark an up server down, Rise
// passes in a row mark a down server up (and start its slow start).
func (p *Pool) recordCheckLocked(s *Server, spec ActiveHealthSpec, err error, now time.Time) {
	s.lastCheck = now
	if err == nil {
		s.checkErr = ""
		s.failStreak = 0
		s.okStreak++
		if s.activeDown && s.okStreak >= spec.Rise {
			s.activeDown = false
			s.rampFrom = now
			p.log.Info("server up: health checks pass", "server", s.addr, "rise", spec.Rise)
		}
		// A server passive health took down comes back as soon as Rise checks pass after it went down,
		// rather than at the end of DownFor: the checks are the better evidence. What a check proves is
		// its type's: a tcp check passes for a server that accepts connections but hangs handshakes.
		if now.Before(s.downUntil) && s.okStreak >= spec.Rise {
			s.downUntil = time.Time{}
			s.rampFrom = now
			p.log.Info("server up: health checks pass after passive failures", "server", s.addr, "rise", spec.Rise)
		}
		return
	}
	s.checkErr = err.Error()
	s.okStreak = 0
	s.failStreak++
	if !s.activeDown && s.failStreak >= spec.Fall {
		s.activeDown = true
		p.log.Warn("server down: health checks fail", "server", s.addr, "fall", spec.Fall, "error", s.checkErr)
	}
}

// check runs one active check of addr within spec.Timeout.
func (p *Pool) check(ctx context.Context, spec ActiveHealthSpec, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, spec.Timeout)
	defer cancel()
	conn, err := p.dial(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("%s check: %w", spec.Type, err)
	}
	defer conn.Close()
	if spec.Type == CheckTCP {
		return nil
	}
	// The deadline bounds the request and response; AfterFunc ends them at once when the pool closes.
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := p.checkRequest(conn, spec, addr); err != nil {
		return fmt.Errorf("%s check GET %s: %w", spec.Type, spec.Path, err)
	}
	return nil
}

// maxCheckHeadBytes bounds the response heads of one check. A check is not told the relay's max header
// bytes, which also bound a server's heads to a handshake: this is the largest a configuration file takes,
// so that no server whose answer the relay accepts fails its check for its size.
const maxCheckHeadBytes = 1 << 20

// websocketGUID is RFC 6455's constant for Sec-WebSocket-Accept.
const websocketGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// checkRequest sends the http or websocket check's GET on conn and checks the answer. The websocket
// check is a real upgrade, so that it tests what tunnels need (the upgrade path, its auth, the
// WebSocket handler), which a plain GET on a health endpoint does not.
func (p *Pool) checkRequest(conn net.Conn, spec ActiveHealthSpec, addr string) error {
	req, err := http.NewRequest(http.MethodGet, "http://"+addr+spec.Path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "sockrelay-health-check")
	var key string
	if spec.Type == CheckWebSocket {
		var nonce [16]byte
		rand.Read(nonce[:])
		key = base64.StdEncoding.EncodeToString(nonce[:])
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Sec-WebSocket-Key", key)
		req.Header.Set("Sec-WebSocket-Version", "13")
	} else {
		req.Close = true
	}
	if err := req.Write(conn); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	resp, _, err := ReadAnswer(conn, req, maxCheckHeadBytes)
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	// Read a little of the body so that the server sees a clean close, not a reset, in the usual case.
	io.CopyN(io.Discard, resp.Body, 4096)
	resp.Body.Close()
	if resp.StatusCode != spec.ExpectStatus {
		return fmt.Errorf("status %d; expected %d", resp.StatusCode, spec.ExpectStatus)
	}
	if spec.Type != CheckWebSocket || resp.StatusCode != http.StatusSwitchingProtocols {
		return nil
	}
	// A 101 that the relay would refuse (docs/architecture.md, "The handshake, precisely") must fail the check too.
	sum := sha1.Sum([]byte(key + websocketGUID))
	switch {
	case !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket"):
		return fmt.Errorf("101 without Upgrade: websocket")
	case !headerHasToken(resp.Header, "Connection", "upgrade"):
		return fmt.Errorf("101 without Connection: upgrade")
	case resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]):
		return fmt.Errorf("101 with a wrong Sec-WebSocket-Accept")
	}
	// Say goodbye as a client should, with a masked close frame (1000, normal closure), so that the
	// server logs a clean close rather than an abnormal one. Best effort: the check already passed.
	var mask [4]byte
	rand.Read(mask[:])
	frame := []byte{0x88, 0x82, mask[0], mask[1], mask[2], mask[3], 0x03 ^ mask[0], 0xe8 ^ mask[1]}
	conn.Write(frame)
	return nil
}

// headerHasToken says whether a comma-separated header holds token, case-insensitively.
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}
