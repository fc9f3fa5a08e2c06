"""The baseline for ``make bench-relay``: a bare websockets forwarder.

The same library as the relay, compression off, and no checks at all: each
connection is paired with the next one to open, and every frame goes to the
other one of its pair as it is (frames with no partner yet are dropped).

    python -m bench.bare_forwarder [--port 0] [--loop uvloop|asyncio]   # prints "listening PORT"

It runs on the same event loop as the relay (``--loop``, uvloop by default), so
that the two differ only in what the relay does with each frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class Forwarder:
    def __init__(self) -> None:
        self.waiting: ServerConnection | None = None
        self.partner: dict[ServerConnection, ServerConnection] = {}

    async def handler(self, ws: ServerConnection) -> None:
        if self.waiting is None:
            self.waiting = ws
        else:
            self.partner[ws], self.partner[self.waiting] = self.waiting, ws
            self.waiting = None
        try:
            async for message in ws:
                other = self.partner.get(ws)
                if other is not None:
                    with contextlib.suppress(ConnectionClosed):
                        await other.send(message)
        except ConnectionClosed:
            pass
        finally:
            if self.waiting is ws:
                self.waiting = None
            self.partner.pop(ws, None)


async def main(port: int) -> None:
    forwarder = Forwarder()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(
        forwarder.handler, "127.0.0.1", port, compression=None, max_size=262_144, max_queue=16
    ) as server:
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    with asyncio.Runner(
        loop_factory=uvloop.new_event_loop if args.loop == "uvloop" else None
    ) as runner:
        runner.run(main(args.port))
