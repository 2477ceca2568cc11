package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/sockrelay/sockrelay/config"
)

// checkCommand runs `sockrelay check --config FILE`: it validates the file as `run` and a reload would,
// without starting anything, and prints every problem and warning. Exit 0 valid, 1 invalid, 2 bad usage.
func checkCommand(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sockrelay check", flag.ContinueOnError)
	path := fs.String("config", "", "configuration `FILE` to check (required)")
	if err := parseFlags(fs, args, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "%s: %v\n%s\n", fs.Name(), err, err.(*usageError).hint())
		return 2
	}
	if *path == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "sockrelay check: give the file to check: sockrelay check --config FILE")
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if err := checkRunnable(cfg); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", *path, err)
		return 1
	}
	errs, warnings := checkFiles(context.Background(), cfg, net.DefaultResolver)
	if len(errs) > 0 {
		fmt.Fprintln(stderr, errs)
		return 1
	}
	for _, w := range append(cfg.Warnings, warnings...) {
		fmt.Fprintln(stderr, "warning:", w)
	}
	fmt.Fprintf(stdout, "%s: ok: %d listeners, %d pools\n", *path, len(cfg.Listeners), len(cfg.Pools))
	return 0
}

// defaultAdmin is the admin address reload sends to when neither --admin nor --config names one; the
// default of the configuration file's admin.
const defaultAdmin = "127.0.0.1:9180"

// reloadCommand runs `sockrelay reload [--config FILE] [--admin ADDR] [--admin-token-file FILE]`: it asks
// the relay listening there to re-read its configuration file (as SIGHUP does) and says whether the relay
// took it. The admin address and token file are the flags', else those of the file --config names, else
// 127.0.0.1:9180 and none. Exit 0 reloaded, 1 refused or unreachable, 2 bad usage.
func reloadCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sockrelay reload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "the relay's configuration `FILE`, whose admin address and token file reload uses")
	admin := fs.String("admin", "", "the relay's admin `ADDR`, HOST:PORT or unix:/PATH (default: the file's admin, else "+defaultAdmin+")")
	tokenFile := fs.String("admin-token-file", "", "`FILE` holding the admin token (default: the file's admin.token_file)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "sockrelay reload: unexpected argument %q; the settings are --config FILE, --admin ADDR and --admin-token-file FILE\n", fs.Arg(0))
		return 2
	}
	if err := config.CheckAdminAddress(*admin, true); err != nil {
		fmt.Fprintf(stderr, "sockrelay reload: --admin: %v\n", err)
		return 2
	}
	target, err := reloadTarget(*configPath, *admin, *tokenFile)
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay reload: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := target.post(ctx, "/admin/reload")
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay reload: no relay answered on %s: %v\n", target.admin, err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "sockrelay reload: %s: %s\n", resp.Status, strings.TrimSpace(string(body)))
		if resp.StatusCode == http.StatusUnauthorized && target.token == "" {
			fmt.Fprintln(stderr, "sockrelay reload: give the token file: --admin-token-file FILE, or --config FILE with admin.token_file")
		}
		return 1
	}
	fmt.Fprintln(stdout, "sockrelay reload: the relay took the new configuration")
	return 0
}

// adminTarget is a relay's admin listener and the token to send it.
type adminTarget struct {
	admin string // HOST:PORT or unix:/PATH
	token string
}

// reloadTarget finds the admin to send a reload to, and its token: each from its flag when given, else
// from the configuration file at configPath when given.
func reloadTarget(configPath, admin, tokenFile string) (adminTarget, error) {
	if configPath != "" && (admin == "" || tokenFile == "") {
		cfg, err := config.Load(configPath)
		if err != nil {
			return adminTarget{}, fmt.Errorf("nothing sent: the admin address is read from --config, which has errors (the relay would refuse it too):\n%w", err)
		}
		if admin == "" {
			if cfg.Admin == "" {
				return adminTarget{}, fmt.Errorf("%s disables the admin listener (admin: \"\"): send the relay SIGHUP instead", configPath)
			}
			admin = cfg.Admin
		}
		if tokenFile == "" {
			tokenFile = cfg.AdminAccess.TokenFile
		}
	}
	if admin == "" {
		admin = defaultAdmin
	}
	t := adminTarget{admin: admin}
	if tokenFile != "" {
		token, err := readAdminToken(tokenFile)
		if err != nil {
			return adminTarget{}, fmt.Errorf("--admin-token-file: %w", err)
		}
		t.token = token
	}
	return t, nil
}

// post sends an empty POST to the admin's path, with the token when there is one.
func (t adminTarget) post(ctx context.Context, path string) (*http.Response, error) {
	return t.postJSON(ctx, path, nil)
}

// postJSON sends a POST with body (JSON, or none when nil) to the admin's path, with the token when
// there is one.
func (t adminTarget) postJSON(ctx context.Context, path string, body []byte) (*http.Response, error) {
	client, base := http.DefaultClient, "http://"+t.admin
	if sock, unix := config.AdminSocket(t.admin); unix {
		var d net.Dialer
		client = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", sock)
		}}}
		base = "http://localhost"
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, rd)
	if err != nil {
		return nil, fmt.Errorf("admin address %q: %w", t.admin, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if t.token != "" {
		req.Header.Set("Authorization", "Bearer "+t.token)
	}
	return client.Do(req)
}
