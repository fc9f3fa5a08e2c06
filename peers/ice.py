"""ICE for the peers: our RTCConfiguration (never aiortc's default public STUN
server), the servers the relay hands out, the transport policy, and an ICE
timeout that the stack itself honours.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from peers.aiortc_patches import ice_connection, local_address, nominated_pair, set_check_retries
from peers.config import PeerSettings
from peers.turnclient import IcePath, first_turn_server, selected_path

__all__ = [
    "IcePath",
    "configuration",
    "explain_failure",
    "honour_timeout",
    "ice_servers",
    "ice_transports",
    "path_of",
    "rtc_configuration",
    "unresolvable",
]

logger = logging.getLogger(__name__)


def ice_servers(
    settings: PeerSettings, from_relay: Sequence[dict[str, Any]] | None
) -> list[RTCIceServer]:
    """The servers for one call: the relay's short-lived TURN credentials first, then the YAML's.

    aiortc uses only the first TURN URL and the first STUN URL, so the order is
    the preference: credentials minted by the relay win over static ones.
    """
    servers: list[RTCIceServer] = []
    for entry in from_relay or []:
        urls = entry.get("urls")
        if isinstance(urls, str | list):
            servers.append(
                RTCIceServer(
                    urls=urls, username=entry.get("username"), credential=entry.get("credential")
                )
            )
    servers += [
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in settings.ice_servers
    ]
    return servers


def configuration(settings: PeerSettings, servers: Sequence[RTCIceServer]) -> RTCConfiguration:
    """The configuration of one call for ``settings`` (its ICE policy) and ``servers``."""
    return rtc_configuration(servers, settings.ice_policy)


def rtc_configuration(servers: Sequence[RTCIceServer], policy: str = "all") -> RTCConfiguration:
    """Always an explicit configuration: aiortc's default points at a public STUN server.

    ``policy`` is the YAML's ``ice.policy``: ``all``, or ``relay`` for TURN only.
    """
    transport_policy = (
        RTCIceTransportPolicy.RELAY if policy == "relay" else RTCIceTransportPolicy.ALL
    )
    return RTCConfiguration(iceServers=list(servers), iceTransportPolicy=transport_policy)


def honour_timeout(timeout_s: float) -> int:
    """Make aioice give up connectivity checks within ``timeout_s``.

    aioice retransmits a STUN check RETRY_MAX times with a doubling timeout
    starting at 0.5 s: 6 retransmissions take 63.5 s before ICE fails. Pick the
    largest count whose total fits the timeout (at least 2, i.e. 3.5 s).
    """
    retries = 2
    while 0.5 * (2 ** (retries + 2) - 1) <= timeout_s:
        retries += 1
    set_check_retries(retries)
    return retries


def ice_transports(pc: RTCPeerConnection) -> list[Any]:
    """The distinct RTCIceTransports of a connection (one, with bundling)."""
    found: list[Any] = []
    for transceiver in pc.getTransceivers():
        dtls = transceiver.sender.transport
        if dtls is not None and dtls.transport not in found:
            found.append(dtls.transport)
    sctp = pc.sctp
    if sctp is not None and sctp.transport.transport not in found:
        found.append(sctp.transport.transport)
    return found


def path_of(pc: RTCPeerConnection) -> IcePath | None:
    for transport in ice_transports(pc):
        with_path = selected_path(transport)
        if with_path is not None:
            return with_path
    return None


def path_address_gone(pc: RTCPeerConnection) -> bool:
    """The address the selected pair's packets leave from is no longer this machine's.

    A network change (the old interface and its address gone): that path cannot come
    back, whatever the other signals say. Unknown, or still there: False.
    """
    for transport in ice_transports(pc):
        pair = nominated_pair(ice_connection(transport))
        address = None if pair is None else local_address(pair)
        if address is not None and not address_present(address):
            return True
    return False


def address_present(address: str) -> bool:
    """``address`` is still assigned here: a socket can be bound to it (else EADDRNOTAVAIL)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


async def unresolvable(servers: Sequence[RTCIceServer], timeout_s: float = 3.0) -> str | None:
    """A message when the TURN server aiortc will use has a name that does not resolve.

    Checked before gathering, with a short timeout: otherwise aioice waits on
    the resolver for as long as it takes, and the call just has no relay path.
    """
    server = first_turn_server(servers)
    if server is None:
        return None
    try:
        ipaddress.ip_address(server.host)
    except ValueError:
        pass
    else:
        return None
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.getaddrinfo(server.host, server.port), timeout_s)
    except TimeoutError:
        return (
            f"TURN server {server.url}: {server.host} does not resolve "
            f"(no answer in {timeout_s:g} s)"
        )
    except OSError as exc:
        return f"TURN server {server.url}: {server.host} does not resolve ({exc.strerror or exc})"
    return None


def explain_failure(servers: Sequence[RTCIceServer]) -> str:
    """The likely cause of an ICE failure, for the one-line message."""
    has_turn = any(
        str(url).startswith("turn")
        for s in servers
        for url in ([s.urls] if isinstance(s.urls, str) else s.urls)
    )
    if not has_turn:
        return (
            "no TURN server is configured (ice.servers or the relay's turn.urls); "
            "behind symmetric NAT or a firewall a direct path cannot exist"
        )
    return (
        "the TURN server is unreachable or refused the credentials, or its relay ports are blocked"
    )
