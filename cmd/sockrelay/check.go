package main

import (
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

// reloadCommand runs `sockrelay reload [--admin ADDR]`: it asks the relay listening there to re-read its
// configuration file (as SIGHUP does) and says whether the relay took it. Exit 0 reloaded, 1 refused or
// unreachable, 2 bad usage.
func reloadCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sockrelay reload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := fs.String("admin", "127.0.0.1:9090", "the relay's admin `ADDR`")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "sockrelay reload: unexpected argument %q; the only setting is --admin ADDR\n", fs.Arg(0))
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+*admin+"/admin/reload", nil)
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay reload: --admin %q: %v\n", *admin, err)
		return 2
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "sockrelay reload: no relay answered on %s: %v\n", *admin, err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "sockrelay reload: %s: %s\n", resp.Status, strings.TrimSpace(string(body)))
		return 1
	}
	fmt.Fprintln(stdout, "sockrelay reload: the relay took the new configuration")
	return 0
}
