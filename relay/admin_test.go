package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/sockrelay/sockrelay/upstream"
)

// TestAdminAccess: changes need the token (401 without it or with another) or, without a token, a
// listener trusted otherwise (403); a page of another site (Origin) is refused whatever it sends (403), and
// so is a Host that names neither an IP address, localhost nor a configured name (DNS rebinding, 421).
// Reading stays open.
func TestAdminAccess(t *testing.T) {
	const token = "s3cret-admin-token-0123456789"
	server := closedPort(t)
	pool := newPool(t, "chat", []string{server}, nil)
	r := startRelay(t, DatapathCopy, nil, func(c *Config) {
		c.Router = &pathRouter{pools: []*upstream.Pool{pool}}
	})
	withToken := httptest.NewServer(r.AdminHandlerWith(r.Reg, AdminAccess{Token: token, Hosts: []string{"relay-admin.example"}}))
	t.Cleanup(withToken.Close)
	noToken := httptest.NewServer(r.AdminHandlerWith(r.Reg, AdminAccess{}))
	t.Cleanup(noToken.Close)
	trusted := httptest.NewServer(r.AdminHandlerWith(r.Reg, AdminAccess{Unauthenticated: true}))
	t.Cleanup(trusted.Close)

	down := "/admin/pools/chat/servers/" + server
	for _, tc := range []struct {
		name               string
		admin              *httptest.Server
		method, path       string
		host, origin, auth string // "" host: the admin's own address
		status             int
		want               string
		changes            bool // the request forces the server down
	}{
		{"cross-site form POST with the token", withToken, "POST", down, "", "http://evil.example", "Bearer " + token,
			http.StatusForbidden, `origin \"http://evil.example\" is not this admin's`, false},
		{"cross-site GET", withToken, "GET", "/debug/tunnels", "", "null", "", http.StatusForbidden, "origin", false},
		{"POST without the token", withToken, "POST", down, "", "", "", http.StatusUnauthorized, "send the admin token", false},
		{"POST with another token", withToken, "POST", down, "", "", "Bearer " + token + "x", http.StatusUnauthorized, "send the admin token", false},
		{"token not as a bearer", withToken, "POST", down, "", "", token, http.StatusUnauthorized, "send the admin token", false},
		{"DELETE without the token", withToken, "DELETE", "/admin/tunnels/1", "", "", "", http.StatusUnauthorized, "send the admin token", false},
		{"reload without the token", withToken, "POST", "/admin/reload", "", "", "", http.StatusUnauthorized, "send the admin token", false},
		{"rebound DNS name", withToken, "GET", "/metrics", "evil.example:9180", "", "", http.StatusMisdirectedRequest, `host \"evil.example:9180\" is not this admin's`, false},
		{"rebound DNS name with the token", withToken, "POST", down, "attacker.example", "", "Bearer " + token, http.StatusMisdirectedRequest, "not this admin's", false},
		{"no token configured", noToken, "POST", down, "", "", "", http.StatusForbidden, "has no token to authenticate it", false},
		{"metrics open", withToken, "GET", "/metrics", "", "", "", http.StatusOK, "sockrelay_upstream_up", false},
		{"pools open by localhost", withToken, "GET", "/admin/pools", "localhost:9180", "", "", http.StatusOK, `"name": "chat"`, false},
		{"pools open by a configured name", withToken, "GET", "/admin/pools", "Relay-Admin.example:9180", "", "", http.StatusOK, `"name": "chat"`, false},
		{"same-origin POST with the token", withToken, "POST", down, "", "self", "Bearer " + token, http.StatusOK, `"state": "forced_down"`, true},
		{"trusted listener without a token", trusted, "POST", down, "", "", "", http.StatusOK, `"state": "forced_down"`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := pool.MarkDown(server, false); err != nil {
				t.Fatal(err)
			}
			var body io.Reader
			if tc.method == "POST" {
				body = strings.NewReader(url.Values{"down": {"true"}}.Encode())
			}
			req, err := http.NewRequest(tc.method, tc.admin.URL+tc.path, body)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			if tc.host != "" {
				req.Host = tc.host
			}
			switch tc.origin {
			case "":
			case "self":
				req.Header.Set("Origin", tc.admin.URL)
			default:
				req.Header.Set("Origin", tc.origin)
			}
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.want) {
				t.Errorf("%s %s: %d %s; want %d with %s", tc.method, tc.path, resp.StatusCode, b, tc.status, tc.want)
			}
			if tc.status == http.StatusUnauthorized && resp.Header.Get("WWW-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
			forced := serverState(t, pool, server).State == upstream.StateForcedDown
			if forced != tc.changes {
				t.Errorf("server forced down: %v, want %v", forced, tc.changes)
			}
		})
	}
	if !strings.Contains(r.Log.String(), `msg="admin request refused"`) {
		t.Error("refused admin requests not logged")
	}
}

// TestAdminUpgrade: POST /admin/upgrade passes its body to Config.Upgrade and answers with what it says:
// the new process (200, the connection closed: this process accepts no more), a request refused for the
// relay's state (409) or for what it asks (400), an upgrade that failed (502); a body it cannot read is
// refused before anything starts.
func TestAdminUpgrade(t *testing.T) {
	var got UpgradeRequest
	answer := func(res UpgradeResult, err error) func(*Config) {
		return func(c *Config) {
			c.Upgrade = func(_ context.Context, req UpgradeRequest) (UpgradeResult, error) {
				got = req
				return res, err
			}
		}
	}
	for _, tc := range []struct {
		name   string
		body   string
		upg    func(*Config)
		status int
		want   string
	}{
		{"taken over", `{"binary":"/usr/bin/sockrelay","args":["--config","/etc/s.yaml"],"timeout":"5s"}`,
			answer(UpgradeResult{PID: 7, OldPID: 6}, nil), http.StatusOK, `"pid": 7`},
		{"no body", "", answer(UpgradeResult{PID: 8}, nil), http.StatusOK, `"pid": 8`},
		{"in progress", "", answer(UpgradeResult{}, fmt.Errorf("%w: an upgrade is in progress", ErrUpgradeRefused)),
			http.StatusConflict, "upgrade refused: an upgrade is in progress"},
		{"bad binary", "", answer(UpgradeResult{}, fmt.Errorf("%w: binary x: not an absolute path", ErrUpgradeBadRequest)),
			http.StatusBadRequest, "not an absolute path"},
		{"failed", "", answer(UpgradeResult{}, errors.New("the new process exited")), http.StatusBadGateway,
			"upgrade failed, this relay keeps serving: the new process exited"},
		{"unknown field", `{"binry":"/x"}`, answer(UpgradeResult{}, nil), http.StatusBadRequest, `unknown field \"binry\"`},
		{"not this relay's", "", func(*Config) {}, http.StatusNotImplemented, "cannot upgrade itself"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startRelay(t, DatapathCopy, []string{"127.0.0.1:9"}, tc.upg)
			srv := httptest.NewServer(r.AdminHandlerWith(r.Reg, AdminAccess{Unauthenticated: true}))
			t.Cleanup(srv.Close)
			got = UpgradeRequest{}
			resp, err := http.Post(srv.URL+"/admin/upgrade", "application/json", strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.want) {
				t.Fatalf("status %d, %s; want %d and %q", resp.StatusCode, body, tc.status, tc.want)
			}
			if tc.status == http.StatusOK && !resp.Close {
				t.Error("the answer to an upgrade taken over keeps the connection open")
			}
			if tc.name == "taken over" && (got.Binary != "/usr/bin/sockrelay" || len(got.Args) != 2 || got.Timeout != "5s") {
				t.Errorf("Config.Upgrade got %+v", got)
			}
		})
	}
}
