"""What the peers add to aioice's TURN client: explained failures, TLS trust, early channels.

aioice (0.13) gathers a relayed candidate quietly or not at all, and uses a
relayed path without telling anyone when it breaks. This module fills those
gaps, on the ``aioice.Connection`` behind an aiortc ``RTCIceTransport``:

- ``check_relay_gathered``: after gathering, when a TURN server is configured
  but no relay candidate came, find out why at once (credentials refused or
  expired, no answer, connection refused, name does not resolve, certificate
  not trusted) and raise ``TurnUnavailable`` naming the TURN URL and the cause,
  instead of letting ICE wait for a path that cannot exist.
- ``use_ca_file``: aioice verifies ``turns:`` servers with Python's default
  context; give it one that also trusts ``turn.ca_file``.
- ``bind_channels_early``: the first frame through TURN in about 80 ms instead
  of about 560 ms. aioice drops data indications from a peer address it has no
  channel to yet, so the controlled side's first check (which reaches the
  controlling side before that side has sent anything) is lost and resent 500 ms
  later. Binding a channel to every remote relay and server-reflexive candidate
  right before the checks start removes that loss.
- ``watch_allocations``: coturn may delete an allocation (it does when relaying
  towards an unroutable peer fails); aioice then only logs each refused channel
  binding at DEBUG. Here a refused binding is confirmed with a Refresh and a lost
  allocation is reported through a callback.
- ``relay_transport`` / ``selected_path``: which path the call took
  (host, srflx, prflx or relay; and for relay, udp, tcp or tls to the server).

Errors::

    TurnUnavailable   (ConnectionError) a configured TURN server gave no relay candidate;
                      ``url`` and ``cause``; str() reads as a sentence
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aioice import Connection, stun
from aioice.ice import StunProtocol
from aioice.turn import (
    TurnClientMixin,
    TurnClientTcpProtocol,
    TurnTransport,
    create_turn_endpoint,
)
from aiortc import RTCIceServer, RTCIceTransport
from aiortc.rtcicetransport import parse_stun_turn_uri

__all__ = [
    "IcePath",
    "TurnServerUrl",
    "TurnUnavailable",
    "bind_channels_early",
    "bind_channels_to_server",
    "check_relay_gathered",
    "diagnose",
    "first_turn_server",
    "instrument",
    "relay_transport",
    "selected_path",
    "use_ca_file",
    "watch_allocations",
]

logger = logging.getLogger(__name__)

DIAGNOSIS_TIMEOUT = 2.0  # seconds given to one allocation attempt when explaining a failure
LOST_CODES = frozenset({400, 437})  # after these, a Refresh tells whether the allocation is gone


class TurnUnavailable(ConnectionError):
    """A configured TURN server gave no relayed candidate."""

    code = "turn-unavailable"

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"TURN server {url}: {cause}")
        self.url = url
        self.cause = cause


@dataclass(frozen=True)
class TurnServerUrl:
    """The one TURN server that aiortc uses (the first usable turn:/turns: URL)."""

    url: str
    host: str
    port: int
    transport: str  # "udp" or "tcp" to the server
    tls: bool
    username: str | None
    credential: str | None

    @property
    def label(self) -> str:
        """udp, tcp or tls: how the peer reaches the server."""
        return "tls" if self.tls else self.transport


def first_turn_server(servers: Sequence[RTCIceServer]) -> TurnServerUrl | None:
    """The TURN server aiortc will use, chosen by aiortc's own rules."""
    for server in servers:
        urls = server.urls if isinstance(server.urls, list) else [server.urls]
        for url in urls:
            if not url.startswith("turn"):
                continue
            parsed = parse_stun_turn_uri(url)
            scheme, transport = parsed["scheme"], parsed["transport"]
            if (scheme == "turn" and transport not in ("udp", "tcp")) or (
                scheme == "turns" and transport != "tcp"
            ):
                continue
            if server.credentialType != "password":
                continue
            return TurnServerUrl(
                url=url,
                host=parsed["host"],
                port=parsed["port"],
                transport=transport,
                tls=scheme == "turns",
                username=server.username,
                credential=server.credential,
            )
    return None


def _connection(transport: RTCIceTransport) -> Connection:
    # aiortc keeps the aioice Connection private; this module is the one place that reads it.
    return transport._connection


def _turn_inner(protocol: StunProtocol) -> TurnClientMixin | None:
    """The TURN client under a relayed candidate's protocol (None for host candidates)."""
    transport = getattr(protocol, "transport", None)
    if not isinstance(transport, TurnTransport):
        return None
    inner: TurnClientMixin = getattr(transport, "_TurnTransport__inner_protocol")  # noqa: B009
    return inner


def _relay_protocols(connection: Connection) -> list[tuple[StunProtocol, TurnClientMixin]]:
    pairs = []
    for protocol in connection._protocols:
        inner = _turn_inner(protocol)
        if inner is not None:
            pairs.append((protocol, inner))
    return pairs


# -- TLS trust ------------------------------------------------------------------------------


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The default context (system CAs, host name checked), plus ``ca_file`` when given."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def use_ca_file(transport: RTCIceTransport, ca_file: Path | None) -> None:
    """Make a ``turns:`` allocation trust ``ca_file`` too (call before gathering)."""
    connection = _connection(transport)
    if ca_file is not None and connection.turn_ssl:
        # aioice hands turn_ssl to loop.create_connection(ssl=...): a context works as well.
        connection.turn_ssl = cast(bool, tls_context(ca_file))


# -- explained failures ---------------------------------------------------------------------


async def check_relay_gathered(
    transport: RTCIceTransport, server: TurnServerUrl, ca_file: Path | None = None
) -> None:
    """Raise TurnUnavailable when gathering produced no relay candidate from ``server``."""
    if any(c.type == "relay" for c in _connection(transport).local_candidates):
        return
    raise TurnUnavailable(server.url, await diagnose(server, ca_file))


async def diagnose(
    server: TurnServerUrl, ca_file: Path | None = None, now: float | None = None
) -> str:
    """Why ``server`` gives no allocation, as a clause for a sentence."""
    now = time.time() if now is None else now
    expiry_text = (server.username or "").partition(":")[0]
    if expiry_text.isdigit() and int(expiry_text) < now:
        ago = int(now) - int(expiry_text)
        return f"the credentials expired {ago} s ago (the username's expiry is in the past)"
    try:
        await asyncio.get_running_loop().getaddrinfo(server.host, server.port)
    except socket.gaierror as exc:
        return f"the host name {server.host!r} does not resolve ({exc.strerror})"
    try:
        async with asyncio.timeout(DIAGNOSIS_TIMEOUT):
            endpoint, _ = await create_turn_endpoint(
                asyncio.DatagramProtocol,
                server_addr=(server.host, server.port),
                username=server.username,
                password=server.credential,
                ssl=tls_context(ca_file) if server.tls else None,
                transport=server.transport,
            )
    except stun.TransactionFailed as exc:
        code = exc.response.error_code
        if code == 401:
            return "the server refused the credentials (401: wrong secret or password)"
        return f"the server refused the allocation ({exc})"
    except stun.TransactionTimeout:
        return "no answer (is coturn running and reachable?)"
    except TimeoutError:
        return f"no answer within {DIAGNOSIS_TIMEOUT:g} s (is coturn running and reachable?)"
    except ssl.SSLCertVerificationError as exc:
        hint = " (set turn.ca_file to the CA that signed it)" if ca_file is None else ""
        return f"its TLS certificate is not trusted: {exc.verify_message}{hint}"
    except ConnectionRefusedError:
        return "the connection was refused (is coturn running on that port?)"
    except OSError as exc:
        return f"cannot reach it ({exc.strerror or exc})"
    endpoint.close()
    return "no relay candidate during gathering, although the server answers now"


# -- early channels -------------------------------------------------------------------------


async def bind_channels_early(connection: Connection) -> None:
    """Bind a channel on each relayed candidate to each remote relay and srflx candidate.

    aioice discards data indications from addresses it has no channel to, which
    loses the peer's first check; a channel bound before the checks avoids it.
    Failures are left to aioice, which binds again when it sends.
    """
    remotes = [
        (c.host, c.port)
        for c in connection.remote_candidates
        if c.type in ("relay", "srflx") and c.transport.lower() == "udp"
    ]
    binds = [
        _bind(inner, addr)
        for _, inner in _relay_protocols(connection)
        for addr in remotes
        if addr not in inner.peer_to_channel and addr not in inner.peer_connect_waiters
    ]
    if binds:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*binds, return_exceptions=True)


async def bind_channels_to_server(connection: Connection) -> None:
    """Bind a channel from each relayed candidate to its own relayed address.

    aioice's filter of data indications looks at the peer's IP only, and the
    other peer's relayed candidate on the same TURN server has the server's IP:
    with this channel, the other peer's first check is accepted even when it
    arrives before this side has learnt the other's candidates (the offerer,
    while the answer is still on its way through the signaling relay).
    """
    binds = [
        _bind(inner, inner.relayed_address)
        for _, inner in _relay_protocols(connection)
        if inner.relayed_address is not None and inner.relayed_address not in inner.peer_to_channel
    ]
    if binds:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*binds, return_exceptions=True)


async def _bind(inner: TurnClientMixin, addr: tuple[str, int]) -> None:
    # The bookkeeping of aioice's TurnClientMixin.send_data, without sending data.
    if inner.channel_number > 0x4FFF:
        return
    channel = inner.channel_number
    inner.channel_number += 1
    waiters: list[asyncio.Future[None]] = []
    inner.peer_connect_waiters[addr] = waiters
    try:
        await inner.channel_bind(channel, addr)
    except Exception as exc:
        inner.peer_to_failed_channel[addr] = channel
        for waiter in inner.peer_connect_waiters.pop(addr, []):
            waiter.set_exception(exc)
        raise
    inner.channel_refresh_at[channel] = time.time() + inner.channel_refresh_time
    inner.channel_to_peer[channel] = addr
    inner.peer_to_channel[addr] = channel
    for waiter in inner.peer_connect_waiters.pop(addr, []):
        waiter.set_result(None)


def instrument(
    transport: RTCIceTransport,
    *,
    ca_file: Path | None = None,
    on_lost: Callable[[str], None] | None = None,
    early_channels: bool = True,
) -> None:
    """Everything above, on one ICE transport; call it before gathering.

    ``turns:`` trusts ``ca_file`` as well; when the checks start, channels are
    bound to the remote relay and srflx candidates first and, with ``on_lost``,
    relayed allocations are watched.
    """
    use_ca_file(transport, ca_file)
    connection = _connection(transport)
    connect = connection.connect
    gather = connection.gather_candidates

    async def gather_with_channels() -> None:
        await gather()
        if early_channels:
            await bind_channels_to_server(connection)

    connection.gather_candidates = gather_with_channels  # type: ignore[method-assign]

    async def connect_with_channels() -> None:
        if on_lost is not None:
            watch_allocations(transport, on_lost)
        if early_channels:
            await bind_channels_early(connection)
        await connect()

    connection.connect = connect_with_channels  # type: ignore[method-assign]


# -- lost allocations -----------------------------------------------------------------------


def watch_allocations(transport: RTCIceTransport, on_lost: Callable[[str], None]) -> None:
    """Call ``on_lost(reason)`` once when coturn has dropped a relayed candidate's allocation."""
    connection = _connection(transport)
    reported = False

    def report(reason: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            on_lost(reason)

    for protocol, inner in _relay_protocols(connection):
        original = protocol.error_received

        def error_received(
            exc: Exception,
            original: Callable[[Exception], None] = original,
            inner: TurnClientMixin = inner,
        ) -> None:
            original(exc)
            if isinstance(exc, stun.TransactionFailed) and exc.response.error_code in LOST_CODES:
                task = asyncio.ensure_future(_confirm_lost(inner, exc, report))
                _tasks.add(task)
                task.add_done_callback(_tasks.discard)

        protocol.error_received = error_received  # type: ignore[method-assign]

        def connection_lost(
            exc: Exception | None,
            original: Callable[[Exception | None], None] = protocol.connection_lost,
            inner: TurnClientMixin = inner,
        ) -> None:
            original(exc)
            if not connection._closing:  # a deliberate close is no loss
                report(f"the TURN allocation {inner.relayed_address} was closed")

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]


_tasks: set[asyncio.Task[None]] = set()


async def _confirm_lost(
    inner: TurnClientMixin, exc: stun.TransactionFailed, report: Callable[[str], None]
) -> None:
    request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
    request.attributes["LIFETIME"] = inner.lifetime
    try:
        await inner.request_with_retry(request)
    except stun.TransactionFailed as refused:
        if refused.response.error_code == 437:
            report(
                f"coturn dropped the TURN allocation {inner.relayed_address} "
                f"(a channel binding got {exc.response.error_code}, a refresh got 437)"
            )
    except (stun.TransactionError, ConnectionError, OSError) as failed:
        report(f"the TURN server stopped answering for {inner.relayed_address} ({failed})")


# -- which path --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IcePath:
    """The selected candidate pair of one ICE transport."""

    local_type: str  # host, srflx, prflx or relay
    remote_type: str
    protocol: str  # udp (aioice has no ICE-TCP)
    relay: str | None  # how the local relayed candidate reaches TURN: udp, tcp or tls
    local_address: str
    remote_address: str

    @property
    def type(self) -> str:
        """relay when either end is relayed, else the local candidate's type."""
        return "relay" if "relay" in (self.local_type, self.remote_type) else self.local_type

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "local": self.local_type,
            "remote": self.remote_type,
            "protocol": self.protocol,
            "relay": self.relay,
        }

    def __str__(self) -> str:
        via = f" (TURN over {self.relay})" if self.relay else ""
        return f"{self.local_type} -> {self.remote_type} over {self.protocol}{via}"


def relay_transport(protocol: StunProtocol) -> str | None:
    """udp, tcp or tls for a relayed candidate's protocol; None otherwise."""
    inner = _turn_inner(protocol)
    if inner is None:
        return None
    if isinstance(inner, TurnClientTcpProtocol):
        tls = inner.transport.get_extra_info("sslcontext") is not None
        return "tls" if tls else "tcp"
    return "udp"


def selected_path(transport: RTCIceTransport) -> IcePath | None:
    """The nominated pair of the first component, or None before ICE completes."""
    nominated = _connection(transport)._nominated
    pair = nominated.get(1) or next(iter(nominated.values()), None)
    if pair is None:
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    return IcePath(
        local_type=local.type,
        remote_type=remote.type,
        protocol=local.transport.lower(),
        relay=relay_transport(pair.protocol),
        local_address=f"{local.host}:{local.port}",
        remote_address=f"{remote.host}:{remote.port}",
    )
