package relay

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sockrelay/sockrelay/upstream"
)

// TunnelInfo is one live tunnel as /debug/tunnels shows it.
type TunnelInfo struct {
	ID       uint64   `json:"id"`
	Client   string   `json:"client"`
	Upstream string   `json:"upstream"`
	Pool     string   `json:"pool"`
	Listener string   `json:"listener"`
	Datapath Datapath `json:"datapath"`
	// TLS says the tunnel has TLS on a side (a TLS listener, a wss upstream), which keeps it on copy.
	TLS bool `json:"tls,omitempty"`
	// EventLoop says the copy datapath's event loops carry the tunnel (a copy tunnel with TLS on a side, or
	// one the loops could not take, runs on goroutines).
	EventLoop       bool      `json:"event_loop,omitempty"`
	BytesToUpstream uint64    `json:"bytes_to_upstream"`
	BytesToClient   uint64    `json:"bytes_to_client"`
	Started         time.Time `json:"started"`
	// Auto says the per-tunnel policy in force can move the tunnel off the engine it is on now (auto's
	// sampler watches it); Moves, how many moves it made in this process, watched now or not.
	Auto  bool `json:"auto,omitempty"`
	Moves int  `json:"moves,omitempty"`
}

// Info describes t for /debug/tunnels.
func (t *Tunnel) Info() TunnelInfo {
	up, down := t.Bytes()
	return TunnelInfo{
		ID:              t.ID,
		Client:          t.ClientAddr,
		Upstream:        t.UpstreamAddr,
		Pool:            t.Pool,
		Listener:        t.Listener,
		Datapath:        t.Datapath(),
		TLS:             t.pair.TLS(),
		EventLoop:       t.pair.OnEventLoop(),
		BytesToUpstream: up,
		BytesToClient:   down,
		Started:         t.Started,
	}
}

// AdminAccess says who may use the admin endpoints. Whatever it says, a request whose Origin header is
// not the admin's own (a page of another site, in a browser) is refused with 403, and one whose Host is
// neither an IP address, localhost nor one of Hosts (a DNS name rebound to the admin's address) with 421.
type AdminAccess struct {
	// Token, when not empty, must come as "Authorization: Bearer TOKEN" with every request that changes
	// something (any method but GET and HEAD); others get 401.
	Token string
	// Unauthenticated lets requests that change something through without a token: for a listener whose
	// clients are authenticated otherwise, such as a Unix socket only its owner can connect to. Without
	// it (and without Token) they get 403.
	Unauthenticated bool
	// Hosts are the host names, besides IP addresses and localhost, that the Host header may give.
	Hosts []string
}

// AdminHandler is AdminHandlerWith with AdminAccess{Unauthenticated: true}: for a listener that only
// operators can reach. A TCP admin listener needs AdminHandlerWith and a token.
func (s *Server) AdminHandler(gatherer prometheus.Gatherer) http.Handler {
	return s.AdminHandlerWith(gatherer, AdminAccess{Unauthenticated: true})
}

// AdminHandlerWith serves the operator's endpoints: /metrics from gatherer, /healthz (503 once the server
// is draining, so a balancer in front stops sending clients), /debug/tunnels (JSON, one object per live
// tunnel), and the admin API under /admin/ (see adminAPI), to the requests access lets through. The admin
// listener is for operators only: bind it to loopback, a Unix socket or a management network.
func (s *Server) AdminHandlerWith(gatherer prometheus.Gatherer, access AdminAccess) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if s.draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /debug/tunnels", s.listTunnels)
	s.adminAPI(mux)
	return &adminGuard{next: mux, access: access, tokenSum: sha256.Sum256([]byte(access.Token)), log: s.log}
}

// adminGuard lets through the admin requests its AdminAccess allows.
type adminGuard struct {
	next     http.Handler
	access   AdminAccess
	tokenSum [sha256.Size]byte // of access.Token: compared in constant time, whatever the lengths
	log      *slog.Logger
}

func (g *adminGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if status, why := g.refusal(r); status != 0 {
		g.log.Warn("admin request refused", "client", r.RemoteAddr, "method", r.Method, "uri", r.RequestURI,
			"host", r.Host, "origin", r.Header.Get("Origin"), "status", status, "why", why)
		if status == http.StatusUnauthorized {
			w.Header().Set("WWW-Authenticate", `Bearer realm="sockrelay admin"`)
		}
		adminError(w, status, "%s", why)
		return
	}
	g.next.ServeHTTP(w, r)
}

// refusal returns the status and the reason to refuse r with, or 0.
func (g *adminGuard) refusal(r *http.Request) (int, string) {
	if !g.hostAllowed(r.Host) {
		return http.StatusMisdirectedRequest, fmt.Sprintf("host %q is not this admin's: use its IP address or localhost, or configure the name (admin.hosts, --admin-host)", r.Host)
	}
	// Browsers send Origin with every cross-origin request but simple GETs; the admin has no page of its
	// own, so any Origin but its own is another site's page acting with the user's access to it.
	if origin := r.Header.Get("Origin"); origin != "" && !strings.EqualFold(origin, "http://"+r.Host) {
		return http.StatusForbidden, fmt.Sprintf("origin %q is not this admin's: the admin API does not serve other sites' pages", origin)
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return 0, ""
	}
	switch {
	case g.access.Token != "":
		given, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(given))
		if !ok || subtle.ConstantTimeCompare(sum[:], g.tokenSum[:]) != 1 {
			return http.StatusUnauthorized, "this request changes the relay: send the admin token as Authorization: Bearer TOKEN (sockrelay reload reads it from --admin-token-file or the file's admin.token_file)"
		}
	case !g.access.Unauthenticated:
		return http.StatusForbidden, "this request changes the relay, and the admin has no token to authenticate it: give the relay --admin-token-file (admin.token_file), or serve the admin on a Unix socket (--admin unix:/PATH)"
	}
	return 0, ""
}

// hostAllowed says whether a request's Host names this admin: an IP address, localhost, or a configured
// name (with any port). Another name may be one an attacker's DNS points at 127.0.0.1 for a browser.
func (g *adminGuard) hostAllowed(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if _, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return true
	}
	return host == "" || host == "localhost" || slices.Contains(g.access.Hosts, host)
}

func (s *Server) listTunnels(w http.ResponseWriter, r *http.Request) {
	ts := s.tunnels.Tunnels()
	infos := make([]TunnelInfo, len(ts))
	for i, t := range ts {
		infos[i] = t.Info()
		infos[i].Moves, infos[i].Auto = s.auto.movesOf(t)
	}
	writeJSON(w, http.StatusOK, infos)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// adminError is the admin API's answer to a request it cannot carry out.
func adminError(w http.ResponseWriter, status int, format string, args ...any) {
	writeJSON(w, status, map[string]string{"error": fmt.Sprintf(format, args...)})
}

// adminAPI adds the run-time controls:
//
//	GET    /admin/pools                          every pool with its servers' state and live tunnels
//	POST   /admin/pools/{pool}/servers/{server}  weight=N, drain=true|false, down=true|false (form or query)
//	GET    /admin/tunnels                        the live tunnels (as /debug/tunnels)
//	DELETE /admin/tunnels/{id}                   closes one tunnel, both sides
//	POST   /admin/reload                         re-reads the configuration file (as SIGHUP)
//	POST   /admin/upgrade                        starts a new relay process that takes the listeners over (as SIGUSR2)
func (s *Server) adminAPI(mux *http.ServeMux) {
	mux.HandleFunc("GET /admin/pools", func(w http.ResponseWriter, r *http.Request) {
		pools := s.Router().Pools()
		snaps := make([]upstream.Snapshot, len(pools))
		for i, p := range pools {
			snaps[i] = p.Snapshot()
		}
		writeJSON(w, http.StatusOK, snaps)
	})
	mux.HandleFunc("POST /admin/pools/{pool}/servers/{server}", s.setServer)
	mux.HandleFunc("GET /admin/tunnels", s.listTunnels)
	mux.HandleFunc("DELETE /admin/tunnels/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			adminError(w, http.StatusBadRequest, "tunnel id %q is not a number; ids are in GET /admin/tunnels", r.PathValue("id"))
			return
		}
		for _, t := range s.tunnels.Tunnels() {
			if t.ID == id {
				t.end(ReasonAdmin, true)
				writeJSON(w, http.StatusOK, map[string]any{"closed": id})
				return
			}
		}
		adminError(w, http.StatusNotFound, "no live tunnel %d", id)
	})
	mux.HandleFunc("POST /admin/reload", func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.Reload == nil {
			adminError(w, http.StatusNotImplemented, "this relay runs without a configuration file (--config); there is nothing to reload")
			return
		}
		if err := s.cfg.Reload(); err != nil {
			adminError(w, http.StatusBadRequest, "reload refused, the configuration in force is unchanged: %v", err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"reloaded": "ok"})
	})
	mux.HandleFunc("POST /admin/upgrade", s.upgrade)
}

// UpgradeRequest is the JSON body of POST /admin/upgrade; every field may be left out.
type UpgradeRequest struct {
	// Binary is the new relay's executable, an absolute path; empty: this process's own, read again from
	// disk (so a binary installed over it).
	Binary string `json:"binary,omitempty"`
	// Args are the new process's `sockrelay run` flags; empty: this process's.
	Args []string `json:"args,omitempty"`
	// Timeout is how long the new process may take to start and confirm that it serves, e.g. "30s";
	// empty: the relay's default.
	Timeout string `json:"timeout,omitempty"`
}

// UpgradeResult is the answer to an upgrade the new process took over.
type UpgradeResult struct {
	PID             int    `json:"pid"`     // the new process, which serves now
	OldPID          int    `json:"old_pid"` // this one, which drains its tunnels and exits
	DrainingTunnels int    `json:"draining_tunnels"`
	DrainTimeout    string `json:"drain_timeout"`
	TookMS          int64  `json:"took_ms"` // from the request to the new process's confirmation

	// HandingOver are the tunnels this one hands to the new process (plain ones on copy or splice, when
	// the new process adopts tunnels); DrainingTunnels are the others, which end here.
	HandingOver int `json:"handing_over_tunnels"`
}

// ErrUpgradeRefused is an upgrade refused before it started because of the relay's state: another one
// is in progress, or this process has already handed over. ErrUpgradeBadRequest is one refused for what
// it asks (a binary that is not one to run, a bad timeout).
var (
	ErrUpgradeRefused    = errors.New("upgrade refused")
	ErrUpgradeBadRequest = errors.New("upgrade request refused")
)

func (s *Server) upgrade(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Upgrade == nil {
		adminError(w, http.StatusNotImplemented, "this relay cannot upgrade itself")
		return
	}
	var req UpgradeRequest
	if r.ContentLength != 0 {
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			adminError(w, http.StatusBadRequest, "upgrade request body: %v; accepted a JSON object with binary, args and timeout, each optional", err)
			return
		}
	}
	res, err := s.cfg.Upgrade(r.Context(), req)
	switch {
	case errors.Is(err, ErrUpgradeRefused):
		adminError(w, http.StatusConflict, "%v", err)
	case errors.Is(err, ErrUpgradeBadRequest):
		adminError(w, http.StatusBadRequest, "%v", err)
	case err != nil:
		adminError(w, http.StatusBadGateway, "upgrade failed, this relay keeps serving: %v", err)
	default:
		// This process no longer accepts on the admin listener: a next request must connect anew, to the
		// new process.
		w.Header().Set("Connection", "close")
		writeJSON(w, http.StatusOK, res)
	}
}

// setServer changes one server at run time. Every change asked for is checked before any is made, so a
// bad value changes nothing.
func (s *Server) setServer(w http.ResponseWriter, r *http.Request) {
	var pool *upstream.Pool
	var names []string
	for _, p := range s.Router().Pools() {
		names = append(names, p.Name())
		if p.Name() == r.PathValue("pool") {
			pool = p
		}
	}
	if pool == nil {
		adminError(w, http.StatusNotFound, "no pool %q; pools: %s", r.PathValue("pool"), strings.Join(names, ", "))
		return
	}
	addr := r.PathValue("server")
	if !slices.ContainsFunc(pool.Snapshot().Servers, func(st upstream.ServerState) bool { return st.Address == addr }) {
		adminError(w, http.StatusNotFound, "pool %q: no server %q", pool.Name(), addr)
		return
	}
	if err := r.ParseForm(); err != nil {
		adminError(w, http.StatusBadRequest, "%v", err)
		return
	}
	var changes []func() error
	for key, vals := range r.Form {
		v := vals[len(vals)-1]
		switch key {
		case "weight":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1000 {
				adminError(w, http.StatusBadRequest, "weight: %q is out of range; accepted 1 to 1000", v)
				return
			}
			changes = append(changes, func() error { return pool.SetWeight(addr, n) })
		case "drain", "down":
			b, err := strconv.ParseBool(v)
			if err != nil {
				adminError(w, http.StatusBadRequest, "%s: %q is not true or false", key, v)
				return
			}
			if key == "drain" {
				changes = append(changes, func() error { return pool.SetDrain(addr, b) })
			} else {
				changes = append(changes, func() error { return pool.MarkDown(addr, b) })
			}
		default:
			adminError(w, http.StatusBadRequest, "unknown setting %q; accepted: weight, drain, down", key)
			return
		}
	}
	if len(changes) == 0 {
		adminError(w, http.StatusBadRequest, "nothing to change; give weight=N, drain=true|false or down=true|false")
		return
	}
	for _, change := range changes {
		if err := change(); err != nil {
			// Checked above; only a reload racing this request gets here.
			adminError(w, http.StatusConflict, "pool %q: %v", pool.Name(), err)
			return
		}
	}
	for _, st := range pool.Snapshot().Servers {
		if st.Address == addr {
			s.log.Info("upstream server changed by the admin API", "pool", pool.Name(), "server", addr,
				"weight", st.Weight, "state", st.State)
			writeJSON(w, http.StatusOK, st)
			return
		}
	}
	adminError(w, http.StatusNotFound, "pool %q: no server %q", pool.Name(), addr)
}
