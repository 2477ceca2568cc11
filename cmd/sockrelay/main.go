// Command sockrelay is a WebSocket relay: it does the HTTP Upgrade handshake in userspace, then moves each
// tunnel's bytes with the datapath chosen by --datapath.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `sockrelay relays WebSockets between clients and upstream servers.

Usage:
  sockrelay run --config FILE [flags that override the file: sockrelay run -h]
  sockrelay run --listen ADDR --upstream HOST:PORT [--upstream HOST:PORT ...]
                [--datapath auto|sockmap|splice|copy] [--admin ADDR] [more flags: sockrelay run -h]
  sockrelay check --config FILE     validate a configuration file without starting
  sockrelay reload [--config FILE] [--admin ADDR] [--admin-token-file FILE]
                                    make a running relay re-read its file (as SIGHUP does)
  sockrelay upgrade [--config FILE] [--admin ADDR] [--admin-token-file FILE] [--binary PATH]
                    [--timeout DURATION] [-- RUN FLAGS...]
                                    start a new relay process that takes the listeners over
                                    (as SIGUSR2) and its copy and splice tunnels; the running one
                                    drains the others (TLS, sockmap) and exits
  sockrelay doctor     which datapaths this host can use, and why not
  sockrelay version
  sockrelay help
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(dispatch(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// dispatch runs the subcommand args names and returns the process exit code: 0 success, 1 failure at run
// time, 2 bad usage.
func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return runCommand(ctx, args[1:], stderr, nil)
	case "check":
		return checkCommand(args[1:], stdout, stderr)
	case "reload":
		return reloadCommand(ctx, args[1:], stdout, stderr)
	case "upgrade":
		return upgradeCommand(ctx, args[1:], stdout, stderr)
	case "doctor":
		return doctorCommand(stdout)
	case "version", "--version", "-version":
		return versionCommand(stdout)
	case "help", "-h", "--help", "-help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "sockrelay: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
