package relay

import (
	"context"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// What a plain request was waiting for when idleWatch cut it.
const (
	cutClientBody = "client_body" // the client's request body: 408
	cutOther      = "no_progress" // the upstream, or a client that reads none of the response
)

// idleWatch cuts a plain (reverse-proxied) request through which no byte moved for its idle timeout: a
// client that stops sending its body, a client that stops reading the response, an upstream that stops
// sending it or stops reading the body (nginx's client_body_timeout, send_timeout, proxy_read_timeout and
// proxy_send_timeout, HAProxy's timeout client and server). Without it such a request held the client's
// connection, the upstream's, and the server's lease for ever.
//
// One timer per request, re-armed only when it fires: progress just moves quietUntil, so a busy request
// costs an atomic store per read or write and no system call. While the upstream has the whole request and
// thinks, the wait is the transport's (the upstream response timeout), not this one's.
//
// To cut, it cancels the proxied request's context (the transport closes the upstream connection) and
// sets the client connection's deadlines in the past (a blocked body read or response write returns, and
// net/http closes the connection). Nothing else touches the client connection's deadlines, so a request
// that is not cut leaves them as net/http set them.
type idleWatch struct {
	idle       time.Duration
	thinkTime  time.Duration // the upstream's time to answer once it has the request
	rc         *http.ResponseController
	cancel     context.CancelFunc
	onCut      func(waitingFor string)
	quietUntil atomic.Int64 // UnixNano before which it does not cut
	reading    atomic.Bool  // a read of the client's body is in progress
	writing    atomic.Bool  // a write to the client is in progress

	mu    sync.Mutex
	timer *time.Timer
	done  bool
	cut   string // what it was waiting for when it cut; "" before
}

// idleWatchKey carries a plain request's idleWatch to the reverse proxy's error handler.
type idleWatchKey struct{}

func newIdleWatch(w http.ResponseWriter, idle, thinkTime time.Duration, cancel context.CancelFunc, onCut func(string)) *idleWatch {
	iw := &idleWatch{idle: idle, thinkTime: thinkTime, rc: http.NewResponseController(w), cancel: cancel, onCut: onCut}
	iw.progress()
	iw.mu.Lock()
	iw.timer = time.AfterFunc(idle, iw.fire)
	iw.mu.Unlock()
	return iw
}

// progress says a byte moved: the request is not idle before the timeout from now.
func (iw *idleWatch) progress() { iw.quietUntil.Store(time.Now().Add(iw.idle).UnixNano()) }

// upstreamsTurn says the client's part of the request is over: the upstream's answer is bounded by the
// upstream response timeout, so it is not cut before the longer of that and its own timeout.
func (iw *idleWatch) upstreamsTurn() {
	iw.quietUntil.Store(time.Now().Add(max(iw.idle, iw.thinkTime)).UnixNano())
}

func (iw *idleWatch) fire() {
	iw.mu.Lock()
	defer iw.mu.Unlock()
	if iw.done {
		return
	}
	if wait := time.Until(time.Unix(0, iw.quietUntil.Load())); wait > 0 {
		iw.timer.Reset(wait)
		return
	}
	iw.cut = cutOther
	if iw.reading.Load() {
		iw.cut = cutClientBody
	}
	iw.cancel()
	_ = iw.rc.SetReadDeadline(time.Unix(1, 0))
	if iw.writing.Load() {
		_ = iw.rc.SetWriteDeadline(time.Unix(1, 0))
	} else {
		// What the client has not been sent yet (an error page, or the head and the first bytes of a
		// response the upstream stopped sending) still goes out, within a bound of its own.
		_ = iw.rc.SetWriteDeadline(time.Now().Add(iw.idle))
	}
	iw.onCut(iw.cut)
}

// stop ends the watch; once it returns, the watch touches neither connection again.
func (iw *idleWatch) stop() {
	iw.mu.Lock()
	defer iw.mu.Unlock()
	iw.done = true
	iw.timer.Stop()
}

// cutFor says what the request was waiting for when the watch cut it, or "" when it did not.
func (iw *idleWatch) cutFor() string {
	iw.mu.Lock()
	defer iw.mu.Unlock()
	return iw.cut
}

// watchedBody is a plain request's body as the reverse proxy reads it: each byte read is progress, and
// its end is the upstream's turn.
type watchedBody struct {
	io.ReadCloser
	iw *idleWatch
}

func (b *watchedBody) Read(p []byte) (int, error) {
	b.iw.reading.Store(true)
	n, err := b.ReadCloser.Read(p)
	b.iw.reading.Store(false)
	if n > 0 {
		b.iw.progress()
	}
	if err != nil {
		b.iw.upstreamsTurn()
	}
	return n, err
}

// watchedWriter is a plain request's response writer: each write that completes is progress.
type watchedWriter struct {
	http.ResponseWriter
	iw *idleWatch
}

func (w *watchedWriter) Write(p []byte) (int, error) {
	w.iw.writing.Store(true)
	n, err := w.ResponseWriter.Write(p)
	w.iw.writing.Store(false)
	if n > 0 {
		w.iw.progress()
	}
	return n, err
}

// FlushError flushes through to the connection (the reverse proxy flushes streamed responses).
func (w *watchedWriter) FlushError() error {
	w.iw.writing.Store(true)
	err := http.NewResponseController(w.ResponseWriter).Flush()
	w.iw.writing.Store(false)
	if err == nil {
		w.iw.progress()
	}
	return err
}

// Unwrap lets http.ResponseController reach the connection's other controls.
func (w *watchedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
