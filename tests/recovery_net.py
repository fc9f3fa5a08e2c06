"""A network where a call can lose its path: the tests and the benchmark of issue 12.

Three namespaces: a hub (a router; the relay listens on its 198.18.0.1), the
patient's and the practitioner's hosts, each on its own veth to the hub with
its default route through it. Every page opens the relay at the same
http://198.18.0.1:PORT whatever its host's address, so a network change keeps
the page's origin:

- ``change(side)``: a second veth with a new 198.18.x address, the default route
  moved to it, the old link deleted (the "Wi-Fi gone, mobile data up" of issue 12);
- ``outage(side)``: every packet to and from that host dropped at the hub
  (iptables), addresses unchanged, until ``restore(side)``.

The relay listens beyond loopback, so it runs with ``auth.open`` (the test
network has nothing else on it). Chromium needs the page's origin declared
secure (camera) and its real host addresses in candidates (no mDNS between
namespaces): ``chromium_flags(url)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from peers.netns import Netns, Network

RELAY_ADDRESS = "198.18.0.1"
SIDES = ("patient", "practitioner")


def chromium_flags(http_url: str) -> tuple[str, ...]:
    return (
        f"--unsafely-treat-insecure-origin-as-secure={http_url}",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    )


@dataclass
class Host:
    ns: Netns
    hub_dev: str  # the hub's end of the host's current link
    address: str


@dataclass
class RecoveryNet:
    network: Network
    hub: Netns
    hosts: dict[str, Host] = field(default_factory=dict)
    subnets: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    async def build(cls, network: Network) -> RecoveryNet:
        hub = await network.namespace("hub")
        await network.run(hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        await network.run(hub, "ip", "addr", "add", f"{RELAY_ADDRESS}/32", "dev", "lo")
        net = cls(network, hub)
        for side in SIDES:
            ns = await network.namespace(side[:5])
            net.hosts[side] = Host(ns, "", "")
            await net.attach(side)
        return net

    async def attach(self, side: str) -> Host:
        """A new link from the hub to ``side`` with a new address; its default route on it."""
        host = self.hosts[side]
        n = next(self.subnets)
        address = f"198.18.{n}.2"
        _, hub_dev = await self.network.link(host.ns, f"{address}/24", self.hub, f"198.18.{n}.1/24")
        await self.network.run(host.ns, "ip", "route", "replace", "default", "via", f"198.18.{n}.1")
        old = host.hub_dev
        host.hub_dev, host.address = hub_dev, address
        if old:  # the old link goes (both ends of a veth go together)
            await self.network.run(self.hub, "ip", "link", "del", old)
        return host

    async def change(self, side: str) -> str:
        """``side``'s network changes: new interface and address, the old one gone."""
        return (await self.attach(side)).address

    async def outage(self, side: str, on: bool = True) -> None:
        """Drop (on) or pass again (off) every packet to and from ``side`` at the hub."""
        dev = self.hosts[side].hub_dev
        action = "-I" if on else "-D"
        for rule in (
            ("FORWARD", "-i", dev),
            ("FORWARD", "-o", dev),
            ("INPUT", "-i", dev),
            ("OUTPUT", "-o", dev),
        ):
            await self.network.run(
                self.hub, "iptables", "-w", action, rule[0], rule[1], rule[2], "-j", "DROP"
            )

    async def restore(self, side: str) -> None:
        await self.outage(side, on=False)
