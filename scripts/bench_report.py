"""Writes docs/bench/RESULTS.md and a chart per workload (docs/bench/*.svg) from the JSON that
scripts/bench.sh collected.

usage: bench_report.py OUTDIR MODE TARGET...   (run by scripts/bench.sh; Debian's python3, no packages)
"""
import datetime
import html
import json
import os
import platform
import subprocess
import sys

WORKLOADS = ("rtt1", "rtt1000", "idle", "throughput", "handshakes", "cpu")
PEERS = ("nginx", "haproxy")


def load(outdir, target, name):
    path = os.path.join(outdir, "json", f"{target}-{name}.json")
    with open(path) as f:
        return json.load(f)["result"]


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
    r = {t: {n: load(outdir, t, n) for n in WORKLOADS} for t in targets}
    peers = [t for t in PEERS if t in r]
    relays = [t for t in targets if t != "direct"]

    p99 = {t: r[t]["rtt1000"]["rtt"]["p99_ns"] for t in targets}
    mem = {t: (r[t]["idle"]["relay_rss_per_tunnel_bytes"] if t != "direct" else None) for t in targets}
    gbps = {t: r[t]["throughput"]["gbit_per_second"] for t in targets}
    hs = {t: r[t]["handshakes"]["handshakes_per_second"] for t in targets}
    cpu = {t: r[t]["cpu"].get("relay_cpu_us_per_message") for t in targets}
    best_peer = {
        "p99": min((p99[p] for p in peers), default=None),
        "mem": min((mem[p] for p in peers), default=None),
        "gbps": max((gbps[p] for p in peers), default=None),
        "hs": max((hs[p] for p in peers), default=None),
        "cpu": min((cpu[p] for p in peers if cpu[p] is not None), default=None),
    }

    lines = [
        "# sockrelay against nginx and HAProxy",
        "",
        f"Produced by `make bench` (`scripts/bench.sh {mode}`) on {datetime.date.today().isoformat()}; "
        "every number below comes from that one run, side by side on one machine. Ratios are to the upstream "
        "reached directly and to the better of nginx and HAProxy.",
        "",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}",
        f"- {cmd('bin/sockrelay', 'version')}; {cmd('nginx', '-v')}; {cmd('haproxy', '-v')}",
        "- upstream: bin/wsecho (gorilla/websocket echo); load: bin/wsbench, on the same machine, so the load "
        "generator and the upstream share the CPUs with the relay",
        "",
        "## Round trips",
        "",
        "32-byte binary messages, each tunnel sending the next as soon as its echo is back.",
        "",
        "![p99 round trip at 1000 tunnels](rtt1000.svg)",
        "",
        "| target | 1 tunnel p50 / p99 µs | 1000 tunnels p50 / p99 µs | round trips/s at 1000 "
        "| p99 at 1000 vs direct | vs best peer |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        a, b = r[t]["rtt1"]["rtt"], r[t]["rtt1000"]["rtt"]
        lines.append(f"| {t} | {us(a['p50_ns'])} / {us(a['p99_ns'])} | {us(b['p50_ns'])} / {us(b['p99_ns'])} "
                     f"| {r[t]['rtt1000']['round_trips_per_second']:.0f} | {ratio(p99[t], p99['direct'])} "
                     f"| {ratio(p99[t], best_peer['p99'])} |")

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

    lines += ["", "## Bulk throughput", "", "One tunnel of 64 KiB messages into a sink, one way.", "",
              "![bulk throughput](throughput.svg)", "",
              "| target | Gbit/s | vs direct | vs best peer |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t} | {gbps[t]:.2f} | {ratio(gbps[t], gbps['direct'])} | {ratio(gbps[t], best_peer['gbps'])} |")

    lines += ["", "## Handshakes", "",
              "8 workers each opening a tunnel (TCP connect, upgrade, 101), closing it and opening the next.", "",
              "![tunnels opened per second](handshakes.svg)", "",
              "| target | opened/s | failed | latency p50 / p99 µs | vs direct | vs best peer |",
              "|---|---|---|---|---|---|"]
    for t in targets:
        h = r[t]["handshakes"]
        lines.append(f"| {t} | {hs[t]:.0f} | {h['failed']} | {us(h['latency']['p50_ns'])} / "
                     f"{us(h['latency']['p99_ns'])} | {ratio(hs[t], hs['direct'])} | {ratio(hs[t], best_peer['hs'])} |")

    lines += ["", "## CPU per message", "",
              "100 tunnels echoing 32-byte messages at 10 000 messages/s in all. CPU is the whole machine's busy "
              "time (/proc/stat), because a sockmap relay works in softirq, charged to no process; the same load "
              "sent straight to the upstream is measured just before each target and subtracted, leaving what "
              "the relay adds per message (a round trip: the message and its echo both cross it). Noise of a "
              "few µs either way is usual on 2 shared cores.", "",
              "![relay CPU per message](cpu.svg)", "",
              "| target | achieved messages/s | machine µs/msg | direct µs/msg | relay µs/msg | vs best peer |",
              "|---|---|---|---|---|---|"]
    for t in relays:
        c = r[t]["cpu"]
        lines.append(f"| {t} | {c['achieved_rate']:.0f} | {c['target']['cpu_us_per_message']:.1f} "
                     f"| {c['direct']['cpu_us_per_message']:.1f} | {cpu[t]:.1f} | {ratio(cpu[t], best_peer['cpu'])} |")

    lines += ["", "## The project's goals, as this run measured them", ""]
    s = "sockrelay-sockmap"
    if s in r and peers:
        met = lambda ok: "met" if ok else "not met"
        lines.append(f"- p99 round trip at 1000 tunnels below both nginx and HAProxy: "
                     f"{met(all(p99[s] < p99[p] for p in peers))} ({us(p99[s])} µs against "
                     + ", ".join(f"{p} {us(p99[p])} µs" for p in peers) + ").")
        if "haproxy" in mem:
            lines.append(f"- memory per idle tunnel under a quarter of HAProxy's: "
                         f"{met(mem[s] * 4 < mem['haproxy'])} ({mem[s]} B against {mem['haproxy']} B).")
        lines.append(f"- bulk throughput at least 0.9× the best of nginx and HAProxy: "
                     f"{met(gbps[s] >= 0.9 * best_peer['gbps'])} ({gbps[s]:.2f} Gbit/s against "
                     + ", ".join(f"{p} {gbps[p]:.2f}" for p in peers) + ").")
        lines.append(f"- CPU per message at a fixed rate at or below the best peer: "
                     f"{met(cpu[s] <= best_peer['cpu'])} ({cpu[s]:.1f} µs against "
                     + ", ".join(f"{p} {cpu[p]:.1f} µs" for p in peers) + ").")
        lines.append("- Why a goal is not met, and what is planned: docs/datapath.md.")
    else:
        lines.append("- sockmap did not run here, so the goals could not be measured.")
    lines += ["", "Reproduce: `make bench` (quick) or `scripts/bench.sh full`. The JSON of every measurement is in "
              "`docs/bench/json/`.", ""]
    with open(os.path.join(outdir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))

    svg_bars(os.path.join(outdir, "rtt1000.svg"), "p99 round trip at 1000 tunnels", "ms",
             {t: p99[t] / 1e6 for t in targets}, "lower")
    svg_bars(os.path.join(outdir, "idle.svg"), "Relay memory per idle tunnel", "bytes of RSS",
             {t: mem[t] for t in relays}, "lower")
    svg_bars(os.path.join(outdir, "throughput.svg"), "Bulk throughput, one tunnel", "Gbit/s", gbps, "higher")
    svg_bars(os.path.join(outdir, "handshakes.svg"), "New tunnels per second", "tunnels/s", hs, "higher")
    svg_bars(os.path.join(outdir, "cpu.svg"), "CPU the relay adds per message", "µs of CPU per round trip",
             {t: cpu[t] for t in relays}, "lower")


if __name__ == "__main__":
    main()
