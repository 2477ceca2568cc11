"""WebSocket echo server on the python `websockets` library (Debian's python3-websockets), the peer of
the relay's interop tests. It listens on 127.0.0.1 on a free port, prints the port on one line, and
echoes every message. A text message "close:<code>:<reason>" makes it close with that code and reason."""
import asyncio
import sys

import websockets


async def echo(ws, path=None):
    async for msg in ws:
        if isinstance(msg, str) and msg.startswith("close:"):
            _, code, reason = msg.split(":", 2)
            await ws.close(int(code), reason)
            return
        await ws.send(msg)


async def main():
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
