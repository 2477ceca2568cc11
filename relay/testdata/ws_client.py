"""WebSocket client on the python `websockets` library (Debian's python3-websockets, 10.4 API), driven by
the relay's interop tests against an echo server: usage `ws_client.py ws://HOST:PORT/PATH`.

It sends binary messages at the edges of RFC 6455's length encodings (0, 1, 125, 126, 65535, 65536 bytes
and 1 MiB, deterministic content) and text messages (including non-ASCII UTF-8), and checks each echo byte
for byte; it pings with a payload and waits for the pong carrying that payload; then it closes with code
4001 reason "bye" and checks the server echoed both.

It prints one JSON line: {"ok", "binary": [sizes checked], "text": [UTF-8 byte lengths checked], "pong":
payload, "close_code", "close_reason", "error"}. On any mismatch it also says what differed on stderr and
exits 1.
"""
import asyncio
import hashlib
import json
import sys

import websockets

SIZES = [0, 1, 125, 126, 65535, 65536, 1 << 20]
TEXTS = ["", "hello", "ünïcødé ✓ 日本語 🙂", "日本語✓" * 6000]
PING = "ping-payload ✓".encode()
CLOSE_CODE, CLOSE_REASON = 4001, "bye"
TIMEOUT = 20  # seconds for any one step; the Go test kills the whole run after 30


class Mismatch(Exception):
    pass


def payload(n):
    """n bytes of SHA-256 counter output: deterministic, and different at every offset."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:n])


def first_difference(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"first difference at byte {i}"
    return f"equal over the first {min(len(got), len(want))} bytes"


async def exchange(ws, msg):
    await ws.send(msg)
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def run(url, result):
    async with websockets.connect(url, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        for n in SIZES:
            want = payload(n)
            got = await exchange(ws, want)
            if not isinstance(got, bytes):
                raise Mismatch(f"binary message of {n} bytes came back as a text message")
            if got != want:
                raise Mismatch(f"binary message of {n} bytes came back as {len(got)} bytes, "
                               f"{first_difference(got, want)}")
            result["binary"].append(n)
        for want in TEXTS:
            n = len(want.encode())
            got = await exchange(ws, want)
            if not isinstance(got, str):
                raise Mismatch(f"text message of {n} bytes came back as a binary message")
            if got != want:
                raise Mismatch(f"text message of {n} bytes came back as {len(got.encode())} bytes, "
                               f"{first_difference(got.encode(), want.encode())}")
            result["text"].append(n)
        # The waiter resolves only on a pong whose payload is PING (websockets matches pongs to pings by
        # payload), so reaching the next line proves the payload came back intact.
        waiter = await ws.ping(PING)
        try:
            await asyncio.wait_for(waiter, TIMEOUT)
        except asyncio.TimeoutError:
            raise Mismatch(f"no pong carrying the ping's payload {PING!r} within {TIMEOUT}s") from None
        result["pong"] = PING.decode()
        await ws.close(CLOSE_CODE, CLOSE_REASON)
    result["close_code"], result["close_reason"] = ws.close_code, ws.close_reason
    if (ws.close_code, ws.close_reason) != (CLOSE_CODE, CLOSE_REASON):
        raise Mismatch(f"closed with {CLOSE_CODE} {CLOSE_REASON!r}, the server answered "
                       f"{ws.close_code} {ws.close_reason!r}")


def main():
    if len(sys.argv) != 2:
        print("usage: ws_client.py ws://HOST:PORT/PATH", file=sys.stderr)
        sys.exit(2)
    result = {"ok": False, "binary": [], "text": [], "pong": None, "close_code": None, "close_reason": None,
              "error": None}
    try:
        asyncio.run(run(sys.argv[1], result))
    except Mismatch as e:
        result["error"] = str(e)
    except Exception as e:  # connection refused, closed early, timeouts: report them the same way
        result["error"] = f"{type(e).__name__}: {e}"
    else:
        result["ok"] = True
    print(json.dumps(result), flush=True)
    if not result["ok"]:
        print(f"ws_client.py: {result['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
