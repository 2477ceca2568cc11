"""WebSocket echo server on the python `websockets` library (Debian's python3-websockets, 10.4 API), the
peer nobody here wrote for the relay's interop tests.

It listens on 127.0.0.1 on a port the kernel picks and prints that port on one line of stdout. Every text
and binary message is sent back as it came; pings are answered by the library with the same payload. A
text message "close:<code>:<reason>" makes the server close with that code and reason instead, so close
codes can be tested in the server-initiated direction too.

The server exits when its stdin reaches EOF: the test holds the other end of that pipe, so a test binary
that dies without cleaning up does not leave the server running.
"""
import asyncio
import sys
import threading

import websockets


async def echo(ws, path=None):
    try:
        async for msg in ws:
            if isinstance(msg, str) and msg.startswith("close:"):
                _, code, reason = msg.split(":", 2)
                await ws.close(int(code), reason)
                return
            await ws.send(msg)
    except websockets.ConnectionClosed:
        pass  # the client went away without a clean close; nothing to echo


async def serve(stop):
    # max_size=None: the tests send messages of 1 MiB and more (the default limit is 1 MiB).
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await stop


def main():
    loop = asyncio.new_event_loop()
    stop = loop.create_future()

    def wait_stdin_eof():
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))

    threading.Thread(target=wait_stdin_eof, daemon=True).start()
    loop.run_until_complete(serve(stop))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
