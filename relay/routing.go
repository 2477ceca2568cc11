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

	// perTunnel: the listener is on auto and the relay's auto loaded the kernel engine, so its plain tunnels
	// move between engines as their traffic changes (automove.go).
	perTunnel bool
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
func (s *Server) openUpstream(r *http.Request, route Route, wsKey string) (*dialedUpstream, *refusal, error) {
	pool := route.Pool
	return s.withRetries(r.RemoteAddr, pool, pool.Key(s.clientOf(r).ip, r),
		func(addr string, deadline time.Time) (*dialedUpstream, *refusal, error) {
			return s.tryUpstream(r, addr, wsKey, route, deadline)
		})
}

// withRetries runs attempt on servers of pool until one succeeds, within the pool's retry tries and time,
// reporting each outcome to the pool's passive health. attempt returns a handshake error for a failure
// of the server, and an error to stop trying (the client left).
//
// The retry timeout bounds when another try may start, not the try under way (as nginx's
// proxy_next_upstream_timeout), so that an upstream is always given --upstream-timeout to answer. A try
// connects within the deadline attempt gets, the connect timeout plus the upstream response timeout (TCP
// within the first, a wss pool's TLS handshake within the second), and then the upstream has the upstream
// response timeout to answer: a handshake lasts at most the retry timeout plus one try.
func (s *Server) withRetries(client string, pool *upstream.Pool, hashKey string,
	attempt func(addr string, deadline time.Time) (*dialedUpstream, *refusal, error)) (*dialedUpstream, *refusal, error) {
	retry := pool.Retry()
	deadline := time.Now().Add(retry.Timeout)
	var (
		tried []*upstream.Server
		last  *refusal
	)
	for try := 1; ; try++ {
		lease, err := pool.Pick(hashKey, tried)
		if err != nil {
			if last != nil {
				// Every server was tried: the last failure says more than "none left".
				return nil, last, nil
			}
			return nil, &refusal{status: http.StatusServiceUnavailable, reason: FailNoUpstream, msg: err.Error()}, nil
		}
		if last != nil {
			// Counted once another server is really tried, not when there is none left.
			s.metrics.upstreamRetries.Inc()
			s.log.Info("upstream failed, trying another", "client", client, "pool", pool.Name(),
				"failed", tried[len(tried)-1].Address(), "next", lease.Server.Address(), "try", try,
				"reason", last.reason, "err", last.msg)
		}
		s.log.Debug("trying upstream server", "client", client, "pool", pool.Name(), "server", lease.Server.Address(), "try", try)
		up, herr, err := attempt(lease.Server.Address(), time.Now().Add(s.cfg.ConnectTimeout+s.cfg.UpstreamResponseTimeout))
		if err != nil {
			lease.Release()
			return nil, nil, err
		}
		if herr == nil {
			pool.ReportSuccess(lease.Server)
			up.lease = lease
			return up, nil, nil
		}
		if herr.local {
			// The relay, not the server, failed: the server keeps its health, and another one would
			// fail alike.
			lease.Release()
			s.log.Warn("relay out of local resources connecting to an upstream", "client", client,
				"pool", pool.Name(), "server", lease.Server.Address(), "err", herr.msg)
			return nil, herr, nil
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

// tryUpstream connects to addr before connectDeadline (see withRetries) and forwards the handshake there,
// which the upstream must answer within the response timeout. It returns a handshake error for a failure
// of the upstream, and an error only when the client left meanwhile.
func (s *Server) tryUpstream(r *http.Request, addr, wsKey string, route Route, connectDeadline time.Time) (*dialedUpstream, *refusal, error) {
	ctx := r.Context()
	var client, local net.Addr
	if route.SendProxy != "" || route.UpstreamTLS != nil {
		// The PROXY header and the TLS handshake take connectDeadline from ctx. A plain dial needs no
		// deadline of its own (nor a timer): the dialer's connect timeout ends it well before connectDeadline.
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, connectDeadline)
		defer cancel()
		client = clientAddr(r)
		local, _ = r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	}
	up, herr := s.connectServer(ctx, addr, route, client, local)
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
	resp, prefix, herr := s.forwardHandshake(stream, r, wsKey)
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
// (for a TLS pool), all before ctx's deadline (see withRetries).
func (s *Server) connectServer(ctx context.Context, addr string, route Route, client, local net.Addr) (*dialedUpstream, *refusal) {
	conn, err := s.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		if upstream.IsLocalResourceError(err) {
			return nil, &refusal{status: http.StatusServiceUnavailable, reason: FailLocalResources, local: true,
				msg: fmt.Sprintf("connect to upstream %s: the relay is out of resources: %v", addr, err)}
		}
		return nil, &refusal{status: http.StatusBadGateway, reason: FailUpstreamUnreachable,
			msg: fmt.Sprintf("connect to upstream %s: %v", addr, err)}
	}
	up := &dialedUpstream{conn: conn.(*net.TCPConn)}
	if route.SendProxy != "" {
		// The upstream learns who the client is before any of its bytes.
		deadline, _ := ctx.Deadline()
		if err := sendProxyHeader(up.conn, proxyHeader(route.SendProxy, client, local), deadline); err != nil {
			up.conn.Close()
			return nil, &refusal{status: http.StatusBadGateway, reason: FailUpstreamError,
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
			return nil, &refusal{status: http.StatusBadGateway, reason: FailUpstreamTLS,
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
	route, ok := s.route(r)
	if !ok {
		s.refuse(w, r, &refusal{status: http.StatusNotFound, reason: FailNoRoute,
			msg: fmt.Sprintf("no route for host %q and path %q on listener %q", r.Host, r.URL.Path, s.listenerOf(r).name)})
		return Route{}, false
	}
	if !s.originAllowed(r, route) {
		s.refuse(w, withPool(r, route.Pool), &refusal{status: http.StatusForbidden, reason: FailOrigin,
			msg: fmt.Sprintf("origin %q is not allowed here", r.Header.Get("Origin"))})
		return Route{}, false
	}
	s.log.Debug("route chosen", "client", r.RemoteAddr, "listener", s.listenerOf(r).name, "host", r.Host,
		"uri", r.RequestURI, "pool", route.Pool.Name())
	return route, true
}

// route finds r's route on its listener. Routes match the path with each segment's ";parameters" left
// out, as servlet containers (Tomcat, Jetty, Spring) resolve "/admin;jsessionid=1" to "/admin": matched as
// sent, "/admin;x" would miss the route of "/admin", and its origins, for a catch-all, while such an
// upstream serves /admin. The upstream still gets the path as sent.
func (s *Server) route(r *http.Request) (Route, bool) {
	return s.routeFor(r, withoutSegmentParams(r.URL.Path))
}

// routeFor finds the route r would have with path instead of its own.
func (s *Server) routeFor(r *http.Request, path string) (Route, bool) {
	if path != r.URL.Path {
		u := *r.URL
		u.Path, u.RawPath = path, ""
		r = r.WithContext(r.Context()) // a shallow copy, for the Router to see path
		r.URL = &u
	}
	return s.Router().Route(s.listenerOf(r).name, r)
}

// withoutSegmentParams is path with each segment's ";parameters" removed.
func withoutSegmentParams(path string) string {
	if !strings.Contains(path, ";") {
		return path
	}
	segs := strings.Split(path, "/")
	for i, seg := range segs {
		segs[i], _, _ = strings.Cut(seg, ";")
	}
	return strings.Join(segs, "/")
}

// originAllowed says whether r's Origin passes route's allow-list, and also the allow-list of the route
// its path has in lower case. Routes match paths case-sensitively, as nginx's do, so "/Admin" is not the
// route of "/admin"; but an upstream that ignores case serves /admin for it, and a cross-site page must
// not reach that through a catch-all route without the allow-list.
func (s *Server) originAllowed(r *http.Request, route Route) bool {
	origin := strings.ToLower(r.Header.Get("Origin"))
	if len(route.Origins) > 0 && !slices.Contains(route.Origins, origin) {
		return false
	}
	path := withoutSegmentParams(r.URL.Path)
	if lower := strings.ToLower(path); lower != path {
		if folded, ok := s.routeFor(r, lower); ok && len(folded.Origins) > 0 && !slices.Contains(folded.Origins, origin) {
			return false
		}
	}
	return true
}
