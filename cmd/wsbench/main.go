// Command wsbench is sockrelay's WebSocket load generator (gorilla/websocket). Each workload prints a table
// and, with -json FILE, writes its result as JSON:
//
//	wsbench rtt  -url ws://127.0.0.1:8080/ [-tunnels 100] [-size 32] [-rate 0] [-warmup 0] [-duration 5s] [-direct ws://127.0.0.1:9000/ [-rounds 3]]
//	wsbench idle -url ws://127.0.0.1:8080/ [-tunnels 1000] [-pid PID[,PID...]] [-settle 2s]
//	wsbench throughput -url ws://127.0.0.1:8080/sink [-tunnels 1] [-size 65536] [-mode sink|echo] [-warmup 0] [-duration 5s]
//	wsbench handshakes -url ws://127.0.0.1:8080/ [-tunnels 8] [-duration 5s]
//	wsbench cpu  -url ws://127.0.0.1:8080/ [-direct ws://127.0.0.1:9000/] [-rounds 3] [-pid PID[,PID...]] [-tunnels 100] [-rate 10000] [-warmup 0] [-duration 5s]
//	wsbench mixed -url ws://127.0.0.1:8080/ [-tunnels 1000] [-chatty 100] [-rate 10] [-bulk 2] [-pid PID[,PID...]] [-duration 5s]
//	wsbench bounds FILE
//
// rtt: each tunnel sends a message and waits for its echo, in a closed loop or at -rate messages per second
// per tunnel; it reports p50, p90, p99, p99.9 and max round trip; with -direct, the same load sent to the
// upstream directly alternates with it round by round, and each percentile is also given as the target's
// over direct's in the same pair of rounds, median (min–max) over the pairs (see runRounds). idle: opens and holds idle tunnels and
// reports what each costs the relay whose processes are given (their summed RSS) and the kernel (TCP memory in
// /proc/net/sockstat). throughput: streams messages, each one whole frame built and masked before the run and
// written many at a time, one way into wsecho's /sink or both ways through its /bulk echo, and reports
// Gbit/s of payload. handshakes: -tunnels workers open and close tunnels one after another and
// it reports tunnels opened per second and handshake latency. cpu: at a fixed message rate, the whole
// machine's CPU time per message (/proc/stat), less that of the same load sent directly with -direct, in
// alternating rounds, with counts that say why (see cpuWorkload). mixed: idle, chatty and bulk tunnels at
// once (see mixedWorkload). bounds: whether direct bounds every relay in a run (see checkBounds). Runs longer than a few seconds print progress on stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
)

const usage = `usage: wsbench WORKLOAD -url ws://HOST:PORT/PATH [flags]

workloads:
  rtt    round trips of small messages over many tunnels: p50, p90, p99, p99.9, max
  idle   memory per idle tunnel of the relay (-pid) and of the kernel
  throughput  large messages streamed one way (-mode sink) or both ways (-mode echo): Gbit/s
  handshakes  new tunnels per second and handshake latency
  cpu    whole-machine CPU time per message at a fixed rate, less the same load sent directly (-direct)
  mixed  idle, chatty and bulk tunnels at once: CPU, RSS, slab, the chatty tunnels' p99, the bulk rate

wsbench bounds FILE checks that direct bounds every relay in a run's rows (JSON; exit 3 when not).

wsbench WORKLOAD -h lists a workload's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// workload runs one kind of measurement and returns what it measured, which has a table form.
type workload interface {
	run(ctx context.Context, progress io.Writer) (result, error)
}

type result interface {
	table(w io.Writer)
}

// run parses args, runs the workload and prints its result. It returns the exit status: 2 for bad usage,
// 1 when the measurement failed.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var (
		w        workload
		jsonPath string
		err      error
	)
	switch args[0] {
	case "rtt":
		w, jsonPath, err = parseRTT(args[1:], stderr)
	case "idle":
		w, jsonPath, err = parseIdle(args[1:], stderr)
	case "throughput":
		w, jsonPath, err = parseThroughput(args[1:], stderr)
	case "handshakes":
		w, jsonPath, err = parseHandshakes(args[1:], stderr)
	case "cpu":
		w, jsonPath, err = parseCPU(args[1:], stderr)
	case "mixed":
		w, jsonPath, err = parseMixed(args[1:], stderr)
	case "bounds":
		return runBounds(args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "wsbench: unknown workload %q\n\n%s", args[0], usage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "wsbench %s: %v\n", args[0], err)
		return 2
	}
	res, err := w.run(ctx, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "wsbench %s: %v\n", args[0], err)
		return 1
	}
	res.table(stdout)
	if jsonPath != "" {
		b, _ := json.MarshalIndent(map[string]any{"workload": args[0], "result": res}, "", "  ")
		if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintf(stderr, "wsbench %s: -json: %v\n", args[0], err)
			return 1
		}
	}
	return 0
}

// commonFlags are the flags every workload takes.
type commonFlags struct {
	url      string
	tunnels  int
	jsonPath string
}

// parse parses a workload's args: the common flags (tunnels defaulting to tunnels) and those own adds.
func (c *commonFlags) parse(workload string, args []string, stderr io.Writer, tunnels int, own func(*flag.FlagSet)) error {
	fs := flag.NewFlagSet("wsbench "+workload, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.url, "url", "", "WebSocket `URL` to connect to, e.g. ws://127.0.0.1:8080/ (required)")
	fs.IntVar(&c.tunnels, "tunnels", tunnels, "number of WebSocket tunnels")
	fs.StringVar(&c.jsonPath, "json", "", "also write the result as JSON to `FILE`")
	own(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: every setting is a flag", fs.Arg(0))
	}
	if c.url == "" {
		return errors.New("-url is required, e.g. -url ws://127.0.0.1:8080/")
	}
	if c.tunnels < 1 {
		return fmt.Errorf("-tunnels: %d; at least 1", c.tunnels)
	}
	return nil
}
