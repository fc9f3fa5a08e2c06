"""Child processes for tests, benchmarks and ``make demo``: the relay, the peers' command lines.

``spawn`` starts a command (inside a network namespace when given its
``prefix``) and collects its output line by line; ``Process.expect`` waits for
a line, so that a test waits for what it needs instead of sleeping.
``RelayProcess`` is the one launcher of ``relay.py``: it waits for the
``relay listening on ws://...`` line and reads the real port back, and starts
again on the same port after a stop. Every process is stopped by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peers.netns import Netns

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0  # seconds a child gets to say it is ready (Python imports on a busy machine)
LISTENING = re.compile(r"relay listening on (wss?://\S+)")

__all__ = [
    "LISTENING",
    "ROOT",
    "Process",
    "RedisServer",
    "RelayProcess",
    "peer_argv",
    "redis_missing",
    "redis_server",
    "relay_process",
    "spawn",
    "start_relay",
]


@dataclass
class Process:
    """A child process whose output (standard error included) is collected line by line."""

    name: str
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    _grew: asyncio.Event = field(default_factory=asyncio.Event)

    async def expect(
        self, pattern: str | re.Pattern[str], wait: float = START_TIMEOUT, start: int = 0
    ) -> re.Match[str]:
        """The first line from ``start`` on that matches ``pattern``, waiting for it.

        Raises TimeoutError after ``wait`` seconds, and RuntimeError (with the log)
        when the process exits first.
        """
        regex = re.compile(pattern)
        seen = start
        async with asyncio.timeout(wait):
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = max(seen, len(self.lines))
                if self.reader is not None and self.reader.done():
                    raise RuntimeError(f"{self.name} ended before {regex.pattern!r}:\n{self.log()}")
                self._grew.clear()
                await self._grew.wait()

    async def stop(self, grace: float = 10.0) -> int:
        """SIGTERM by PID, then SIGKILL after ``grace`` seconds; the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return await self._finish()

    async def wait(self, limit: float) -> int:
        """The exit status; stopped by PID when it runs over ``limit`` seconds."""
        try:
            await asyncio.wait_for(self.proc.wait(), limit)
        except TimeoutError:
            await self.stop()
        return await self._finish()

    async def _finish(self) -> int:
        if self.reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 5)
        assert self.proc.returncode is not None
        return self.proc.returncode

    def log(self) -> str:
        return "\n".join(self.lines)


async def spawn(
    name: str, argv: Sequence[str], prefix: Sequence[str] = (), stdin: int | None = None
) -> Process:
    """Start ``argv`` (after ``prefix``, e.g. ``ip netns exec NS``) in the repository's root."""
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        *argv,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    child = Process(name, proc)

    async def read() -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                child.lines.append(line.decode(errors="replace").rstrip())
                child._grew.set()
        finally:
            child._grew.set()

    child.reader = asyncio.create_task(read())
    return child


def peer_argv(role: str, config: Path, *args: str) -> list[str]:
    """``python -m peers.<role> --config CONFIG ARGS...``."""
    return [sys.executable, "-m", f"peers.{role}", "--config", str(config), *args]


@dataclass
class RelayProcess:
    """``relay.py`` as a process, optionally inside a network namespace."""

    config: Path
    netns: str | None = None
    port: int = 0
    host: str | None = None  # None: the configuration's relay.host
    args: tuple[str, ...] = ()  # more flags for relay.py
    url: str = ""
    process: Process | None = None
    log: list[str] = field(default_factory=list)  # every line, across restarts

    @property
    def http_url(self) -> str:
        """http://HOST:PORT of the running relay (from its ws:// URL)."""
        return "http" + self.url.removeprefix("ws").split("/ws", 1)[0]

    async def start(self, wait: float = START_TIMEOUT) -> str:
        """Start it (on the same port as before, after a stop); its URL once it listens."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        host = () if self.host is None else ("--host", self.host)
        argv = [
            sys.executable, str(ROOT / "relay.py"), "--config", str(self.config),
            *host, "--port", str(self.port), *self.args,
        ]  # fmt: skip
        self.process = await spawn("relay", argv, prefix)
        self.process.lines = self.log  # one log across restarts
        try:
            match = await self.process.expect(LISTENING, wait, start=len(self.log))
        except (TimeoutError, RuntimeError) as exc:
            await self.stop()
            raise RuntimeError(f"the relay did not start:\n{self.process.log()}") from exc
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        return self.url

    async def stop(self) -> int:
        """SIGTERM by PID (the relay closes every connection with 1001); the exit status."""
        process, self.process = self.process, None
        return 0 if process is None else await process.stop(grace=5.0)


async def start_relay(
    config: Path, ns: Netns | None = None, port: int = 0, host: str = "127.0.0.1"
) -> tuple[RelayProcess, str]:
    """``relay.py`` on ``host`` (inside ``ns`` when given); it and its ws:// URL."""
    relay = RelayProcess(config, None if ns is None else ns.name, port, host)
    return relay, await relay.start()


@contextlib.asynccontextmanager
async def relay_process(config: Path, netns: str | None = None) -> AsyncIterator[RelayProcess]:
    """A running relay for the block, stopped by its PID at the end."""
    running = RelayProcess(config, netns)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if it is taken first)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """Debian's ``redis-server`` on 127.0.0.1, a free port, nothing saved to disk.

    ``stop`` (SIGTERM) and ``kill`` (SIGKILL) by its PID; ``start`` again takes
    the same port, for a test of Redis going away and coming back.
    """

    port: int = 0
    process: Process | None = None
    netns: str | None = None  # run inside this network namespace (on its own 127.0.0.1)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> str:
        """Start it; its URL once it accepts connections."""
        for _ in range(5):
            port = self.port or _free_port()
            argv = [
                "redis-server", "--bind", "127.0.0.1", "--port", str(port),
                "--save", "", "--appendonly", "no", "--logfile", "",
                "--protected-mode", "yes", "--daemonize", "no",
            ]  # fmt: skip
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.process = await spawn("redis-server", argv, prefix)
            try:
                await self.process.expect("Ready to accept connections", START_TIMEOUT)
            except RuntimeError:
                log, self.process = self.process.log(), None
                if "Address already in use" in log and not self.port:
                    continue  # another process took the free port first
                raise RuntimeError(f"redis-server did not start:\n{log}") from None
            self.port = port
            return self.url
        raise RuntimeError("redis-server found no free port in 5 tries")

    async def stop(self) -> int:
        process, self.process = self.process, None
        return 0 if process is None else await process.stop(grace=5.0)

    async def kill(self) -> None:
        """SIGKILL by PID: Redis gone at once, as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.proc.returncode is None:
            process.proc.kill()
            await process.wait(5.0)


def redis_missing() -> str | None:
    """Why the Redis tests cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make redis-deps)"
    return None


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    """A running redis-server for the block, stopped by its PID at the end."""
    server = RedisServer()
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
