"""Writes OUTDIR/RESULTS.md and a chart per workload (OUTDIR/*.svg) from the JSON that scripts/bench.sh
collected in OUTDIR/json. Whether the run is valid (direct bounds every relay in every row) is decided by
`bin/wsbench bounds`, given the rows as JSON; its verdict opens the report.

usage: bench_report.py OUTDIR MODE TARGET...   (run by scripts/bench.sh; Debian's python3, no packages)
"""
import datetime
import html
import json
import os
import platform
import subprocess
import sys

WORKLOADS = ("rtt1", "rtt1000", "idle", "bulk64k-sink", "bulk64k-echo", "bulk1k-sink", "bulk1k-echo", "handshakes",
             "mixed")
BULK = (("bulk64k-sink", "64 KiB frames, one way"), ("bulk64k-echo", "64 KiB frames, both ways"),
        ("bulk1k-sink", "1 KiB frames, one way"), ("bulk1k-echo", "1 KiB frames, both ways"))
PEERS = ("nginx", "haproxy")
AUTO = "sockrelay-auto"
RTT = (("rtt1", "1 tunnel"), ("rtt1000", "1000 tunnels"))
# Direct is the baseline every round-trip ratio divides by: it has no ratio of its own to measure.
BASELINE = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 0}


def load(outdir, target, name, optional=False):
    path = os.path.join(outdir, "json", f"{target}-{name}.json")
    if optional and not os.path.exists(path):
        return None
    with open(path) as f:
        b = json.load(f)
    return b.get("result", b)


def mem_total():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def first_line(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def bounds_check(outdir, rows):
    """Writes the rows to OUTDIR/json/bounds.json and returns (valid, lines) from bin/wsbench bounds."""
    path = os.path.join(outdir, "json", "bounds.json")
    with open(path, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    p = subprocess.run(["bin/wsbench", "bounds", path], capture_output=True, text=True)
    if p.returncode not in (0, 3):
        return False, [f"INVALID: the check itself failed: {(p.stdout + p.stderr).strip()}"]
    return p.returncode == 0, p.stdout.strip().splitlines()


def spread(s, digits=1):
    """Formats a spread from wsbench cpu's JSON as "median (min–max)"."""
    if s is None:
        return "–"

    def f(v):
        text = f"{v:.{digits}f}"
        return text.lstrip("-") if float(text) == 0 else text  # no "-0.00"
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def cmd(*args):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def us(ns):
    return f"{ns / 1000:.0f}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def ratio_spread(s):
    """Formats a ratio's spread from wsbench rtt -direct as "median× (min–max)"."""
    return f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"


def direct_range(r, relays, w, q):
    """Direct's own percentile q in workload w over the relays' runs, as "min–max" µs: how much the
    baseline itself moved during the run."""
    vs = [r[t][w]["direct_rtt"][f"{q}_ns"] for t in relays if r[t][w]]
    return f"{us(min(vs))}–{us(max(vs))}" if vs else "–"


def color(target):
    if target == "direct":
        return "#9e9e9e"
    if target.startswith("sockrelay-"):
        return "#1f77b4"
    return "#ff7f0e"


def svg_bars(path, title, unit, values, better):
    """Writes a horizontal bar chart of values ({target: number or None}) to path. better says which way
    is better ("lower" or "higher"), printed under the title so a reader needs no legend."""
    rows = [(t, v) for t, v in values.items() if v is not None]
    top = max((v for _, v in rows), default=0) or 1
    label_w, bar_w, row_h, head = 150, 420, 26, 46
    width, height = label_w + bar_w + 110, head + row_h * len(rows) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="13">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title)}</text>',
           f'<text x="10" y="38" fill="#555">{html.escape(unit)}, {better} is better</text>']
    for i, (t, v) in enumerate(rows):
        y = head + i * row_h
        w = max(1, round(bar_w * max(v, 0) / top))
        out += [f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{html.escape(t)}</text>',
                f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 8}" fill="{color(t)}"/>',
                f'<text x="{label_w + w + 6}" y="{y + 16}">{v:,.{0 if abs(v) >= 100 else 2}f}</text>']
    out.append("</svg>\n")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    outdir, mode, targets = sys.argv[1], sys.argv[2], sys.argv[3:]
    # Round trips run against each relay with direct alternating (wsbench rtt -direct): direct has none of
    # its own.
    r = {t: {n: load(outdir, t, n, optional=t == "direct" and n.startswith("rtt")) for n in WORKLOADS}
         for t in targets}
    for t in targets:
        r[t]["cpu"] = load(outdir, t, "cpu", optional=True)
        for b, _ in BULK:
            r[t][b + "-relay"] = load(outdir, t, b + "-relay", optional=True)
    peers = [t for t in PEERS if t in r]
    relays = [t for t in targets if t != "direct"]

    # Each round-trip figure is the target's percentile over direct's in the same pair of rounds, median over
    # the pairs (wsbench rtt -direct); direct is 1 by definition. Comparisons between targets divide these
    # ratios, so a minute when the whole machine was slower, which slows direct as much, cancels out.
    rtt_ratio = {(t, w, q): (BASELINE if t == "direct" else r[t][w][f"{q}_ratio"])
                 for t in targets for w, _ in RTT for q in ("p50", "p99")}
    p50_1 = {t: rtt_ratio[t, "rtt1", "p50"]["median"] for t in targets}
    # wsbench rtt -cpus-awake: the CPUs were held out of deep idle states (PM QoS, 0 µs) while round trips
    # were measured, so an idle CPU's wake-up (an exit to the host on a VM) does not swamp the relay's cost.
    if all(r[t][w].get("cpus_awake") for t in relays for w, _ in RTT):
        awake_note = ("Every CPU was held out of deep idle states while round trips were measured "
                      "(`wsbench rtt -cpus-awake`, 0 µs on /dev/cpu_dma_latency), so they measure the software "
                      "on the path, not how long an idle CPU takes to wake.")
    else:
        awake_note = ("The CPUs were left to their own idle states (no /dev/cpu_dma_latency to write), so a "
                      "round trip includes waking idle CPUs, which can favour a busier path.")
    p99 = {t: rtt_ratio[t, "rtt1000", "p99"]["median"] for t in targets}
    mem = {t: (r[t]["idle"]["relay_rss_per_tunnel_bytes"] if t != "direct" else None) for t in targets}
    # A bulk row a target cut holds {"failed": why} instead of figures (scripts/bench.sh).
    gbps = {b: {t: r[t][b].get("gbit_per_second") for t in targets} for b, _ in BULK}
    failed = {(t, b): r[t][b]["failed"] for t in targets for b, _ in BULK if "failed" in r[t][b]}
    hs = {t: r[t]["handshakes"]["handshakes_per_second"] for t in targets}
    cpu = {t: (r[t]["cpu"] or {}).get("relay_cpu_us_per_message") for t in targets}
    cpu_med = {t: (cpu[t]["median"] if cpu[t] else None) for t in targets}

    def best(values, lower):
        vs = [values[p] for p in peers if values.get(p) is not None]
        if not vs:
            return None
        return min(vs) if lower else max(vs)

    best_peer = {"p99": best(p99, True), "mem": best(mem, True), "hs": best(hs, False), "cpu": best(cpu_med, True),
                 **{b: best(gbps[b], False) for b, _ in BULK}}

    # The rows direct must bound: throughput (higher is better) and latency (lower is better).
    rows = [{"name": f"bulk, {label}, Gbit/s", "better": "higher",
             "values": {t: v for t, v in gbps[b].items() if v is not None}} for b, label in BULK]
    rows.append({"name": "handshakes/s", "better": "higher", "values": hs})
    # Round trips: each relay's ratio to direct in alternated rounds (median over the pairs) against direct's
    # 1: a relay whose percentile came out below direct's in most pairs invalidates the run.
    for w, label in RTT:
        for q in ("p50", "p99"):
            rows.append({"name": f"round trip {q} at {label}, ÷ direct's in the same rounds", "better": "lower",
                         "values": {t: rtt_ratio[t, w, q]["median"] for t in targets}})
    # Handshakes run in a closed loop that saturates the machine: their p50 follows the rate (8 workers over
    # handshakes/s), their tail is the scheduler's, so only p50 is a latency direct must bound.
    rows.append({"name": "handshake latency p50, µs", "better": "lower",
                 "values": {t: r[t]["handshakes"]["latency"]["p50_ns"] / 1000 for t in targets}})
    valid, verdict = bounds_check(outdir, rows)

    lines = ["# sockrelay against nginx and HAProxy", ""]
    if valid:
        lines += [f"**Valid run**: {verdict[0].removeprefix('valid: ')}.", ""]
    else:
        why = verdict[0].removeprefix("INVALID: ")
        lines += ["**INVALID run: do not read the comparisons below.** " + why[:1].upper() + why[1:]] + verdict[1:] + [""]
    lines += [
        f"Produced by `make bench` (`scripts/bench.sh {mode}`) on {datetime.date.today().isoformat()}; "
        "every number below comes from that one run, side by side on one machine. Ratios are to the upstream "
        "reached directly and to the better of nginx and HAProxy (the best peer).",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {mem_total()} of memory; Linux {platform.release()}; "
        f"load average when the run began: {' '.join(first_line(os.path.join(outdir, 'json', 'loadavg-start.txt')).split()[:3])}",
        f"- {cmd('bin/sockrelay', 'version')}; {cmd('nginx', '-v')}; {cmd('haproxy', '-v')}",
        "- upstream: bin/wsecho (gorilla/websocket echo; for bulk, a sink that discards at the socket and an echo "
        "that returns whole frames in large batches); load: bin/wsbench, on the same machine, so the load "
        "generator and the upstream share the CPUs with the relay",
        "- `sockrelay-auto` is `--datapath auto`, whatever it picks on this host; the other sockrelay rows force "
        "a datapath",
        "",
        "## Round trips",
        "",
        "32-byte binary messages: one tunnel sending the next as soon as its echo is back, and 1000 busy tunnels "
        "each sending 10 a second (10 000 a second in all, below every target's capacity, so p99 is latency, "
        "not queueing). " + awake_note,
        "",
        "**How the ratios are formed.** Each relay is measured in the same run of the load generator as the "
        "upstream reached directly: both keep their tunnels open, each warms up once, then "
        f"{rtt_rounds(r, relays)} pairs of rounds alternate, direct first in one pair and the relay first in the "
        "next (D,T,T,D,...). In each pair the relay's p50 (p99) is divided by direct's p50 (p99); a figure "
        "below is the median of those ratios over the pairs, with their min–max. So a moment when the whole "
        "machine was slower slows both sides of a pair alike and leaves the ratio, where one relay measured "
        "alone would simply look slower. \"vs best peer\" divides the relay's median ratio by the best peer's. "
        "The µs columns are every round trip of the relay's rounds pooled (direct's, from the same rounds, in "
        "brackets); direct's row gives the range of its own figures over the relays' runs: how far the machine "
        "itself moved.",
        "",
        "![p99 round trip at 1000 tunnels, over direct's](rtt1000.svg)",
        "",
        "| target | 1 tunnel p50 ÷ direct | 1 tunnel p99 ÷ direct | 1000 tunnels p50 ÷ direct "
        "| 1000 tunnels p99 ÷ direct | p99 at 1000 vs best peer | 1 tunnel p50 / p99 µs (direct's) "
        "| 1000 tunnels p50 / p99 µs (direct's) | round trips/s at 1000 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    swing = direct_swing(r, relays)
    for t in targets:
        if t == "direct":
            raw = [f"{direct_range(r, relays, w, 'p50')} / {direct_range(r, relays, w, 'p99')}" for w, _ in RTT]
            lines.append(f"| direct | 1 | 1 | 1 | 1 | {ratio(p99[t], best_peer['p99'])} | {raw[0]} | {raw[1]} | – |")
            continue
        cells = [ratio_spread(rtt_ratio[t, w, q]) for w, _ in RTT for q in ("p50", "p99")]
        raw = [f"{us(r[t][w]['rtt']['p50_ns'])} / {us(r[t][w]['rtt']['p99_ns'])} "
               f"({us(r[t][w]['direct_rtt']['p50_ns'])} / {us(r[t][w]['direct_rtt']['p99_ns'])})" for w, _ in RTT]
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {ratio(p99[t], best_peer['p99'])} | {raw[0]} | {raw[1]} "
                     f"| {r[t]['rtt1000']['round_trips_per_second']:.0f} |")
    if swing:
        lines += ["", f"Direct's own p99 at 1000 tunnels moved {swing[0]:.1f}× between its quickest and slowest round "
                  f"({us(swing[1])}–{us(swing[2])} µs over {swing[3]} rounds): a ratio's min–max says how much of that "
                  "a pair of rounds did not cancel, and a gap between targets inside those ranges is noise."]

    lines += ["", "## Memory per idle tunnel", "",
              "Tunnels held open without traffic. Per tunnel is the growth over the second half of them, since "
              "a process first reuses memory it freed before: the relay's RSS (all nginx workers summed), and "
              "the whole machine's kernel TCP memory (/proc/net/sockstat) and slab (/proc/meminfo), which hold "
              "the load generator's and the upstream's sockets too: the direct row is that baseline.", "",
              "![RSS per idle tunnel](idle.svg)", "",
              "| target | tunnels | relay RSS per idle tunnel | vs best peer | kernel TCP per tunnel "
              "| kernel slab per tunnel |", "|---|---|---|---|---|---|"]
    for t in targets:
        i = r[t]["idle"]
        rss = "–" if mem[t] is None else f"{mem[t]} B"
        lines.append(f"| {t} | {i['tunnels']} | {rss} | {ratio(mem[t], best_peer['mem'])} "
                     f"| {i['kernel_tcp_mem_per_tunnel_bytes']} B | {i.get('kernel_slab_per_tunnel_bytes', 0)} B |")

    lines += ["", "## Bulk throughput", "",
              "One tunnel streaming binary messages, each one whole frame, built and masked before the run and "
              "written 256 KiB at a time: 64 KiB frames (what browsers and most libraries send for a 64 KiB "
              "message) and 1 KiB frames (a client or library that fragments). One way into a sink that discards "
              "at the socket, and both ways through an echo that returns every frame. Gbit/s of payload; both "
              f"ways counts what came back. Each stream runs {warmup(r, targets, BULK)} s first, not counted, so that "
              "a per-tunnel policy (auto) gets to move the tunnel before the count.", "",
              "![bulk throughput, 64 KiB frames one way](throughput.svg)", "",
              "| target | " + " | ".join(label for _, label in BULK) + " | 64 KiB one way vs best peer "
              "| 1 KiB one way vs best peer |",
              "|---|---|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t} | " + " | ".join("failed" if gbps[b][t] is None else f"{gbps[b][t]:.2f}" for b, _ in BULK)
                     + f" | {ratio(gbps['bulk64k-sink'][t], best_peer['bulk64k-sink'])}"
                     f" | {ratio(gbps['bulk1k-sink'][t], best_peer['bulk1k-sink'])} |")
    for (t, b), why in sorted(failed.items()):
        lines += ["", f"**{t}, {dict(BULK)[b]}: the stream failed**: `{why}`"
                  + (f" (the relay's log: `logs/{t}.log`)" if os.path.exists(os.path.join(outdir, "logs", f"{t}.log")) else "")]
    names = {"sockrelay_kernel_demotions_total": "demotions", "sockrelay_kernel_resumes_total": "resumes",
             "sockrelay_kernel_repeats_cut_total": "repeats cut", "sockrelay_datapath_fallbacks_total": "fallbacks"}
    counted = [t for t in relays if any(r[t][b + "-relay"] is not None for b, _ in BULK)]
    if counted:
        lines += ["", "What sockrelay's datapath did during each bulk row (its /metrics counters, growth over the "
                  "row, warm-up included): a demotion moves a direction of a sockmap tunnel to userspace, a resume moves it back, a "
                  "fallback runs a tunnel on a datapath other than the one asked for.", "",
                  "| target | " + " | ".join(label for _, label in BULK) + " |", "|---|---|---|---|---|"]
        for t in counted:
            cells = []
            for b, _ in BULK:
                c = r[t][b + "-relay"] or {}
                parts = [f"{v} {names.get(k, k)}" for k, v in sorted(c.items()) if v]
                cells.append(", ".join(parts) if parts else "none")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")

    lines += ["", "## Handshakes", "",
              "8 workers each opening a tunnel (TCP connect, upgrade, 101), closing it and opening the next.", "",
              "![tunnels opened per second](handshakes.svg)", "",
              "| target | opened/s | failed | latency p50 / p99 µs | vs direct | vs best peer |",
              "|---|---|---|---|---|---|"]
    for t in targets:
        h = r[t]["handshakes"]
        lines.append(f"| {t} | {hs[t]:.0f} | {h['failed']} | {us(h['latency']['p50_ns'])} / "
                     f"{us(h['latency']['p99_ns'])} | {ratio(hs[t], hs['direct'])} | {ratio(hs[t], best_peer['hs'])} |")

    cpu_rows = [t for t in relays if r[t]["cpu"]]
    rounds = max((r[t]["cpu"]["rounds"] for t in cpu_rows), default=0)
    cpu_warmup = max((r[t]["cpu"].get("target_warmup_seconds", 0) for t in cpu_rows), default=0)
    wq_note = next((r[t]["cpu"].get("workqueue_note") for t in cpu_rows if r[t]["cpu"].get("workqueue_note")), None)
    lines += ["", "## CPU per message", "",
              f"100 tunnels echoing 32-byte messages at 10 000 messages/s in all. CPU is the whole machine's busy "
              "time (/proc/stat), because a sockmap relay works in softirq, charged to no process. The same load "
              f"sent straight to the upstream alternates with the load through the target, {rounds} times each "
              f"(D,T,D,T,...), after the target's load ran {cpu_warmup} s unmeasured; each figure is the median of the target-less-direct differences of the pairs, with "
              "their min–max, per message (a round trip: the message and its echo both cross the relay). Beside "
              "CPU time, counts that contention barely changes say where it goes: the machine's context switches, "
              "softirq time, work-queue executions (tracefs `workqueue:workqueue_execute_start`), and the relay "
              "process's own CPU time and context switches (voluntary ones are wake-ups). Softirq and process "
              "time are sampled at the tick, so they undercount short bursts; the machine's busy time does not.",
              "", "![relay CPU per message](cpu.svg)", "",
              "| target | achieved messages/s | relay µs/msg | vs best peer | context switches/msg "
              "| softirq µs/msg | work items/msg | relay process µs/msg | relay process wake-ups / "
              "involuntary switches per msg |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in cpu_rows:
        c = r[t]["cpu"]
        lines.append(f"| {t} | {c['achieved_rate']:.0f} | {spread(c.get('relay_cpu_us_per_message'))} "
                     f"| {ratio(cpu_med[t], best_peer['cpu'])} | {spread(c.get('relay_ctxt_per_message'), 2)} "
                     f"| {spread(c.get('relay_softirq_us_per_message'))} "
                     f"| {spread(c.get('relay_workqueue_per_message'), 2)} "
                     f"| {spread(c.get('process_cpu_us_per_message'))} "
                     f"| {spread(c.get('process_voluntary_switches_per_message'), 2)} / "
                     f"{spread(c.get('process_involuntary_switches_per_message'), 2)} |")
    directs = [s["cpu_us_per_message"] for t in cpu_rows for s in r[t]["cpu"].get("direct", [])]
    if directs:
        lines += ["", f"The direct load itself cost {sorted(directs)[len(directs) // 2]:.1f} µs of machine CPU "
                  f"per message (median of {len(directs)} rounds, {min(directs):.1f}–{max(directs):.1f})."]
    if wq_note:
        lines += ["", f"Work-queue executions were not counted: {wq_note}."]

    lines += ["", "## Mixed workload", "",
              "What an edge node carries, at once: the idle tunnels of the memory test, 100 chatty tunnels "
              "each sending 32-byte messages at 10 a second, and two streams of whole 64 KiB frames into the sink. "
              "CPU is over the measured seconds (after a 1 s warm-up); the relay's RSS and the kernel's slab growth "
              "are with every tunnel open. Slab holds the load generator's and the upstream's sockets too: "
              "the direct row is that baseline. The bulk streams are not throttled, so on a small machine every "
              "target runs it near 100% busy: there the relay's own CPU, the chatty p99 and the bulk rate are "
              "what tell targets apart (a sockmap relay's softirq work is in no process's CPU).", "",
              "| target | idle tunnels | machine CPU | relay CPU | relay RSS | kernel slab growth "
              "| chatty p50 / p99 µs | bulk Gbit/s |", "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        m = r[t]["mixed"]
        if "failed" in m:
            lines.append(f"| {t} | failed: `{m['failed']}` | | | | | | |")
            continue
        rc, rss = m.get("relay_cpu_seconds_per_second"), m.get("relay_rss_bytes")
        rc = "–" if rc is None else f"{rc * 100:.0f}% of a core"
        rss = "–" if not rss else f"{rss / (1 << 20):.1f} MiB"
        lines.append(f"| {t} | {m['idle_tunnels']} | {m['machine_cpu_utilization'] * 100:.0f}% | {rc} | {rss} "
                     f"| {m['kernel_slab_growth_bytes'] / (1 << 20):.1f} MiB "
                     f"| {us(m['chatty_rtt']['p50_ns'])} / {us(m['chatty_rtt']['p99_ns'])} "
                     f"| {m['bulk_gbit_per_second']:.2f} |")

    lines += ["", "## The project's goals, as this run measured them", "",
              "Ratios within this one run; the best peer is the better of nginx and HAProxy for each figure."
              + ("" if valid else " **The run is invalid (see the top), so neither met nor not met can be trusted.**"),
              "", "| goal | measured | met |", "|---|---|---|"]
    lines += goals(r, peers, p99, p50_1, mem, gbps, cpu, cpu_med, best_peer)
    lines += ["", "Why a goal is not met, and what is planned: docs/datapath.md.", "",
              "Reproduce: `make bench` (quick, into a temporary folder) or `scripts/bench.sh full OUTDIR`; "
              "`make bench-update` rewrites docs/bench/. The JSON of every measurement is in `json/`.", ""]
    with open(os.path.join(outdir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))

    svg_bars(os.path.join(outdir, "rtt1000.svg"), "p99 round trip at 1000 tunnels, over direct's",
             "median over alternated rounds of p99 ÷ direct's p99", {t: p99[t] for t in targets}, "lower")
    svg_bars(os.path.join(outdir, "idle.svg"), "Relay memory per idle tunnel", "bytes of RSS",
             {t: mem[t] for t in relays}, "lower")
    svg_bars(os.path.join(outdir, "throughput.svg"), "Bulk throughput, whole 64 KiB frames, one way", "Gbit/s",
             gbps["bulk64k-sink"], "higher")
    svg_bars(os.path.join(outdir, "throughput-1k.svg"), "Bulk throughput, 1 KiB frames, one way", "Gbit/s",
             gbps["bulk1k-sink"], "higher")
    svg_bars(os.path.join(outdir, "handshakes.svg"), "New tunnels per second", "tunnels/s", hs, "higher")
    svg_bars(os.path.join(outdir, "cpu.svg"), "CPU the relay adds per message (median)", "µs of CPU per round trip",
             {t: cpu_med[t] for t in relays}, "lower")


def direct_swing(r, relays):
    """Direct's p99 at 1000 tunnels over every round of the relays' runs: (max ÷ min, min, max, rounds), or
    None without rounds."""
    vs = [d["rtt"]["p99_ns"] for t in relays if r[t]["rtt1000"] for d in r[t]["rtt1000"]["direct_rounds"]
          if d["rtt"]["count"]]
    return (max(vs) / min(vs), min(vs), max(vs), len(vs)) if vs and min(vs) > 0 else None


def rtt_rounds(r, relays):
    """The pairs of rounds of the round-trip runs, as text ("5", or "3–5" if they differ)."""
    ns = sorted({r[t][w]["rounds"] for t in relays for w, _ in RTT if r[t][w]})
    return "–".join(str(n) for n in (ns[:1] + ns[-1:] if len(ns) > 1 else ns)) or "no"


def warmup(r, targets, rows):
    """The bulk rows' warm-up in seconds, as text (the longest, should they differ)."""
    ws = [r[t][b].get("warmup_seconds", 0) for t in targets for b, _ in rows]
    return f"{max(ws, default=0):g}"


def goals(r, peers, p99, p50_1, mem, gbps, cpu, cpu_med, best_peer):
    """The goals table's rows: each goal's ratio for auto against the best peer, and whether it is met."""
    a = AUTO
    if a not in r or not peers:
        return ["| every goal | sockrelay-auto or both peers did not run here | not measured |"]

    def row(goal, ok, measured):
        return f"| {goal} | {measured} | {'**met**' if ok else 'not met'} |"

    def peer_list(values, fmt):
        return ", ".join(f"{p} {'failed' if values[p] is None else fmt(values[p])}" for p in peers)

    out = []
    if cpu_med.get(a) is not None and best_peer["cpu"]:
        c = cpu[a]
        out.append(row("CPU per message the relay adds: auto ≤ 0.8× best peer", cpu_med[a] <= 0.8 * best_peer["cpu"],
                       f"{cpu_med[a]:.1f} µs ({c['min']:.1f}–{c['max']:.1f}) = {cpu_med[a] / best_peer['cpu']:.2f}× "
                       f"best peer; {peer_list(cpu_med, lambda v: f'{v:.1f} µs')}"))
    out.append(row("RSS per idle tunnel: auto ≤ 1 KiB (1024 B)", mem[a] <= 1024,
                   f"{mem[a]} B; {peer_list(mem, lambda v: f'{v} B')}"))
    for b, label, need in (("bulk64k-sink", "whole 64 KiB frames, one way", 1.5),
                           ("bulk64k-echo", "whole 64 KiB frames, both ways", 1.5),
                           ("bulk1k-sink", "1 KiB frames, one way", 1.0),
                           ("bulk1k-echo", "1 KiB frames, both ways", 1.0)):
        g, bp = gbps[b][a], best_peer[b]
        if g is None or not bp:
            why = "auto's stream failed" if g is None else "every peer's stream failed"
            out.append(f"| Bulk, {label}: auto ≥ {need}× best peer | {why} | {'not met' if g is None else 'not measured'} |")
            continue
        out.append(row(f"Bulk, {label}: auto ≥ {need}× best peer", g >= need * bp,
                       f"{g:.2f} Gbit/s = {g / bp:.2f}× best peer; {peer_list(gbps[b], lambda v: f'{v:.2f}')}"))
    # Round trips compare ratios to direct in alternated rounds (see the round-trip section), not µs measured
    # at different times.
    out.append(row("p99 round trip at 1000 busy tunnels: auto ≤ 0.9× best peer", p99[a] <= 0.9 * best_peer["p99"],
                   f"{p99[a]:.2f}× direct = {p99[a] / best_peer['p99']:.2f}× best peer; "
                   f"{peer_list(p99, lambda v: f'{v:.2f}× direct')}"))
    out.append(row("One-tunnel p50 round trip: auto below both peers", all(p50_1[a] < p50_1[p] for p in peers),
                   f"{p50_1[a]:.2f}× direct; {peer_list(p50_1, lambda v: f'{v:.2f}× direct')}"))
    singles = [t for t in r if t.startswith("sockrelay-") and t != a and "failed" not in r[t]["mixed"]]
    if "failed" in r[a]["mixed"]:
        out.append("| Mixed: auto uses no more CPU and memory than the best single datapath, and no less bulk "
                   "| auto's mixed run failed | not met |")
    elif singles:
        m = {t: r[t]["mixed"] for t in singles + [a]}
        cpu_of = {t: m[t]["machine_cpu_utilization"] for t in m}
        rss_of = {t: m[t].get("relay_rss_bytes", 0) for t in m}
        bulk_of = {t: m[t]["bulk_gbit_per_second"] for t in m}
        bc, br, bb = min(singles, key=cpu_of.get), min(singles, key=rss_of.get), max(singles, key=bulk_of.get)
        out.append(row("Mixed: auto uses no more CPU and memory than the best single datapath, and no less bulk",
                       cpu_of[a] <= cpu_of[bc] and rss_of[a] <= rss_of[br] and bulk_of[a] >= bulk_of[bb],
                       f"machine CPU {cpu_of[a] * 100:.0f}% (best: {bc} {cpu_of[bc] * 100:.0f}%), relay RSS "
                       f"{rss_of[a] / (1 << 20):.1f} MiB (best: {br} {rss_of[br] / (1 << 20):.1f} MiB), bulk "
                       f"{bulk_of[a]:.2f} Gbit/s (best: {bb} {bulk_of[bb]:.2f})"))
    return out


if __name__ == "__main__":
    main()
