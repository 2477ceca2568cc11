package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// minimalConfig is a file with the given admin (a YAML value, "" for none) in front of upstream.
func minimalConfig(admin, upstream string) string {
	return fmt.Sprintf(`admin: %s
listeners:
  - address: 127.0.0.1:0
    routes: [{pool: echo}]
pools:
  echo:
    servers: [%s]
`, admin, upstream)
}

// adminRequest sends method path to the relay's admin with the given headers, and returns the status and
// body.
func adminRequest(t *testing.T, r *relayRun, method, path string, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+r.admin+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		if k == "Host" {
			req.Host = v
		} else {
			req.Header.Set(k, v)
		}
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestRunRefusesRemoteAdmin: an admin address other hosts can reach is refused at start, from a flag
// or the file, with what to do instead; --admin-allow-remote serves it, with a warning, and changes
// still need a token, which there is none of here.
func TestRunRefusesRemoteAdmin(t *testing.T) {
	upstream := newEchoUpstream(t)
	dir := t.TempDir()
	everyAddress := filepath.Join(dir, "every.yaml")
	writeFile(t, everyAddress, minimalConfig(`":0"`, upstream))
	flags := []string{"--listen", "127.0.0.1:0", "--upstream", upstream, "--datapath", "copy"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"every address", append([]string{"--admin", ":0"}, flags...),
			`--admin: ":0" can be reached from other hosts, and the admin API can force servers down and reload the configuration; accepted: a loopback address such as 127.0.0.1:9180, unix:/PATH, or allow_remote: true (flag --admin-allow-remote)`},
		{"wildcard IP", append([]string{"--admin", "0.0.0.0:0"}, flags...), `"0.0.0.0:0" can be reached from other hosts`},
		{"host name", append([]string{"--admin", "example.com:0"}, flags...), `"example.com:0" can be reached from other hosts`},
		{"file", []string{"--config", everyAddress}, everyAddress + `:1: admin: ":0" can be reached from other hosts`},
		{"relative socket", append([]string{"--admin", "unix:admin.sock"}, flags...), "a Unix socket's path must be absolute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A relay that serves when it should have refused is stopped at once.
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			served := func(listen, admin net.Addr) { failReady(t)(listen, admin); cancel() }
			var stderr bytes.Buffer
			if code := runCommand(ctx, tc.args, &stderr, served); code != 2 {
				t.Errorf("exit %d, want 2", code)
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("stderr lacks %q:\n%s", tc.want, stderr.String())
			}
		})
	}

	r := startRelay(t, append([]string{"--admin", "0.0.0.0:0", "--admin-allow-remote", "--log-format", "json"}, flags...)...)
	if !strings.Contains(r.logs.String(), "THE ADMIN LISTENER CAN BE REACHED FROM OTHER HOSTS") {
		t.Errorf("no warning of a remote admin in the log:\n%s", r.logs)
	}
	if code, body := adminRequest(t, r, "POST", "/admin/reload", nil); code != http.StatusForbidden ||
		!strings.Contains(body, "--admin-token-file") {
		t.Errorf("change without a token configured: %d %s; want 403 saying how to give one", code, body)
	}
	r.get(t, "/metrics", 200)
}

// TestRunAdminAccess: on a relay with a token file, a change needs the token, a cross-site request is
// refused even with it, and so is a Host that is not the admin's (DNS rebinding); reading stays open.
func TestRunAdminAccess(t *testing.T) {
	r := startConfigRelay(t, minimalConfig(freeAddr(t), newEchoUpstream(t)))
	bearer := "Bearer " + testAdminToken
	for _, tc := range []struct {
		name, method, path string
		header             map[string]string
		status             int
	}{
		{"no token", "POST", "/admin/reload", nil, http.StatusUnauthorized},
		{"wrong token", "POST", "/admin/reload", map[string]string{"Authorization": bearer + "-not"}, http.StatusUnauthorized},
		{"cross-site with the token", "POST", "/admin/reload", map[string]string{"Authorization": bearer, "Origin": "http://evil.example"}, http.StatusForbidden},
		{"rebound name", "GET", "/metrics", map[string]string{"Host": "evil.example"}, http.StatusMisdirectedRequest},
		{"token", "POST", "/admin/reload", map[string]string{"Authorization": bearer}, http.StatusOK},
		{"read without token", "GET", "/admin/pools", map[string]string{"Host": "localhost"}, http.StatusOK},
	} {
		if code, body := adminRequest(t, r.relayRun, tc.method, tc.path, tc.header); code != tc.status {
			t.Errorf("%s: %s %s answered %d, want %d: %s", tc.name, tc.method, tc.path, code, tc.status, body)
		}
	}
}

// TestReloadFindsAdminInFile: `sockrelay reload --config FILE` sends to the file's admin address with
// the file's token; the flags override the file; a refusal says why.
func TestReloadFindsAdminInFile(t *testing.T) {
	dir := t.TempDir()
	path, tokenFile := filepath.Join(dir, "sockrelay.yaml"), filepath.Join(dir, "admin.token")
	writeFile(t, tokenFile, testAdminToken+"\n")
	writeFile(t, filepath.Join(dir, "other.token"), "another-token-0123456789\n")
	adminAddr := freeAddr(t)
	writeFile(t, path, minimalConfig(fmt.Sprintf("{address: %q, token_file: admin.token}", adminAddr), newEchoUpstream(t)))
	r := startRelay(t, "--config", path)
	if r.admin != adminAddr {
		t.Fatalf("admin on %s, want the file's %s", r.admin, adminAddr)
	}
	noAdmin := filepath.Join(dir, "no-admin.yaml")
	writeFile(t, noAdmin, minimalConfig(`""`, "127.0.0.1:9000"))

	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"file's address and token", []string{"--config", path}, 0, "the relay took the new configuration"},
		{"flag address, file's token", []string{"--config", path, "--admin", adminAddr}, 0, "the relay took the new configuration"},
		{"flag token overrides the file's", []string{"--config", path, "--admin-token-file", filepath.Join(dir, "other.token")}, 1, "401 Unauthorized"},
		{"no token", []string{"--admin", adminAddr}, 1, "give the token file: --admin-token-file FILE, or --config FILE with admin.token_file"},
		{"file without an admin", []string{"--config", noAdmin}, 1, "disables the admin listener"},
		{"file missing", []string{"--config", filepath.Join(dir, "missing.yaml")}, 1, "nothing sent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := dispatch(context.Background(), append([]string{"reload"}, tc.args...), &stdout, &stderr); code != tc.code {
				t.Errorf("exit %d, want %d:\n%s%s", code, tc.code, stdout.String(), stderr.String())
			}
			if out := stdout.String() + stderr.String(); !strings.Contains(out, tc.want) {
				t.Errorf("output lacks %q:\n%s", tc.want, out)
			}
		})
	}
}

// TestAdminUnixSocket: --admin unix:/PATH serves the admin on a socket only its owner may connect to,
// replacing one a relay left behind; its file permissions authenticate changes, so reload needs no
// token there.
func TestAdminUnixSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close() // what a relay that was killed leaves: a socket file no process serves
	path := filepath.Join(dir, "sockrelay.yaml")
	writeFile(t, path, minimalConfig("unix:"+sock, newEchoUpstream(t)))
	startRelay(t, "--config", path)

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket mode %v, want a socket with 0600", fi.Mode())
	}
	for _, args := range [][]string{{"--config", path}, {"--admin", "unix:" + sock}} {
		var stdout, stderr bytes.Buffer
		if code := dispatch(context.Background(), append([]string{"reload"}, args...), &stdout, &stderr); code != 0 {
			t.Errorf("reload %v: exit %d:\n%s", args, code, stderr.String())
		}
	}
	// A second relay on the same socket is refused: the first serves it.
	var stderr bytes.Buffer
	if code := runCommand(context.Background(), []string{"--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9000",
		"--datapath", "copy", "--admin", "unix:" + sock}, &stderr, failReady(t)); code != 1 ||
		!strings.Contains(stderr.String(), "another process serves this socket") {
		t.Errorf("second relay on the socket: exit %d:\n%s", code, stderr.String())
	}
}
