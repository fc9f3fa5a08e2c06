"""What the peers add to aioice's TURN client: explained failures, TLS trust, the path taken.

aioice (0.13) gathers a relayed candidate quietly or not at all. This module
tells why, and which path a call took; what it needs from aioice's and
aiortc's internals comes through ``peers.aiortc_patches`` (which also binds
TURN channels early and reports lost allocations):

- ``check_relay_gathered``: after gathering, when a TURN server is configured
  but no relay candidate came, find out why at once (credentials refused or
  expired, no answer, connection refused, name does not resolve, certificate
  not trusted) and raise ``TurnUnavailable`` naming the TURN URL and the cause,
  instead of letting ICE wait for a path that cannot exist.
- ``tls_context``: aioice verifies ``turns:`` servers with Python's default
  context; this one also trusts ``turn.ca_file``.
- ``relay_transport`` / ``selected_path``: which path the call took
  (host, srflx, prflx or relay; and for relay, udp, tcp or tls to the server).

Errors: ``TurnUnavailable`` (``peers.errors``, code ``turn-unavailable``): a
configured TURN server gave no relay candidate; ``url`` and ``cause``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioice import stun
from aioice.ice import StunProtocol
from aioice.turn import TurnClientTcpProtocol, TurnTransport, create_turn_endpoint
from aiortc import RTCIceServer, RTCIceTransport
from aiortc.rtcicetransport import parse_stun_turn_uri

from peers.aiortc_patches import ice_connection, nominated_pair, turn_client
from peers.errors import TurnUnavailable

__all__ = [
    "IcePath",
    "TurnServerUrl",
    "TurnUnavailable",
    "check_relay_gathered",
    "check_turn_server",
    "diagnose",
    "first_turn_server",
    "relay_transport",
    "selected_path",
    "tls_context",
]

logger = logging.getLogger(__name__)

DIAGNOSIS_TIMEOUT = 2.0  # seconds given to one allocation attempt when explaining a failure


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


# -- TLS trust ------------------------------------------------------------------------------


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The default context (system CAs, host name checked), plus ``ca_file`` when given."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


# -- explained failures ---------------------------------------------------------------------


async def check_relay_gathered(
    transport: RTCIceTransport, server: TurnServerUrl, ca_file: Path | None = None
) -> None:
    """Raise TurnUnavailable when gathering produced no relay candidate from ``server``."""
    if any(c.type == "relay" for c in ice_connection(transport).local_candidates):
        return
    raise TurnUnavailable(server.url, await diagnose(server, ca_file))


async def check_turn_server(server: TurnServerUrl, ca_file: Path | None = None) -> None:
    """Allocate once on ``server`` and release it; TurnUnavailable naming the cause if refused.

    Called as soon as a seat is taken, so that a TURN server that cannot work
    is reported before the other side is there, not once a call is tried.
    """
    try:
        async with asyncio.timeout(DIAGNOSIS_TIMEOUT):
            endpoint = await _allocate(server, ca_file)
    except (stun.TransactionError, TimeoutError, OSError, ValueError):
        raise TurnUnavailable(server.url, await diagnose(server, ca_file)) from None
    endpoint.close()


async def _allocate(server: TurnServerUrl, ca_file: Path | None) -> TurnTransport:
    """One TURN allocation on ``server`` (aioice's endpoint); the caller closes it."""
    endpoint, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol,
        server_addr=(server.host, server.port),
        username=server.username,
        password=server.credential,
        ssl=tls_context(ca_file) if server.tls else None,
        transport=server.transport,
    )
    return endpoint


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
            endpoint = await _allocate(server, ca_file)
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
    inner = turn_client(protocol)
    if inner is None:
        return None
    if isinstance(inner, TurnClientTcpProtocol):
        tls = inner.transport.get_extra_info("sslcontext") is not None
        return "tls" if tls else "tcp"
    return "udp"


def selected_path(transport: RTCIceTransport) -> IcePath | None:
    """The nominated pair of the first component, or None before ICE completes."""
    pair = nominated_pair(ice_connection(transport))
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
