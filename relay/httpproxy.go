package relay

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// upstreamAddrKey carries the server that serveRequest chose to the reverse proxy's Rewrite, and
// upstreamTLSKey its route's TLS settings (for a wss pool) to the transport's dialer.
type (
	upstreamAddrKey struct{}
	upstreamTLSKey  struct{}
	proxyHeaderKey  struct{} // the PROXY header a pool with proxy_protocol gets first on each connection
)

// serveRequest reverse-proxies a plain HTTP request to a server of its route's pool, holding a lease on
// the server while the request runs, so that least_tunnels and max_tunnels see it.
func (s *Server) serveRequest(w http.ResponseWriter, r *http.Request) {
	status := 0
	route, ok := s.route(r)
	pool := route.Pool
	var lease *upstream.Lease
	if !ok {
		status = http.StatusNotFound
	} else {
		var err error
		noteUpstream(r, pool.Name(), "")
		if lease, err = pool.Pick(pool.Key(s.clientOf(r).ip, r), nil); err != nil {
			status = http.StatusServiceUnavailable
			s.log.Warn("proxy request failed", "client", r.RemoteAddr, "method", r.Method, "uri", r.RequestURI,
				"status", status, "err", err)
		}
	}
	if status != 0 {
		s.metrics.httpRequests.WithLabelValues(strconv.Itoa(status)).Inc()
		http.Error(w, http.StatusText(status), status)
		return
	}
	defer lease.Release()
	noteUpstream(r, pool.Name(), lease.Server.Address())
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	iw := newIdleWatch(w, s.cfg.HTTPIdleTimeout, s.cfg.UpstreamResponseTimeout, cancel, func(waitingFor string) {
		s.log.Info("plain request cut: nothing moved", "client", r.RemoteAddr, "method", r.Method,
			"uri", r.RequestURI, "upstream", lease.Server.Address(), "idle", s.cfg.HTTPIdleTimeout, "waiting_for", waitingFor)
	})
	defer iw.stop()
	ctx = context.WithValue(ctx, idleWatchKey{}, iw)
	ctx = context.WithValue(ctx, upstreamAddrKey{}, lease.Server.Address())
	if route.UpstreamTLS != nil {
		ctx = context.WithValue(ctx, upstreamTLSKey{}, route.UpstreamTLS)
	}
	if route.SendProxy != "" {
		local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		ctx = context.WithValue(ctx, proxyHeaderKey{}, proxyHeader(route.SendProxy, clientAddr(r), local))
	}
	r = r.WithContext(ctx)
	if r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
		r.Body = &watchedBody{ReadCloser: r.Body, iw: iw}
	} else {
		iw.upstreamsTurn()
	}
	s.proxy.ServeHTTP(&watchedWriter{ResponseWriter: w, iw: iw}, r)
}

func (s *Server) newReverseProxy() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			scheme := "http"
			if pr.In.Context().Value(upstreamTLSKey{}) != nil {
				scheme = "https"
			}
			pr.SetURL(&url.URL{Scheme: scheme, Host: pr.In.Context().Value(upstreamAddrKey{}).(string)})
			if pr.In.Context().Value(proxyHeaderKey{}) != nil || scheme == "https" {
				// A connection whose PROXY header names this client must carry no other's request; and
				// the transport pools connections by address alone, so one opened with a wss pool's TLS
				// settings (client certificate, server name) must not serve another pool's request.
				pr.Out.Close = true
			}
			pr.Out.Host = pr.In.Host // as in the WebSocket path: the upstream sees the Host the client asked for
			setForwarded(pr.Out.Header, pr.In, s.clientOf(pr.In))
		},
		Transport: &http.Transport{
			DialContext: s.dialUpstream,
			// A wss pool's plain requests: its TLS settings come with the request.
			DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				cfgFor, _ := ctx.Value(upstreamTLSKey{}).(func(string) *tls.Config)
				if cfgFor == nil {
					return nil, fmt.Errorf("https to %s without the pool's TLS settings", addr)
				}
				conn, err := s.dialUpstream(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				tc := tls.Client(conn, cfgFor(addr))
				if err := tc.HandshakeContext(ctx); err != nil {
					conn.Close()
					return nil, fmt.Errorf("TLS handshake with upstream %s: %w", addr, err)
				}
				return tc, nil
			},
			ResponseHeaderTimeout: s.cfg.UpstreamResponseTimeout,
			// As for a handshake's answer: an upstream's response head costs at most this much, not
			// the transport's default 10 MB.
			MaxResponseHeaderBytes: int64(s.cfg.MaxHeaderBytes),
			MaxIdleConnsPerHost:    64,
			IdleConnTimeout:        90 * time.Second,
		},
		ModifyResponse: func(resp *http.Response) error {
			if iw, _ := resp.Request.Context().Value(idleWatchKey{}).(*idleWatch); iw != nil {
				iw.progress() // the answer's head came: from here on, its bytes must keep moving
			}
			s.metrics.httpRequests.WithLabelValues(strconv.Itoa(resp.StatusCode)).Inc()
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			status := http.StatusBadGateway
			switch {
			case isTimeout(err):
				status = http.StatusGatewayTimeout
			case upstream.IsLocalResourceError(err):
				status = http.StatusServiceUnavailable // the relay's own shortage, as for handshakes
			}
			if iw, _ := r.Context().Value(idleWatchKey{}).(*idleWatch); iw != nil {
				switch iw.cutFor() {
				case cutClientBody:
					status = http.StatusRequestTimeout
					w.Header().Set("Connection", "close")
				case cutOther:
					status = http.StatusGatewayTimeout
					w.Header().Set("Connection", "close")
				}
			}
			s.metrics.httpRequests.WithLabelValues(strconv.Itoa(status)).Inc()
			s.log.Warn("proxy request failed", "client", r.RemoteAddr, "method", r.Method, "uri", r.RequestURI,
				"status", status, "err", err)
			http.Error(w, http.StatusText(status), status)
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// dialUpstream connects the reverse proxy to a server, first sending the PROXY header that the request's
// pool asks for (set by serveRequest).
func (s *Server) dialUpstream(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := s.dialer.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if header, ok := ctx.Value(proxyHeaderKey{}).([]byte); ok {
		deadline, _ := ctx.Deadline()
		if err := sendProxyHeader(conn, header, deadline); err != nil {
			conn.Close()
			return nil, fmt.Errorf("send PROXY header to upstream %s: %w", addr, err)
		}
	}
	return conn, nil
}
