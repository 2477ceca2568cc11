"""WebSocket client on the python `websockets` library, driven by the relay's interop tests: it sends
binary messages of edge-case sizes and text, checks each echo byte for byte, pings with a payload and
waits for the pong, then closes with code 4001 "bye". It prints one JSON line and exits nonzero on any
mismatch."""
import asyncio
import hashlib
import json
import sys

import websockets

SIZES = [0, 1, 125, 126, 65535, 65536, 1 << 20]
TEXTS = ["hello", "ünïcødé ✓ 日本語", "x" * 70000]


def payload(n):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:n])


async def main(url):
    result = {"binary": 0, "text": 0, "pong": False}
    async with websockets.connect(url, max_size=None) as ws:
        for n in SIZES:
            want = payload(n)
            await ws.send(want)
            got = await asyncio.wait_for(ws.recv(), 20)
            if got != want:
                sys.exit(f"binary message of {n} bytes came back as {len(got)} different bytes")
            result["binary"] += 1
        for t in TEXTS:
            await ws.send(t)
            got = await asyncio.wait_for(ws.recv(), 20)
            if got != t:
                sys.exit(f"text message {t[:20]!r} came back different")
            result["text"] += 1
        pong = await ws.ping(b"ping-payload")
        await asyncio.wait_for(pong, 20)
        result["pong"] = True
        await ws.close(4001, "bye")
        result["close_code"] = ws.close_code
        result["close_reason"] = ws.close_reason
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
