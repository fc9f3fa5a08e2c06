"""The NAT proof: real aiortc peers behind symmetric NAT connect through coturn, and only so.

Each test builds a topology (tests/nat.py: two hosts behind their own router
namespaces, a public namespace without routes to the private LANs), starts
coturn in the public namespace with the command line of ``make turn``
(``python -m peers.turnserver``, default configuration: private and loopback
peers refused; the public test segment, which lives in 198.18.0.0/15 like every
test address, is allowed), and places a call with credentials minted by the
relay. Every case asserts on the selected candidate pair.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
import pytest_asyncio

from tests import nat
from tests.nat import World, stop, world
from tests.support import TIMEOUT, within

pytestmark = [*nat.skip_without_nat_or_coturn()]


async def place(
    w: World,
    kind: str | None,
    policy: Literal["all", "relay"] = "all",
    **options: Any,
) -> nat.CallResult:
    return await within(
        nat.call(
            w.topology,
            w.servers(kind, **options),
            policy=policy,
            ca_file=w.tls.ca,
            wait=TIMEOUT * 2,
        ),
        4,
    )


@pytest_asyncio.fixture
async def symmetric(tmp_path: Path) -> AsyncIterator[World]:
    async with world("symmetric", tmp_path) as w:
        yield w


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [None, "stun"], ids=["no-servers", "stun-only"])
async def test_symmetric_nat_without_turn_fails(symmetric: World, kind: str | None) -> None:
    """Behind symmetric NAT, no servers and STUN alone both fail, with a message."""
    result = await place(symmetric, kind)
    assert not result.connected
    assert result.paths == (None, None)
    assert result.error is not None and "no media both ways" in result.error


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
@pytest.mark.parametrize("policy", ["all", "relay"])
async def test_symmetric_nat_with_turn_connects_over_relay(
    symmetric: World, transport: str, policy: Literal["all", "relay"]
) -> None:
    """TURN over UDP, TCP and TLS connects behind symmetric NAT; the pair is relayed.

    coturn runs as ``make turn`` configures it (private peers refused) with no
    route to the hosts' private addresses, and the default policy still works.
    """
    result = await place(symmetric, transport, policy)
    assert result.connected, result.error
    for path in result.paths:
        assert path is not None
        assert (path.local_type, path.remote_type, path.relay) == ("relay", "relay", transport)
    assert result.lost == ([], [])
    for side in (0, 1):
        assert {"video", "audio"} <= set(result.first[side])


@pytest.mark.asyncio
async def test_port_preserving_nat_with_stun_connects_over_srflx(tmp_path: Path) -> None:
    """Control: behind port-preserving NAT, STUN alone connects over srflx (no relay)."""
    async with world("port-preserving", tmp_path) as w:
        result = await place(w, "stun")
    assert result.connected, result.error
    for path in result.paths:
        assert path is not None
        assert path.type != "relay"
        assert path.remote_type in ("srflx", "prflx")


@pytest.mark.asyncio
async def test_relay_policy_on_a_flat_network(tmp_path: Path) -> None:
    """TURN-only policy relays even where a direct path exists (and all uses it)."""
    async with world("none", tmp_path) as w:
        relayed = await place(w, "udp", "relay")
        direct = await place(w, "udp", "all")
    assert relayed.connected, relayed.error
    for path in relayed.paths:
        assert path is not None and (path.local_type, path.remote_type) == ("relay", "relay")
    assert direct.connected, direct.error
    for path in direct.paths:
        assert path is not None and path.type == "host"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "options", "cause"),
    [
        pytest.param("expired", {"age": 700.0}, "the credentials expired", id="expired"),
        pytest.param(
            "wrong-secret", {"secret": "wrong"}, "refused the credentials (401", id="wrong-secret"
        ),
    ],
)
async def test_refused_credentials_fail_at_once(
    symmetric: World, case: str, options: dict[str, Any], cause: str
) -> None:
    """Expired or wrongly signed credentials end the call at gathering, naming URL and cause."""
    result = await place(symmetric, "udp", **options)
    assert not result.connected
    assert result.error is not None
    assert result.error.startswith(f"TURN server {symmetric.url('udp')}: ")
    assert cause in result.error  # told at gathering, not after ICE gave up


@pytest.mark.asyncio
async def test_coturn_down_fails_at_once(symmetric: World) -> None:
    """With coturn stopped, a TURN-over-TCP call ends at gathering, saying so."""
    await stop(symmetric.coturn)
    result = await place(symmetric, "tcp")
    assert not result.connected
    assert result.error is not None
    assert result.error == (
        f"TURN server {symmetric.url('tcp')}: "
        "the connection was refused (is coturn running on that port?)"
    )
