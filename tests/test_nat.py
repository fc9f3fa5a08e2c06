"""The NAT topologies of tests/nat.py behave as the TURN proof needs (root only)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from peers.netns import NetworkError, netns_missing
from tests import nat
from tests.support import within

REFLECTOR_PORTS = ("4001", "4002")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        (reason := netns_missing() or nat.iptables_missing()) is not None,
        reason=reason or "",
    ),
]


async def mapped_ports(topology: nat.Topology, host: int) -> tuple[int, list[str]]:
    """How two public ports saw one UDP socket of ``host``: (local port, ["ip:port", ...])."""
    reflector = await asyncio.create_subprocess_exec(
        *topology.public.command(
            sys.executable, "-m", "tests.nat", "reflect", topology.public_address, *REFLECTOR_PORTS
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await nat.wait_ready(reflector, "ready", 5)
        probe = await asyncio.create_subprocess_exec(
            *topology.hosts[host].command(
                sys.executable, "-m", "tests.nat", "mapped", topology.public_address,
                *REFLECTOR_PORTS,
            ),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await within(probe.communicate())
    finally:
        reflector.kill()
        await reflector.wait()
    local, *seen = out.decode().split("\n")[:3]
    return int(local.split()[1]), seen


@pytest.mark.asyncio
async def test_symmetric_nat_maps_each_destination_to_its_own_port() -> None:
    """Behind symmetric NAT one socket appears with the router's address and a new port per
    destination, and the public side has no route to the private LANs."""
    async with nat.topology("symmetric") as topology:
        _, seen = await mapped_ports(topology, 0)
        ips = {s.split(":")[0] for s in seen}
        ports = {s.split(":")[1] for s in seen}
        assert ips == {topology.router_addresses[0]}, seen
        assert len(ports) == 2, seen
        with pytest.raises(NetworkError, match="unreachable"):
            await topology.net.run(
                topology.public, "ip", "route", "get", topology.host_addresses[0]
            )


@pytest.mark.asyncio
async def test_port_preserving_nat_keeps_the_port() -> None:
    """Behind port-preserving NAT one socket keeps its port for every destination."""
    async with nat.topology("port-preserving") as topology:
        local, seen = await mapped_ports(topology, 1)
        assert seen == [f"{topology.router_addresses[1]}:{local}"] * 2


@pytest.mark.asyncio
async def test_flat_network_has_no_translation() -> None:
    """Without NAT the public side sees the host's own address."""
    async with nat.topology("none") as topology:
        local, seen = await mapped_ports(topology, 0)
        assert seen == [f"{topology.host_addresses[0]}:{local}"] * 2
