package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/sockrelay/sockrelay/config"
	"github.com/sockrelay/sockrelay/relay"
)

// upgradeCommand runs `sockrelay upgrade [--config FILE] [--admin ADDR] [--admin-token-file FILE]
// [--binary PATH] [--timeout D] [-- RUN FLAGS...]`: it asks the relay on that admin listener to start a
// new process (its own binary read again from disk, or --binary; its own flags, or those after --) and
// hand it the listeners, and says whether the new process took over. Exit 0 taken over, 1 refused or
// failed (the running relay keeps serving), 2 bad usage.
func upgradeCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sockrelay upgrade", flag.ContinueOnError)
	configPath := fs.String("config", "", "the relay's configuration `FILE`, whose admin address and token file upgrade uses")
	admin := fs.String("admin", "", "the relay's admin `ADDR`, HOST:PORT or unix:/PATH (default: the file's admin, else "+defaultAdmin+")")
	tokenFile := fs.String("admin-token-file", "", "`FILE` holding the admin token (default: the file's admin.token_file)")
	binary := fs.String("binary", "", "the new relay's executable, an absolute `PATH`: the running relay's own (the default, read again from disk) or its --upgrade-binary; another is refused")
	timeout := fs.Duration("timeout", defaultUpgradeTimeout, "how long the new process may take to start (probe, self-test) and confirm that it serves")
	if err := parseFlags(fs, args, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, "Flags after -- are the new process's `sockrelay run` flags (default: the running relay's).")
			return 0
		}
		fmt.Fprintf(stderr, "sockrelay upgrade: %v\n", err)
		if ue := (*usageError)(nil); errors.As(err, &ue) {
			fmt.Fprintln(stderr, ue.hint())
		}
		return 2
	}
	runArgs := fs.Args()
	if i := len(args) - len(runArgs) - 1; len(runArgs) > 0 && (i < 0 || args[i] != "--") { // flag stops at -- or the first argument
		fmt.Fprintf(stderr, "sockrelay upgrade: unexpected argument %q; the new process's run flags go after --, e.g. sockrelay upgrade -- --config FILE\n", runArgs[0])
		return 2
	}
	if *binary != "" && !filepath.IsAbs(*binary) {
		fmt.Fprintf(stderr, "sockrelay upgrade: --binary: %q is not an absolute path; the running relay starts it from its own directory, e.g. /usr/bin/sockrelay\n", *binary)
		return 2
	}
	if *timeout <= 0 {
		fmt.Fprintf(stderr, "sockrelay upgrade: --timeout: %s is not a positive duration, e.g. 30s\n", *timeout)
		return 2
	}
	if err := config.CheckAdminAddress(*admin, true); err != nil {
		fmt.Fprintf(stderr, "sockrelay upgrade: --admin: %v\n", err)
		return 2
	}
	target, err := reloadTarget(*configPath, *admin, *tokenFile)
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay upgrade: %v\n", err)
		return 1
	}
	body, _ := json.Marshal(relay.UpgradeRequest{Binary: *binary, Args: runArgs, Timeout: timeout.String()})
	// The relay answers once the new process serves or it gave up on it, within the timeout.
	ctx, cancel := context.WithTimeout(ctx, *timeout+15*time.Second)
	defer cancel()
	resp, err := target.postJSON(ctx, "/admin/upgrade", body)
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay upgrade: no answer from the relay on %s: %v\n", target.admin, err)
		return 1
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(answer, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(answer))
		}
		fmt.Fprintf(stderr, "sockrelay upgrade: %s: %s\n", resp.Status, e.Error)
		if resp.StatusCode == http.StatusUnauthorized && target.token == "" {
			fmt.Fprintln(stderr, "sockrelay upgrade: give the token file: --admin-token-file FILE, or --config FILE with admin.token_file")
		}
		return 1
	}
	var res relay.UpgradeResult
	if err := json.Unmarshal(answer, &res); err != nil {
		fmt.Fprintf(stderr, "sockrelay upgrade: the relay's answer: %v: %s\n", err, answer)
		return 1
	}
	fmt.Fprintf(stdout, "sockrelay upgrade: pid %d serves now (took %dms); pid %d hands it %d tunnels, drains %d (at most %s) and exits\n",
		res.PID, res.TookMS, res.OldPID, res.HandingOver, res.DrainingTunnels, res.DrainTimeout)
	return 0
}
