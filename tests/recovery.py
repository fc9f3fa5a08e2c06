"""The recovery scenarios' network: a patient on two links, a practitioner, the relay between.

Shared by tests/test_recovery.py and ``make bench-recovery`` (any pairing: the
peers are started by the caller, inside ``net.patient`` and ``net.practitioner``;
the relay listens on ``RELAY_ADDRESS`` in the hub)::

    async with recovery_network() as net:
        relay = RelayProcess(config, net.hub.name, host=RELAY_ADDRESS)   # auth.open: true
        ...start the peers with net.patient.command(...), net.practitioner.command(...)
        changed_at = await net.change("patient")      # new interface and address, old gone
        async with net.outage("patient"):             # nothing passes; addresses unchanged
            await asyncio.sleep(3)
        back = await media_back(process, after=changed_at)  # wall-clock time of the line

::

    patient ──v0── hub ──v1── practitioner         198.18.1.2 / .1    198.18.2.1 / .2
            ╰─vN── (after change("patient"))       198.18.{10+n}.2 / .1
    the relay: 198.18.0.1 on the hub's loopback, reached by both through their default route

A network change adds a veth with a new 198.18.x address, moves the default
route to it and deletes the old link (as a phone going from Wi-Fi to mobile
data); an outage drops everything to and from one side in the hub (iptables
DROP rules, removed at the end of the block): the kernel has no sch_netem.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from peers.netns import Netns, Network, command_missing
from tests.processes import Process

__all__ = [
    "RELAY_ADDRESS",
    "Outage",
    "RecoveryNetwork",
    "log_time",
    "media_back",
    "recovery_network",
]

RELAY_ADDRESS = "198.18.0.1"
MEDIA_BACK = re.compile(r"media back after (\d+) ms \(([a-z-]+)")


@dataclass
class RecoveryNetwork:
    """The hub (relay, router), the patient and the practitioner; their current links."""

    net: Network
    hub: Netns
    patient: Netns
    practitioner: Netns
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # side: (its dev, hub's dev)
    addresses: dict[str, str] = field(default_factory=dict)  # side: its current address
    restored_at = 0.0  # time.time() when the last outage() ended
    _subnets: itertools.count[int] = field(default_factory=lambda: itertools.count(10))

    def side(self, name: str) -> Netns:
        return self.patient if name == "patient" else self.practitioner

    async def attach(self, name: str, subnet: int) -> None:
        """A new link from ``name`` to the hub on 198.18.SUBNET.0/24; the default route on it."""
        ns = self.side(name)
        address = f"198.18.{subnet}.2"
        devs = await self.net.link(ns, f"{address}/24", self.hub, f"198.18.{subnet}.1/24")
        await self.net.run(ns, "ip", "route", "replace", "default", "via", f"198.18.{subnet}.1")
        self.links[name], self.addresses[name] = devs, address

    async def change(self, name: str) -> float:
        """``name`` moves to a new interface and address, the old link gone; time.time() then."""
        old_dev = self.links[name][0]
        await self.attach(name, next(self._subnets))
        await self.net.run(self.side(name), "ip", "link", "del", old_dev)
        return time.time()

    @contextlib.asynccontextmanager
    async def outage(self, name: str) -> AsyncIterator[Outage]:
        """Nothing passes to or from ``name`` during the block (its addresses stay).

        ``Outage.relay_back()`` lets the relay's traffic (to the hub itself) through
        before the block ends, the media to the other side still dropped.
        """
        dev = self.links[name][1]
        cut = Outage(self, [["FORWARD", "-i", dev], ["FORWARD", "-o", dev]])
        cut.relay_rules = [["INPUT", "-i", dev], ["OUTPUT", "-o", dev]]
        for rule in cut.media_rules + cut.relay_rules:
            await self.net.run(self.hub, "iptables", "-w", "-I", *rule, "-j", "DROP")
        try:
            yield cut
        finally:
            self.restored_at = time.time()  # the first rule removed lets packets through
            for rule in cut.media_rules + cut.relay_rules:
                await self.net.run(self.hub, "iptables", "-w", "-D", *rule, "-j", "DROP")


@dataclass
class Outage:
    """The DROP rules of one ``RecoveryNetwork.outage()``: the media's and the relay's."""

    net: RecoveryNetwork
    media_rules: list[list[str]]
    relay_rules: list[list[str]] = field(default_factory=list)
    relay_back_at = 0.0  # time.time() when relay_back() removed the first of its rules

    async def relay_back(self) -> None:
        """The side reaches the relay again; the media between the sides stays dropped."""
        rules, self.relay_rules = self.relay_rules, []
        self.relay_back_at = time.time()
        for rule in rules:
            await self.net.net.run(self.net.hub, "iptables", "-w", "-D", *rule, "-j", "DROP")


@contextlib.asynccontextmanager
async def recovery_network(prefix: str = "epc-rec") -> AsyncIterator[RecoveryNetwork]:
    """The two sides and the hub, namespaces deleted at the end (NetworkError without root)."""
    async with Network(prefix) as net:
        if reason := command_missing("iptables", "iptables"):
            from peers.errors import NetworkError

            raise NetworkError(reason)
        hub = await net.namespace("hub")
        await net.run(hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        await net.run(hub, "ip", "addr", "add", f"{RELAY_ADDRESS}/32", "dev", "lo")
        rec = RecoveryNetwork(net, hub, await net.namespace("pat"), await net.namespace("pra"))
        await rec.attach("patient", 1)
        await rec.attach("practitioner", 2)
        yield rec


def log_time(line: str) -> float:
    """The time.time() of a peer's log line (logging's asctime, local time, milliseconds)."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


async def media_back(
    process: Process, start: int = 0, wait: float = 20.0
) -> tuple[float, int, str]:
    """The peer's next ``media back after N ms (METHOD`` line from line ``start`` on.

    Returns its time.time(), N (from the last byte received) and the method.
    """
    match = await process.expect(MEDIA_BACK, wait, start=start)
    line = next(line for line in process.lines[start:] if match.group(0) in line)
    return log_time(line), int(match.group(1)), match.group(2)
