#!/usr/bin/python3
"""The clients of scripts/fleettest.sh, run in its client namespace with several source addresses.

Every WebSocket goes to wsecho's /whoami through the virtual address, by both balancers (nftables DNAT
on :80, HAProxy with PROXY protocol v2 on :81), and reads which upstream answered, which relay it came
through (the upstream's peer) and which client address the relay passed on (X-Forwarded-For). Then it
kills one relay (--kill-command) and checks what the fleet promises. Any broken promise exits 1.
"""
import argparse
import asyncio
import json
import subprocess
import sys

import websockets

PORTS = {"nftables": 80, "haproxy": 81}
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print(f"fleet_client: FAIL: {what}", flush=True)


class Tunnel:
    """One WebSocket through a balancer, with what the upstream said about it."""

    def __init__(self, ws, client, balancer, identity):
        self.ws, self.client, self.balancer = ws, client, balancer
        self.upstream = identity["server"]
        self.relay = identity["peer"].rsplit(":", 1)[0]
        self.forwarded_for = identity["x_forwarded_for"]

    async def echoes(self, msg):
        await self.ws.send(msg)
        return await asyncio.wait_for(self.ws.recv(), 5) == msg


async def open_tunnel(vip, client, balancer):
    ws = await websockets.connect(f"ws://{vip}:{PORTS[balancer]}/whoami", local_addr=(client, 0),
                                  open_timeout=5, ping_interval=None)
    identity = json.loads(await asyncio.wait_for(ws.recv(), 5))
    t = Tunnel(ws, client, balancer, identity)
    check(t.forwarded_for == client,
          f"{balancer}: client {client}: the upstream saw X-Forwarded-For {t.forwarded_for!r}")
    return t


async def spread(args, upstream_of):
    """Each client connects several times by each balancer: its connections land on several relays, and
    every relay picks the same upstream for it. Fills upstream_of (client -> upstream)."""
    relays_seen = set()
    for client in args.clients:
        for balancer in PORTS:
            tunnels = [await open_tunnel(args.vip, client, balancer) for _ in range(6)]
            for t in tunnels:
                check(await t.echoes(f"hello from {client}"), f"{balancer}: {client}: no echo")
                await t.ws.close()
            relays = {t.relay for t in tunnels}
            upstreams = {t.upstream for t in tunnels}
            relays_seen |= relays
            upstream_of.setdefault(client, tunnels[0].upstream)
            upstreams.add(upstream_of[client])
            check(len(relays) >= 2, f"{balancer}: {client}'s 6 connections all went to relay {relays}")
            check(len(upstreams) == 1, f"{balancer}: {client} got upstreams {sorted(upstreams)} (relays {sorted(relays)})")
    check(relays_seen == set(args.relays), f"relays seen {sorted(relays_seen)}, want {sorted(args.relays)}")
    check(len(set(upstream_of.values())) >= 2, f"every client hashed to one upstream: {upstream_of}")
    print(f"fleet_client: {len(args.clients)} clients x 2 balancers x 6 connections over relays "
          f"{sorted(relays_seen)}; each client kept one upstream: {upstream_of}", flush=True)


async def closed(t):
    """Whether t's WebSocket ends within 5 s (no message may come on it)."""
    try:
        await asyncio.wait_for(t.ws.recv(), 5)
        return False
    except websockets.ConnectionClosed:
        return True
    except asyncio.TimeoutError:
        return False


async def kill_one(args, upstream_of):
    """Tunnels held on every relay; one relay killed: only its tunnels end, the others still echo, new
    connections are served by the live relays, and reconnecting clients get their upstream again."""
    tunnels = []
    for client in args.clients:
        for balancer in PORTS:
            tunnels += [await open_tunnel(args.vip, client, balancer) for _ in range(3)]
    doomed = [t for t in tunnels if t.relay == args.kill]
    live = [t for t in tunnels if t.relay != args.kill]
    check(doomed and live, f"tunnels before the kill: {len(doomed)} on {args.kill}, {len(live)} elsewhere")
    print(f"fleet_client: {len(tunnels)} tunnels held, {len(doomed)} on {args.kill}; killing it: {args.kill_command}",
          flush=True)
    subprocess.run(args.kill_command, shell=True, check=True)

    ended = await asyncio.gather(*(closed(t) for t in doomed))
    check(all(ended), f"{ended.count(False)} of {len(doomed)} tunnels on the killed relay {args.kill} still open after 5s")
    for t in live:
        ok = False
        try:
            ok = await t.echoes(f"still flowing from {t.client}")
        except websockets.ConnectionClosed as e:
            print(f"fleet_client: {t.balancer}: {t.client} via {t.relay}: closed: {e}", flush=True)
        check(ok, f"{t.balancer}: a tunnel of {t.client} on the live relay {t.relay} stopped echoing after the kill")
        await t.ws.close()

    # The clients whose tunnels ended reconnect, and every client opens new ones, by both balancers.
    again = [(t.client, t.balancer) for t in doomed]
    again += [(c, b) for c in args.clients for b in PORTS for _ in range(3)]
    served = 0
    for client, balancer in again:
        try:
            t = await open_tunnel(args.vip, client, balancer)
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as e:
            check(False, f"{balancer}: {client} not served after the kill: {e!r}")
            continue
        served += 1
        check(t.relay != args.kill, f"{balancer}: {client} reached the killed relay {args.kill}")
        check(t.upstream == upstream_of[client],
              f"{balancer}: {client} reconnected to {t.upstream}, had {upstream_of[client]}")
        check(await t.echoes("after the kill"), f"{balancer}: {client}: no echo after the kill")
        await t.ws.close()
    print(f"fleet_client: after the kill, {len(doomed)} ended tunnels, {len(live)} still echoing, "
          f"{served} of {len(again)} new connections served, each on its client's upstream", flush=True)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vip", required=True)
    p.add_argument("--clients", required=True, type=str.split)
    p.add_argument("--relays", required=True, type=lambda s: s.split(","))
    p.add_argument("--kill", required=True, help="the relay's address whose tunnels must end")
    p.add_argument("--kill-command", required=True)
    args = p.parse_args()
    upstream_of = {}
    await spread(args, upstream_of)
    await kill_one(args, upstream_of)
    if failures:
        sys.exit(f"fleet_client: {len(failures)} failed checks")
    print("fleet_client: passed", flush=True)


asyncio.run(main())
