package relay

import (
	"context"
	"log/slog"
	"net/http"
	"time"
)

// logLongLivedTunnels writes a "tunnel alive" record, with the bytes so far, for every tunnel that has
// lived at least interval, once per interval, until stop is closed. A WebSocket may live for days, and
// without these records it would be invisible in the log until it ended. One goroutine serves every
// tunnel: nothing wakes per tunnel, and kernel tunnels' bytes come from the BPF counters as in
// /debug/tunnels. A tunnel's first record comes between one and two intervals after it opened.
func (s *Server) logLongLivedTunnels(interval time.Duration, stop <-chan struct{}) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			for _, t := range s.tunnels.Tunnels() {
				age := now.Sub(t.Started)
				if age < interval {
					continue
				}
				up, down := t.Bytes()
				s.log.Info("tunnel alive", "id", t.ID, "client", t.ClientAddr, "upstream", t.UpstreamAddr,
					"datapath", t.Datapath(), "bytes_to_upstream", up, "bytes_to_client", down,
					"age_s", age.Round(time.Second).Seconds())
			}
		}
	}
}

// millis is d in milliseconds, for log keys that end in _ms: a duration with its unit in the key reads the
// same in text and JSON logs (slog writes a time.Duration in JSON as a bare count of nanoseconds).
func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// requestInfo is what a tunnel's log lines say about the request that opened it.
type requestInfo struct {
	uri, host, userAgent string
}

func describeRequest(r *http.Request) requestInfo {
	return requestInfo{uri: r.RequestURI, host: r.Host, userAgent: r.UserAgent()}
}

// logAttrs are the attributes that name a tunnel in its "tunnel opened" and "tunnel closed" lines.
func (t *Tunnel) logAttrs() []any {
	return []any{"id", t.ID, "client", t.ClientAddr, "listener", t.Listener, "uri", t.req.uri,
		"host", t.req.host, "user_agent", t.req.userAgent, "pool", t.Pool, "upstream", t.UpstreamAddr,
		"datapath", t.Datapath()}
}

// logOpened says at debug level that t is open. nginx logs a WebSocket once, when it ends; an info line
// at both ends would double the log of a relay whose tunnels are short, so the opening is debug.
func (s *Server) logOpened(t *Tunnel) {
	if !s.log.Enabled(context.Background(), slog.LevelDebug) {
		return // before logAttrs: its attributes are garbage on every tunnel of a relay that logs less
	}
	s.log.Debug("tunnel opened", t.logAttrs()...)
}

// logClosed is t's one info line: who, where, how many bytes, how long, and why it ended, with the error
// when a failure ended it.
func (s *Server) logClosed(t *Tunnel, toUpstream, toClient uint64) {
	level := slog.LevelInfo
	if t.Reason() == ReasonHandedOver {
		level = slog.LevelDebug // it goes on in the new process, which logs its end
	}
	if !s.log.Enabled(context.Background(), level) {
		return
	}
	errText := ""
	if t.pair.Err() != nil {
		errText = t.pair.Err().Error()
	}
	s.log.Log(context.Background(), level, "tunnel closed", append(t.logAttrs(), "bytes_to_upstream", toUpstream,
		"bytes_to_client", toClient, "duration_ms", millis(time.Since(t.Started)), "reason", t.Reason(), "err", errText)...)
}

// accessLogKey carries a plain request's access record from withAccessLog to serveRequest, which fills in
// the pool and server it chose.
type accessLogKey struct{}

// accessRecord is one plain (not upgrade) request's access log line, written once it has been answered.
type accessRecord struct {
	http.ResponseWriter
	status       int
	bytes        int64
	pool, server string
}

func (a *accessRecord) WriteHeader(code int) {
	if a.status == 0 && code >= 200 { // 1xx are interim: the final status comes after them
		a.status = code
	}
	a.ResponseWriter.WriteHeader(code)
}

func (a *accessRecord) Write(p []byte) (int, error) {
	if a.status == 0 {
		a.status = http.StatusOK
	}
	n, err := a.ResponseWriter.Write(p)
	a.bytes += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the connection's Flush and deadlines, as the reverse proxy
// needs for streamed responses.
func (a *accessRecord) Unwrap() http.ResponseWriter { return a.ResponseWriter }

func (a *accessRecord) Flush() {
	if f, ok := a.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// withAccessLog writes one info line per plain request that h answers, as nginx's access log does:
// method, URI, host, status, bytes of the response body, duration, client, listener, pool and server.
// Upgrade requests are left to the tunnel's own lines.
func (s *Server) withAccessLog(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isUpgradeRequest(r) {
			h.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		rec := &accessRecord{ResponseWriter: w}
		defer func() {
			status := rec.status
			if status == 0 {
				status = http.StatusOK // net/http's answer to a handler that wrote nothing
			}
			s.log.Info("request", "method", r.Method, "uri", r.RequestURI, "host", r.Host, "status", status,
				"bytes", rec.bytes, "duration_ms", millis(time.Since(start)), "client", r.RemoteAddr,
				"listener", s.listenerOf(r).name, "pool", rec.pool, "upstream", rec.server, "user_agent", r.UserAgent())
		}()
		h.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), accessLogKey{}, rec)))
	})
}

// noteUpstream tells r's access record, if it has one, the pool and server (server may be "") it went to.
func noteUpstream(r *http.Request, pool, server string) {
	if rec, ok := r.Context().Value(accessLogKey{}).(*accessRecord); ok {
		rec.pool, rec.server = pool, server
	}
}
