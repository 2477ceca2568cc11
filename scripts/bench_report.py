"""Writes docs/bench/RESULTS.md from the JSON that scripts/bench.sh collected.

usage: bench_report.py OUTDIR MODE TARGET...   (run by scripts/bench.sh; Debian's python3, no packages)
"""
import datetime
import json
import os
import platform
import subprocess
import sys


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
    return f"{a / b:.2f}×" if b else "–"


def main():
    outdir, mode, targets = sys.argv[1], sys.argv[2], sys.argv[3:]
    r = {t: {n: load(outdir, t, n) for n in ("rtt1", "rtt1000", "idle", "throughput")} for t in targets}
    peers = [t for t in ("nginx", "haproxy") if t in r]
    p99 = {t: r[t]["rtt1000"]["rtt"]["p99_ns"] for t in targets}
    mem = {t: r[t]["idle"]["relay_rss_per_tunnel_bytes"] for t in targets if t != "direct"}
    best_peer_p99 = min(p99[p] for p in peers) if peers else 0
    best_peer_mem = min(mem[p] for p in peers) if peers else 0
    gbps = {t: r[t]["throughput"]["gbit_per_second"] for t in targets}
    best_peer_gbps = max(gbps[p] for p in peers) if peers else 0

    lines = [
        "# sockrelay against nginx and HAProxy",
        "",
        f"Produced by `make bench` (`scripts/bench.sh {mode}`) on {datetime.date.today().isoformat()}; "
        "every number below comes from that one run, side by side on one machine.",
        "",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}",
        f"- {cmd('bin/sockrelay', 'version')}; {cmd('nginx', '-v')}; {cmd('haproxy', '-v')}",
        "- upstream: bin/wsecho (gorilla/websocket echo); load: bin/wsbench, on the same machine",
        "- idle: tunnels held open (count in the table); per tunnel is the relay's RSS growth over the second "
        "half of them (all nginx workers summed), since memory a process freed before is reused first; "
        "rtt: 32-byte binary messages, closed loop; bulk: one tunnel of 64 KiB messages into a sink, one way",
        "",
        "| target | RTT, 1 tunnel p50 / p99 µs | RTT, 1000 tunnels p50 / p99 µs | round trips/s at 1000 "
        "| p99 at 1000 vs direct | vs best peer | RSS per idle tunnel | vs best peer | bulk Gbit/s | vs best peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        a, b = r[t]["rtt1"]["rtt"], r[t]["rtt1000"]["rtt"]
        m = mem.get(t)
        idle = "–" if m is None else f"{m} B at {r[t]['idle']['tunnels']}"
        lines.append(
            f"| {t} | {us(a['p50_ns'])} / {us(a['p99_ns'])} | {us(b['p50_ns'])} / {us(b['p99_ns'])} "
            f"| {r[t]['rtt1000']['round_trips_per_second']:.0f} | {ratio(p99[t], p99['direct'])} "
            f"| {ratio(p99[t], best_peer_p99)} | {idle} | {'–' if m is None else ratio(m, best_peer_mem)} "
            f"| {gbps[t]:.2f} | {ratio(gbps[t], best_peer_gbps)} |")

    lines += ["", "## The project's goals, as this run measured them", ""]
    if "sockrelay-sockmap" in r and peers:
        s = "sockrelay-sockmap"
        below = all(p99[s] < p99[p] for p in peers)
        lines.append(f"- p99 round trip at 1000 tunnels below both nginx and HAProxy: "
                     f"{'met' if below else 'not met'} ({us(p99[s])} µs against "
                     + ", ".join(f"{p} {us(p99[p])} µs" for p in peers) + ").")
        if "haproxy" in mem:
            quarter = mem[s] * 4 < mem["haproxy"]
            lines.append(f"- memory per idle tunnel under a quarter of HAProxy's: "
                         f"{'met' if quarter else 'not met'} ({mem[s]} B against {mem['haproxy']} B).")
        bulk = gbps[s] >= 0.9 * best_peer_gbps
        lines.append(f"- bulk throughput at least 0.9× the best of nginx and HAProxy: {'met' if bulk else 'not met'} "
                     f"({gbps[s]:.2f} Gbit/s against " + ", ".join(f"{p} {gbps[p]:.2f}" for p in peers) + ").")
    else:
        lines.append("- sockmap did not run here, so the goals could not be measured.")
    lines.append("- CPU per message at a fixed rate: not measured yet (workload still to be written).")
    lines += ["", "Reproduce: `make bench` (quick) or `scripts/bench.sh full`. The JSON of every measurement is in "
              "`docs/bench/json/`.", ""]
    with open(os.path.join(outdir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
