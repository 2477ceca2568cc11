package relay

import (
	"encoding/json"
	"fmt"
	"net/http"
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
	Datapath Datapath `json:"datapath"`
	// TLS says the tunnel has TLS on a side (a TLS listener, a wss upstream), which keeps it on copy.
	TLS             bool      `json:"tls,omitempty"`
	BytesToUpstream uint64    `json:"bytes_to_upstream"`
	BytesToClient   uint64    `json:"bytes_to_client"`
	Started         time.Time `json:"started"`
}

// Info describes t for /debug/tunnels.
func (t *Tunnel) Info() TunnelInfo {
	up, down := t.Bytes()
	return TunnelInfo{
		ID:              t.ID,
		Client:          t.ClientAddr,
		Upstream:        t.UpstreamAddr,
		Pool:            t.Pool,
		Datapath:        t.Datapath(),
		TLS:             t.clientTLS != nil || t.upstreamTLS != nil,
		BytesToUpstream: up,
		BytesToClient:   down,
		Started:         t.Started,
	}
}

// AdminHandler serves the operator's endpoints: /metrics from gatherer, /healthz (503 once the server is
// draining, so a balancer in front stops sending clients), /debug/tunnels (JSON, one object per live
// tunnel), and the admin API under /admin/ (see adminAPI). The admin listener is for operators only:
// bind it to loopback or a management network.
func (s *Server) AdminHandler(gatherer prometheus.Gatherer) http.Handler {
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
	return mux
}

func (s *Server) listTunnels(w http.ResponseWriter, r *http.Request) {
	ts := s.tunnels.Tunnels()
	infos := make([]TunnelInfo, len(ts))
	for i, t := range ts {
		infos[i] = t.Info()
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
