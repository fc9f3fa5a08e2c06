"""A local coturn for development and tests, configured from ``config.yaml``'s ``turn:`` section.

``make turn`` runs ``python -m peers.turnserver --config config.yaml``: it writes
coturn's configuration into a private temporary directory (the shared secret
never appears on a command line or in a log), starts Debian's ``turnserver``,
waits until it answers a STUN Binding request over UDP and TCP, logs where it
listens and stops it by its PID on Ctrl-C (or SIGTERM). Tests and demos use the
same thing as an async context manager::

    settings = TurnServerSettings.from_mapping({"turn": {"listen": "198.18.0.1", ...}})
    async with TurnServer(settings) as server:
        server.urls()      # ["turn:198.18.0.1:3478?transport=udp", ...]

Secure by default, as in production: coturn refuses to relay towards private,
loopback, link-local and other non-global addresses (``denied-peer-ip``) and
multicast (``no-multicast-peers``). This also avoids a trap measured on this
project: a relayed check towards a private address that coturn cannot route to
makes coturn delete the whole allocation. ``turn.allow_private_peers: true`` is
the LAN-only development profile (coturn and both peers on one private
network); ``turn.allowed_peers`` lists exceptions (the test networks' public
segment, which lives in 198.18.0.0/15 like every test address).

Errors::

    TurnServerError
    └── TurnStartError    coturn is missing, exited, or never answered (with its log's tail)

A bad key of ``turn:`` is the project's one ``relay.ConfigError`` (it names the
dotted key and what was expected), raised by the one reader, ``relay.Section``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from aioice import stun

from relay import TURN_SECRET_ENV, ConfigError, Section, read_yaml

__all__ = [
    "DENIED_PEERS",
    "LOOPBACK_PEERS",
    "TurnServer",
    "TurnServerError",
    "TurnServerSettings",
    "TurnStartError",
    "stun_binding",
]

logger = logging.getLogger(__name__)

TURNSERVER: Final = "turnserver"
START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
# coturn's verbose log: an allocation granted, an allocation freed (TurnServer.allocations).
_ALLOCATED: Final = re.compile(r"session (\d+): new, ")
_FREED: Final = re.compile(r"session (\d+): delete: ")

# Loopback and "this network": refused in every profile.
LOOPBACK_PEERS: Final = ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128")
# Every other non-global range of the IANA special-purpose registries (RFC 6890):
# private, carrier-grade NAT, link-local, documentation, benchmarking, reserved,
# plus IPv4-mapped and NAT64 IPv6 (which reach IPv4 private ranges).
DENIED_PEERS: Final = (
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "fc00::/7",
    "fe80::/10",
)


class TurnServerError(RuntimeError):
    """Base class: the local coturn could not be configured or run."""


class TurnStartError(TurnServerError):
    """coturn is missing, exited early, or never answered STUN."""


@dataclass(frozen=True)
class TurnServerSettings:
    """coturn's settings from ``turn:`` (the relay reads its ``secret``, ``urls`` and ``ttl``)."""

    listen: str = "127.0.0.1"  # listening-ip; also the relay address unless relay_ip is set
    port: int = 3478  # UDP and TCP; 0 picks a free port (this namespace only)
    tls_port: int = 5349  # TLS (turns:), only with cert and key; 0 picks a free port
    cert: Path | None = None
    key: Path | None = None
    relay_ip: str | None = None
    external_ip: str | None = None  # public address when coturn itself sits behind a 1:1 NAT
    min_port: int = 49152  # relay port range (open it in the firewall, UDP)
    max_port: int = 65535
    realm: str = "epedicare"
    secret: str | None = None  # use-auth-secret (TURN REST API): the relay mints credentials
    username: str | None = None  # or one static user (lt-cred-mech)
    credential: str | None = None
    allow_private_peers: bool = False  # LAN-only development profile
    allowed_peers: tuple[str, ...] = ()  # exceptions to the denied ranges (CIDR)
    verbose: bool = False  # coturn's --verbose (its log, not ours)
    # Tests only, never read from the YAML: relay to 127.0.0.0/8 (coturn's
    # allow-loopback-peers), so that TURN calls run on loopback without root.
    allow_loopback_peers: bool = False

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str] | None = None) -> TurnServerSettings:
        return cls.from_mapping(read_yaml(path), os.environ if env is None else env)

    @classmethod
    def from_mapping(cls, data: object, env: Mapping[str, str] | None = None) -> TurnServerSettings:
        """Read the ``turn`` section of the whole YAML document."""
        env = {} if env is None else env
        turn = Section.root(data).section("turn")
        d = cls()
        settings = cls(
            listen=turn.address("listen") or d.listen,
            port=turn.port("port", d.port),
            tls_port=turn.port("tls_port", d.tls_port),
            cert=turn.path_value("cert"),
            key=turn.path_value("key"),
            relay_ip=turn.address("relay_ip"),
            external_ip=turn.address("external_ip"),
            min_port=turn.port("min_port", d.min_port, minimum=1),
            max_port=turn.port("max_port", d.max_port, minimum=1),
            realm=turn.text("realm", d.realm),
            secret=env.get(TURN_SECRET_ENV) or turn.optional_text("secret"),
            username=turn.optional_text("username"),
            credential=turn.optional_text("credential"),
            allow_private_peers=turn.flag("allow_private_peers", d.allow_private_peers),
            allowed_peers=turn.networks("allowed_peers"),
            verbose=turn.flag("verbose", d.verbose),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that coturn would ignore or misread."""
        if self.min_port > self.max_port:
            raise ConfigError("turn.min_port", "expected at most turn.max_port")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("turn.cert" if self.cert is None else "turn.key", "set both")
        if (self.username is None) != (self.credential is None):
            raise ConfigError(
                "turn.username" if self.username is None else "turn.credential", "set both"
            )
        if self.username is not None and ":" in self.username:
            raise ConfigError("turn.username", "expected a name without ':'")
        if self.secret is None and self.username is None:
            raise ConfigError(
                "turn.secret",
                f"required (or {TURN_SECRET_ENV}, or turn.username and turn.credential): "
                "coturn never runs as an open relay",
            )

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def peers_policy(self) -> str:
        """Where coturn relays to, for the start banner (the exceptions listed)."""
        policy = (
            "private peers ALLOWED (LAN-only development profile)"
            if self.allow_private_peers
            else "private and loopback peers denied"
        )
        if self.allowed_peers:
            policy += f", except {', '.join(self.allowed_peers)} (turn.allowed_peers)"
        return policy

    def allows_loopback(self) -> bool:
        """Whether turn.allowed_peers lets a loopback range through (127.0.0.0/8, ::1)."""
        return any(
            ipaddress.ip_network(cidr, strict=False).overlaps(ipaddress.ip_network(loopback))
            for cidr in self.allowed_peers
            for loopback in ("127.0.0.0/8", "::1/128")
            if ipaddress.ip_network(cidr, strict=False).version
            == ipaddress.ip_network(loopback).version
        )

    def denied_peers(self) -> tuple[str, ...]:
        # coturn matches 127.0.0.1 against "::/128" too: none of these when loopback is allowed.
        loopback = () if self.allow_loopback_peers else LOOPBACK_PEERS
        return loopback if self.allow_private_peers else loopback + DENIED_PEERS

    def coturn_config(self, run_dir: Path, port: int, tls_port: int) -> str:
        """coturn's configuration file (``turnserver -c``), one option per line."""
        lines = [
            "# written by peers/turnserver.py from config.yaml's turn: section",
            f"listening-ip={self.listen}",
            f"listening-port={port}",
            f"relay-ip={self.relay_ip or self.listen}",
            f"min-port={self.min_port}",
            f"max-port={self.max_port}",
            f"realm={self.realm}",
            "fingerprint",
            "no-cli",
            "no-multicast-peers",
            "no-software-attribute",
            "simple-log",
            f"log-file={run_dir / 'coturn.log'}",
            f"pidfile={run_dir / 'coturn.pid'}",
            f"userdb={run_dir / 'turndb'}",
        ]
        if self.external_ip:
            lines.append(f"external-ip={self.external_ip}")
        if self.secret is not None:
            lines += ["use-auth-secret", f"static-auth-secret={self.secret}"]
        else:
            lines += ["lt-cred-mech", f"user={self.username}:{self.credential}"]
        if self.cert is not None and self.key is not None:
            lines += [
                f"tls-listening-port={tls_port}",
                f"cert={self.cert.resolve()}",
                f"pkey={self.key.resolve()}",
                "no-tlsv1",
                "no-tlsv1_1",
                "no-dtls",
            ]
        else:
            lines += ["no-tls", "no-dtls"]
        lines += [f"denied-peer-ip={_ip_range(cidr)}" for cidr in self.denied_peers()]
        lines += [f"allowed-peer-ip={_ip_range(cidr)}" for cidr in self.allowed_peers]
        if self.allow_loopback_peers or self.allows_loopback():
            # coturn refuses loopback peers before it reads allowed-peer-ip.
            lines.append("allow-loopback-peers")
        if self.verbose:
            lines.append("verbose")
        return "\n".join(lines) + "\n"


class TurnServer:
    """coturn as a child process, from start (answering STUN) to stop (by its PID)."""

    def __init__(
        self,
        settings: TurnServerSettings,
        *,
        executable: str = TURNSERVER,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.executable = executable
        self.start_timeout = start_timeout
        self.port = settings.port
        self.tls_port = settings.tls_port
        self.process: asyncio.subprocess.Process | None = None
        self.run_dir: Path | None = None

    async def __aenter__(self) -> TurnServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def host(self) -> str:
        """Where clients reach this server (loopback when it listens everywhere)."""
        unspecified = ipaddress.ip_address(self.settings.listen).is_unspecified
        return "127.0.0.1" if unspecified else self.settings.listen

    @property
    def log_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "coturn.log"

    def urls(self) -> list[str]:
        """The ICE server URLs that reach this server: UDP, TCP and (with a certificate) TLS."""
        urls = [
            f"turn:{self.host}:{self.port}?transport=udp",
            f"turn:{self.host}:{self.port}?transport=tcp",
        ]
        if self.settings.tls:
            urls.append(f"turns:{self.host}:{self.tls_port}?transport=tcp")
        return urls

    async def start(self) -> None:
        executable = shutil.which(self.executable)
        if executable is None:
            raise TurnStartError(
                f"`{self.executable}` is missing: run `make turn-deps` (Debian's coturn)"
            )
        host = self.host
        self.port = _free_port(host, self.settings.port, "turn.port")
        if self.settings.tls:
            self.tls_port = _free_port(host, self.settings.tls_port, "turn.tls_port")
        self.run_dir = Path(tempfile.mkdtemp(prefix="epedicare-coturn-"))
        config = self.run_dir / "turnserver.conf"
        config.touch(mode=0o600)  # it holds the shared secret
        config.write_text(
            self.settings.coturn_config(self.run_dir, self.port, self.tls_port), encoding="utf-8"
        )
        self.process = await asyncio.create_subprocess_exec(
            executable,
            "-c",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "coturn %d listening on %s:%d (UDP, TCP)%s, relay ports %d-%d, %s, %s",
            self.process.pid,
            host,
            self.port,
            f", {host}:{self.tls_port} (TLS)" if self.settings.tls else "",
            self.settings.min_port,
            self.settings.max_port,
            "shared secret (use-auth-secret)" if self.settings.secret else "one static user",
            self.settings.peers_policy(),
        )
        if self.settings.allow_private_peers:
            logger.warning(
                "coturn relays to private addresses (turn.allow_private_peers): "
                "a LAN-only development profile, never for production"
            )

    async def stop(self) -> None:
        """SIGTERM to coturn's PID, SIGKILL after STOP_TIMEOUT; remove the run directory."""
        proc, self.process = self.process, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            logger.info("coturn %d stopped", proc.pid)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def allocations(self) -> set[str]:
        """The coturn sessions that hold an allocation now, read from coturn's log.

        coturn logs ``session N: new, ...`` when it grants an allocation and
        ``session N: delete: ...`` when it frees one (the client's Refresh with
        lifetime 0, its TCP connection closed, or the lifetime run out), but only
        with ``turn.verbose``: without it this raises TurnServerError.
        """
        if not self.settings.verbose:
            raise TurnServerError("allocations() reads coturn's verbose log: set turn.verbose")
        path = self.log_path
        if path is None or not path.exists():
            return set()
        text = path.read_text(encoding="utf-8", errors="replace")
        granted = set(_ALLOCATED.findall(text))
        return granted - set(_FREED.findall(text))

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.returncode is not None:
                raise TurnStartError(
                    f"coturn exited with status {self.process.returncode} before answering:\n"
                    + self.log_tail()
                )
            if await stun_binding(self.host, self.port, "udp", wait=0.2) is not None:
                break
            if time.monotonic() > deadline:
                raise TurnStartError(
                    f"coturn did not answer STUN on {self.host}:{self.port} within "
                    f"{self.start_timeout:g} s:\n" + self.log_tail()
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 0.05)
        if await stun_binding(self.host, self.port, "tcp", wait=self.start_timeout) is None:
            raise TurnStartError(f"coturn answered STUN over UDP but not TCP on port {self.port}")


async def stun_binding(
    host: str, port: int, transport: str = "udp", wait: float = 1.0
) -> tuple[str, int] | None:
    """One STUN Binding request; the XOR-MAPPED-ADDRESS it returns, or None without answer."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    try:
        if transport == "tcp":
            data = await asyncio.wait_for(_stun_tcp(host, port, bytes(request)), wait)
        else:
            data = await asyncio.wait_for(_stun_udp(host, port, bytes(request)), wait)
    except (TimeoutError, OSError):
        return None
    try:
        response = stun.parse_message(data)
    except ValueError:
        return None
    if response.transaction_id != request.transaction_id:
        return None
    mapped: tuple[str, int] | None = response.attributes.get("XOR-MAPPED-ADDRESS")
    return mapped


async def _stun_udp(host: str, port: int, request: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
            if not answer.done():
                answer.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answer.done():
                answer.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Probe, remote_addr=(host, port))
    try:
        transport.sendto(request)
        return await answer
    finally:
        transport.close()


async def _stun_tcp(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        header = await reader.readexactly(20)
        (length,) = struct.unpack("!H", header[2:4])
        return header + await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _free_port(host: str, port: int, key: str) -> int:
    """``port`` if nothing holds it in UDP or TCP (coturn's SO_REUSEPORT would share it
    silently), or a free one when it is 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20):
        with (
            socket.socket(family, socket.SOCK_STREAM) as tcp,
            socket.socket(family, socket.SOCK_DGRAM) as udp,
        ):
            try:
                tcp.bind((host, port))
                udp.bind((host, tcp.getsockname()[1]))
            except OSError as exc:
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # TCP's free port is taken in UDP: draw again
                raise TurnStartError(
                    f"{key}: {host}:{port} is not available ({exc.strerror}); "
                    "is another TURN server running?"
                ) from exc
            chosen: int = tcp.getsockname()[1]
            return chosen
    raise TurnStartError(f"{key}: no port free in both UDP and TCP on {host}")


def _ip_range(cidr: str) -> str:
    network = ipaddress.ip_network(cidr)
    return f"{network.network_address}-{network.broadcast_address}"


# -- entry point ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m peers.turnserver",
        description="Run a local coturn configured from config.yaml's turn: section.",
    )
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML file")
    parser.add_argument("--listen", help="overrides turn.listen")
    parser.add_argument("--port", type=int, help="overrides turn.port (0: a free port)")
    parser.add_argument("-v", "--verbose", action="store_true", help="coturn's verbose log")
    return parser.parse_args(argv)


async def serve(settings: TurnServerSettings) -> None:
    """Run until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with TurnServer(settings) as server:
        for url in server.urls():
            logger.info("TURN URL %s", url)
        logger.info("coturn log: %s (Ctrl-C stops coturn)", server.log_path)
        assert server.process is not None
        exited = asyncio.ensure_future(server.process.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if exited.done():
            raise TurnStartError(
                f"coturn exited with status {exited.result()}:\n{server.log_tail()}"
            )
        exited.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = TurnServerSettings.load(args.config)
        overrides: dict[str, object] = {}
        if args.listen is not None:
            overrides["listen"] = args.listen
        if args.port is not None:
            overrides["port"] = args.port
        if args.verbose:
            overrides["verbose"] = True
        if overrides:
            data = read_yaml(args.config)
            if isinstance(data, dict):
                data["turn"] = {**(data.get("turn") or {}), **overrides}
            settings = TurnServerSettings.from_mapping(data, os.environ)
        asyncio.run(serve(settings))
    except (ConfigError, TurnServerError) as exc:
        logger.error("turn: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
