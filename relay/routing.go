package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/sockrelay/sockrelay/upstream"
)

// Router chooses the upstream pool for a request that came in on a listener. A configuration reload
// swaps the Router (SetRouter); tunnels already open keep their server.
type Router interface {
	// Route returns where r, which arrived on the listener named listener, goes, or false when no route
	// matches it (the client gets a 404).
	Route(listener string, r *http.Request) (Route, bool)
	// Pools lists every pool, for the admin API.
	Pools() []*upstream.Pool
}

// Route is where the requests a route matches go.
type Route struct {
	Pool *upstream.Pool
	// Origins, when not empty, are the only Origin header values a WebSocket handshake may carry
	// (exact, lower-case scheme://host[:port]); others get 403. Browsers always send Origin, so this keeps
	// other sites' pages from opening WebSockets with the user's cookies (cross-site WebSocket hijacking).
	Origins []string
	// SendProxy, "v1" or "v2", starts every connection to the pool's servers with a PROXY protocol header
	// naming the client; "" sends none.
	SendProxy string
	// UpstreamTLS, when set, makes the pool's servers wss upstreams: it gives the TLS client settings for
	// a server's address (tlsconf.Client.Config). Their tunnels use the copy datapath.
	UpstreamTLS func(serverAddr string) *tls.Config
}

// DefaultListener names the listener of Serve, which has no name of its own.
const DefaultListener = "default"

// singlePool routes every request to one pool: the relay configured by flags (--upstream).
type singlePool struct{ pool *upstream.Pool }

func (s singlePool) Route(string, *http.Request) (Route, bool) { return Route{Pool: s.pool}, true }
func (s singlePool) Pools() []*upstream.Pool                   { return []*upstream.Pool{s.pool} }

// NewSinglePoolRouter returns a Router that sends everything to one round-robin pool over addrs, as
// `sockrelay run --upstream` does. It checks every address.
func NewSinglePoolRouter(addrs []string) (Router, error) {
	if len(addrs) == 0 {
		return nil, errors.New("no upstream: give at least one HOST:PORT")
	}
	spec := upstream.PoolSpec{Name: "default", Balance: upstream.RoundRobin}
	for _, a := range addrs {
		if err := upstream.CheckAddress(a); err != nil {
			return nil, fmt.Errorf("upstream %q: %w", a, err)
		}
		spec.Servers = append(spec.Servers, upstream.ServerSpec{Address: a})
	}
	p, err := upstream.New(spec.WithDefaults(), upstream.Options{})
	if err != nil {
		return nil, err
	}
	return singlePool{p}, nil
}

// routerBox lets an interface value live in an atomic.Pointer.
type routerBox struct{ Router }

// SetRouter makes r route every new tunnel and request from now on.
func (s *Server) SetRouter(r Router) {
	s.router.Store(&routerBox{r})
	if s.metrics != nil { // nil while NewServer sets the first Router
		s.metrics.knowPools(r.Pools())
	}
}

// Router returns the Router in force.
func (s *Server) Router() Router { return s.router.Load().Router }

// listenerKey carries the listenerInfo of the listener a request came in on.
type listenerKey struct{}

// listenerInfo is what a request needs to know of its listener.
type listenerInfo struct {
	name     string
	datapath Datapath // resolved: never auto
	trusted  []netip.Prefix
	limiter  *limiter // the listener's own Limits; nil without
}

// limitersFor returns the limiters a handshake or connection on listener passes: the server's, then the
// listener's.
func (s *Server) limitersFor(listener listenerInfo) []*limiter {
	if listener.limiter != nil {
		return []*limiter{s.limiter, listener.limiter}
	}
	return []*limiter{s.limiter}
}

// listenerOf returns the listener r came in on; a request served other than by ServeListener (a test
// calling ServeHTTP) is on the default listener.
func (s *Server) listenerOf(r *http.Request) listenerInfo {
	if info, ok := r.Context().Value(listenerKey{}).(listenerInfo); ok {
		return info
	}
	return listenerInfo{name: DefaultListener, datapath: s.cfg.Datapath}
}

// dialedUpstream is an upstream that accepted the forwarded handshake with a well-formed response.
type dialedUpstream struct {
	lease  *upstream.Lease
	conn   *net.TCPConn
	tls    *tls.Conn // over conn, for a wss upstream
	resp   *http.Response
	prefix []byte // bytes the upstream sent after its response head
}

// errClientGone says the client left while an upstream was being tried.
var errClientGone = errors.New("client closed during the handshake")

// openUpstream forwards the client's upgrade request to a server of pool and reads its answer. When the
// connect or the handshake fails, which is always before any byte of a response reached the client, it
// reports the failure to the pool (passive health) and tries another server, within the pool's retry
// tries and time. A well-formed answer, 101 or not, ends the tries: an upstream's refusal is passed on.
func (s *Server) openUpstream(r *http.Request, route Route, wsKey string) (*dialedUpstream, *handshakeError, error) {
	pool := route.Pool
	return s.withRetries(r.RemoteAddr, pool, pool.Key(s.clientOf(r).ip, r),
		func(addr string, deadline time.Time) (*dialedUpstream, *handshakeError, error) {
			return s.tryUpstream(r, addr, wsKey, route, deadline)
		})
}

// withRetries runs attempt on servers of pool until one succeeds, within the pool's retry tries and time,
// reporting each outcome to the pool's passive health. attempt returns a handshake error for a failure
// of the server, and an error to stop trying (the client left).
func (s *Server) withRetries(client string, pool *upstream.Pool, hashKey string,
	attempt func(addr string, deadline time.Time) (*dialedUpstream, *handshakeError, error)) (*dialedUpstream, *handshakeError, error) {
	retry := pool.Retry()
	deadline := time.Now().Add(retry.Timeout)
	var (
		tried []*upstream.Server
		last  *handshakeError
	)
	for try := 1; ; try++ {
		lease, err := pool.Pick(hashKey, tried)
		if err != nil {
			if last != nil {
				// Every server was tried: the last failure says more than "none left".
				return nil, last, nil
			}
			return nil, &handshakeError{status: http.StatusServiceUnavailable, reason: FailNoUpstream, msg: err.Error()}, nil
		}
		if last != nil {
			// Counted once another server is really tried, not when there is none left.
			s.metrics.upstreamRetries.Inc()
			s.log.Info("upstream failed, trying another", "client", client, "pool", pool.Name(),
				"failed", tried[len(tried)-1].Address(), "next", lease.Server.Address(), "try", try,
				"reason", last.reason, "err", last.msg)
		}
		up, herr, err := attempt(lease.Server.Address(), deadline)
		if err != nil {
			lease.Release()
			return nil, nil, err
		}
		if herr == nil {
			pool.ReportSuccess(lease.Server)
			up.lease = lease
			return up, nil, nil
		}
		pool.ReportFailure(lease.Server)
		lease.Release()
		tried = append(tried, lease.Server)
		last = herr
		if try >= retry.Tries || !time.Now().Before(deadline) {
			return nil, last, nil
		}
	}
}

// tryUpstream connects to addr and forwards the handshake there, within the connect and response
// timeouts and never past retryDeadline, which bounds all tries together. It returns a handshake error for
// a failure of the upstream, and an error only when the client left meanwhile.
func (s *Server) tryUpstream(r *http.Request, addr, wsKey string, route Route, retryDeadline time.Time) (*dialedUpstream, *handshakeError, error) {
	ctx, cancel := context.WithDeadline(r.Context(), retryDeadline)
	defer cancel()
	local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	up, herr := s.connectServer(ctx, addr, route, clientAddr(r), local)
	if herr != nil {
		if r.Context().Err() != nil {
			return nil, nil, errClientGone
		}
		return nil, herr, nil
	}
	// A client that leaves while the upstream thinks (net/http cancels the request's context when it sees
	// the connection close) releases the upstream at once instead of at the response timeout.
	stopWatch := context.AfterFunc(r.Context(), func() { _ = up.conn.SetDeadline(time.Unix(1, 0)) })
	var stream net.Conn = up.conn
	if up.tls != nil {
		stream = up.tls
	}
	resp, prefix, herr := s.forwardHandshake(stream, r, wsKey, retryDeadline)
	if !stopWatch() {
		up.conn.Close()
		return nil, nil, errClientGone
	}
	if herr != nil {
		up.conn.Close()
		herr.msg = fmt.Sprintf("upstream %s: %s", addr, herr.msg)
		return nil, herr, nil
	}
	up.resp, up.prefix = resp, prefix
	return up, nil, nil
}

// connectServer opens one tunnel's connection to the server at addr of route, for a WebSocket or a tcp
// listener alike: TCP connect, then the PROXY header naming client (when the route sends one), then TLS
// (for a TLS pool), all before ctx's deadline, which is the retry deadline bounding every try.
func (s *Server) connectServer(ctx context.Context, addr string, route Route, client, local net.Addr) (*dialedUpstream, *handshakeError) {
	conn, err := s.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamUnreachable,
			msg: fmt.Sprintf("connect to upstream %s: %v", addr, err)}
	}
	up := &dialedUpstream{conn: conn.(*net.TCPConn)}
	if route.SendProxy != "" {
		// The upstream learns who the client is before any of its bytes.
		deadline, _ := ctx.Deadline()
		if err := sendProxyHeader(up.conn, proxyHeader(route.SendProxy, client, local), deadline); err != nil {
			up.conn.Close()
			return nil, &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamError,
				msg: fmt.Sprintf("send PROXY header to upstream %s: %v", addr, err)}
		}
	}
	if route.UpstreamTLS != nil {
		up.tls = tls.Client(up.conn, route.UpstreamTLS(addr))
		hctx, cancel := context.WithTimeout(ctx, s.cfg.UpstreamResponseTimeout)
		err := up.tls.HandshakeContext(hctx)
		cancel()
		if err != nil {
			up.conn.Close()
			return nil, &handshakeError{status: http.StatusBadGateway, reason: FailUpstreamTLS,
				msg: fmt.Sprintf("TLS handshake with upstream %s: %v", addr, err)}
		}
	}
	return up, nil
}

// clientAddr is r's client as a TCP address (the PROXY header's, on a PROXY protocol listener), for the
// PROXY header an upstream gets; nil when it is not IP:port.
func clientAddr(r *http.Request) net.Addr {
	if a, err := net.ResolveTCPAddr("tcp", r.RemoteAddr); err == nil {
		return a
	}
	return nil
}

// CloseTunnelsTo ends every tunnel whose upstream is one of servers, for a reload that removed them from
// their pool with close_tunnels_on_removal. It returns how many it closed.
//
// A handshake that picked one of servers before the reload and ends after it must not open a tunnel
// either: the servers are remembered (until they return to a pool), and a tunnel registered to one of them
// is closed at once (see evicted).
func (s *Server) CloseTunnelsTo(servers []*upstream.Server) int {
	s.evictMu.Lock()
	if s.evictedServers == nil {
		s.evictedServers = map[*upstream.Server]bool{}
	}
	for srv := range s.evictedServers {
		if !srv.Removed() {
			delete(s.evictedServers, srv) // back in a pool: its tunnels are welcome again
		}
	}
	for _, srv := range servers {
		s.evictedServers[srv] = true
	}
	s.evictMu.Unlock()
	n := 0
	for _, t := range s.tunnels.Tunnels() {
		for _, srv := range servers {
			if t.lease != nil && t.lease.Server == srv {
				t.end(ReasonUpstreamRemoved, true)
				n++
				break
			}
		}
	}
	return n
}

// evicted says whether srv was removed from its pool with its tunnels closed (CloseTunnelsTo), and is
// still out of it.
func (s *Server) evicted(srv *upstream.Server) bool {
	s.evictMu.Lock()
	defer s.evictMu.Unlock()
	return s.evictedServers[srv] && srv.Removed()
}

// routeOrRefuse finds the route of a handshake, or answers 404 (no route) or 403 (an Origin the route
// does not allow) and returns false.
func (s *Server) routeOrRefuse(w http.ResponseWriter, r *http.Request) (Route, bool) {
	route, ok := s.Router().Route(s.listenerOf(r).name, r)
	if !ok {
		s.refuse(w, r, &handshakeError{status: http.StatusNotFound, reason: FailNoRoute,
			msg: fmt.Sprintf("no route for host %q and path %q on listener %q", r.Host, r.URL.Path, s.listenerOf(r).name)})
		return Route{}, false
	}
	if len(route.Origins) > 0 {
		origin := strings.ToLower(r.Header.Get("Origin"))
		if !slices.Contains(route.Origins, origin) {
			s.refuse(w, withPool(r, route.Pool), &handshakeError{status: http.StatusForbidden, reason: FailOrigin,
				msg: fmt.Sprintf("origin %q is not allowed here", r.Header.Get("Origin"))})
			return Route{}, false
		}
	}
	return route, true
}
