package relay

import (
	"encoding/json"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// TunnelInfo is one live tunnel as /debug/tunnels shows it.
type TunnelInfo struct {
	ID              uint64    `json:"id"`
	Client          string    `json:"client"`
	Upstream        string    `json:"upstream"`
	Datapath        Datapath  `json:"datapath"`
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
		Datapath:        t.Datapath(),
		BytesToUpstream: up,
		BytesToClient:   down,
		Started:         t.Started,
	}
}

// AdminHandler serves the operator's endpoints: /metrics from gatherer, /healthz (503 once the server is
// draining, so a balancer in front stops sending clients), and /debug/tunnels (JSON, one object per live tunnel).
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
	mux.HandleFunc("GET /debug/tunnels", func(w http.ResponseWriter, r *http.Request) {
		ts := s.tunnels.Tunnels()
		infos := make([]TunnelInfo, len(ts))
		for i, t := range ts {
			infos[i] = t.Info()
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(infos)
	})
	return mux
}
