"""Shared test helpers: one timeout unit, a relay on port 0, protocol clients."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect

import relay

T = TypeVar("T")

# One timeout unit (seconds) wraps every await that could hang; scale it on a
# slow machine with EPEDICARE_TEST_TIMEOUT_SCALE=3.
TIMEOUT = 5.0 * float(os.environ.get("EPEDICARE_TEST_TIMEOUT_SCALE", "1"))


async def within(awaitable: Awaitable[T], units: float = 1.0) -> T:
    """Await with the test timeout unit (times ``units``)."""
    return await asyncio.wait_for(awaitable, TIMEOUT * units)


# Every seat store of the core, by name: the core's tests run against each. The
# Redis side is not a SeatStore (it awaits, the core never does): the relay's
# adapter claims seats there. The integration tests of seats and forwarding run
# on it through the `relays` fixture (tests/test_relay_integration.py): two
# relays on one shared redis-server, each pair split across them.
SEAT_STORES: dict[str, Callable[[], relay.SeatStore]] = {"memory": relay.MemorySeats}


def relay_config(**sections: dict[str, Any]) -> relay.RelayConfig:
    """A relay configuration on 127.0.0.1, port 0, with sections overridden."""
    data: dict[str, Any] = {"relay": {"host": "127.0.0.1", "port": 0}}
    data.update(sections)
    return relay.RelayConfig.from_mapping(data, env={})


@contextlib.asynccontextmanager
async def running_relay(
    config: relay.RelayConfig | None = None,
) -> AsyncIterator[relay.RunningRelay]:
    try:
        async with relay.serve_relay(config or relay_config()) as running:
            yield running
    finally:
        await Client.drop_all()


class Client:
    """A protocol client on a real WebSocket connection."""

    # Every client still open; a test's relay drops them at its end, so that a
    # client the test left half-open (paused, silent) never leaks its socket.
    opened: ClassVar[list[Client]] = []

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        Client.opened.append(self)

    @classmethod
    async def drop_all(cls) -> None:
        clients, cls.opened = cls.opened, []
        for client in clients:
            client.ws.transport.abort()
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.ws.wait_closed(), TIMEOUT)

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        return cls(await within(connect(url, compression=None, **kwargs)))

    async def send(self, **fields: Any) -> None:
        await self.ws.send(json.dumps(fields))

    async def send_raw(self, message: str | bytes) -> None:
        await self.ws.send(message)

    async def recv(self) -> dict[str, Any]:
        message = await within(self.ws.recv())
        data = json.loads(message)
        assert isinstance(data, dict)
        return data

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Receive one frame and check its type and the given fields."""
        data = await self.recv()
        assert data["type"] == kind, data
        for name, value in fields.items():
            assert data[name] == value, (name, data)
        return data

    async def expect_error(self, code: str) -> dict[str, Any]:
        return await self.expect("error", code=code)

    async def join(self, session: str, role: str, **fields: Any) -> dict[str, Any]:
        await self.send(type="join", session=session, role=role, **fields)
        return await self.expect("joined", session=session, role=role)

    async def closed(self) -> tuple[int | None, str | None]:
        """Wait until the relay closes the connection; its close code and reason."""
        await within(self.ws.wait_closed())
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        await self.ws.close()


async def pair(url: str, session: str) -> tuple[Client, Client]:
    """A patient and a practitioner joined to one session."""
    patient = await Client.open(url)
    await patient.join(session, "patient")
    practitioner = await Client.open(url)
    await practitioner.join(session, "practitioner")
    await patient.expect("peer-joined", role="practitioner")
    return patient, practitioner


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def http_get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 GET (no client-side path normalisation)."""
    reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await within(reader.read())
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def relay_command(*args: str, prefix: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
    """``python relay.py ARGS`` with its output piped (``prefix``: e.g. ip netns exec)."""
    return await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        str(relay.ROOT / "relay.py"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=relay.ROOT,
    )
