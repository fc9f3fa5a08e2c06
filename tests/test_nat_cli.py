"""The NAT proof with the real command lines: relay.py, ``make turn``'s coturn and the peers.

The same topologies as tests/test_turn_nat.py (tests/nat.py: two hosts, each
behind its own router namespace, and a "public" namespace), but every piece
is a real process: the relay in the public namespace hands out short-lived
TURN credentials (``turn.secret``, ``turn.urls``), coturn runs as ``make turn``
starts it (private and loopback peers refused), and ``python -m
peers.patient`` / ``peers.practitioner`` run on the two hosts. Every case
asserts on the selected candidate pair that the peers report in
``--stats-json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

import relay
from tests import nat
from tests.nat import SECRET, start_coturn, stop
from tests.processes import Process, peer_argv, spawn, start_relay

pytestmark = [*nat.skip_without_nat_or_coturn(), pytest.mark.asyncio]

ICE_TIMEOUT = "5"
MEDIA = {"video": {"width": 320, "height": 240, "fps": 15}}


@dataclass
class Scene:
    topology: nat.Topology
    tls: nat.TlsFiles
    relay_url: str
    directory: Path

    def url(self, kind: str) -> str:
        address = self.topology.public_address
        return {
            "udp": f"turn:{address}:3478?transport=udp",
            "tcp": f"turn:{address}:3478?transport=tcp",
            "tls": f"turns:{address}:5349?transport=tcp",
            "stun": f"stun:{address}:3478",
        }[kind]


@asynccontextmanager
async def scene(kind: nat.Nat, directory: Path, turn_urls: list[str]) -> AsyncIterator[Scene]:
    """The topology, coturn and a relay minting credentials for ``turn_urls``."""
    async with nat.topology(kind) as topology:
        tls = nat.make_tls_files(directory, topology.public_address)
        coturn = await start_coturn(topology, tls, directory)
        config = directory / "relay.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "auth": {"open": True},  # a test network: no tokens
                    "turn": {"secret": SECRET, "urls": turn_urls, "ttl": 600},
                }
            )
        )
        server, url = await start_relay(config, topology.public, host=topology.public_address)
        try:
            yield Scene(topology, tls, url, directory)
        finally:
            await server.stop()
            await stop(coturn)


async def call(
    s: Scene, *args: str, seconds: float = 4
) -> dict[str, tuple[int, dict[str, Any], Process]]:
    """Both peers on their hosts; each role's exit status, summary and process."""
    config = s.directory / "peer.yaml"
    config.write_text(yaml.safe_dump({"media": MEDIA, "turn": {"ca_file": str(s.tls.ca)}}))
    processes = {}
    for role, host in (("practitioner", s.topology.hosts[1]), ("patient", s.topology.hosts[0])):
        argv = peer_argv(
            role, config, "--relay", s.relay_url, "--session", "nat", "--video", "pattern",
            "--audio", "tone", "--duration", str(seconds), "--ice-timeout", ICE_TIMEOUT,
            "--stats-json", str(s.directory / f"{role}.json"), *args,
        )  # fmt: skip
        processes[role] = await spawn(role, argv, host.command())
    results = {}
    for role, process in processes.items():
        status = await process.wait(seconds + 30)
        path = s.directory / f"{role}.json"
        assert path.exists(), f"{role} exited {status} without a summary:\n{process.log()}"
        summary = json.loads(path.read_text())
        results[role] = (status, summary, process)
    return results


def assert_path(results: dict[str, tuple[int, dict[str, Any], Process]], **expected: Any) -> None:
    for role, (status, summary, process) in results.items():
        assert status == 0, process.log()
        ice = summary["ice"]
        for key, value in expected.items():
            if isinstance(value, tuple):
                assert ice[key] in value, (role, ice)
            else:
                assert ice[key] == value, (role, ice)
        assert summary["video"]["frames"] > 20, (role, summary["video"])
        assert summary["audio"]["frames"] > 50, (role, summary["audio"])


def assert_failed(results: dict[str, tuple[int, dict[str, Any], Process]], message: str) -> None:
    for role, (status, summary, process) in results.items():
        assert status == 1, process.log()
        assert summary["exit_reason"] == "ice-failed"
        assert summary["ice"] is None
        assert any(message in line for line in process.lines), (role, process.log())


@pytest.mark.parametrize("servers", ["none", "stun"])
async def test_symmetric_nat_without_turn_fails_within_the_timeout(
    tmp_path: Path, servers: str
) -> None:
    async with scene("symmetric", tmp_path, []) as s:
        args = ("--ice-server", s.url("stun")) if servers == "stun" else ()
        started = time.monotonic()
        # Longer than the ICE timeout: each peer ends by itself, failing, not by --duration.
        results = await call(s, *args, seconds=3 * float(ICE_TIMEOUT))
    assert_failed(results, "no TURN server is configured")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_turn_over_each_transport_behind_symmetric_nat(
    tmp_path: Path, transport: str
) -> None:
    """Credentials minted by the relay (joined.ice_servers); coturn as `make turn` writes it."""
    address = nat.PUBLIC_ADDRESS
    urls = {
        "udp": f"turn:{address}:3478?transport=udp",
        "tcp": f"turn:{address}:3478?transport=tcp",
        "tls": f"turns:{address}:5349?transport=tcp",
    }
    async with scene("symmetric", tmp_path, [urls[transport]]) as s:
        results = await call(s)
    assert_path(results, local_type="relay", remote_type="relay", relay_protocol=transport)


async def test_port_preserving_nat_with_stun_connects_over_srflx(tmp_path: Path) -> None:
    async with scene("port-preserving", tmp_path, []) as s:
        results = await call(s, "--ice-server", s.url("stun"))
    assert_path(results, relay_protocol=None, remote_type=("srflx", "prflx"))


async def test_relay_policy_relays_on_a_flat_network(tmp_path: Path) -> None:
    async with scene("none", tmp_path, [f"turn:{nat.PUBLIC_ADDRESS}:3478?transport=udp"]) as s:
        results = await call(s, "--ice-policy", "relay")
    assert_path(results, local_type="relay", remote_type="relay")


async def test_expired_credentials_fail_at_once_naming_the_url(tmp_path: Path) -> None:
    async with scene("symmetric", tmp_path, []) as s:
        config = relay.RelayConfig.from_mapping(
            {"turn": {"secret": SECRET, "urls": [s.url("udp")], "ttl": 60}}, env={}
        )
        (minted,) = relay.turn_credentials(config.turn, "nat", "patient", time.time() - 120)
        user, password = (quote(minted[key], safe="") for key in ("username", "credential"))
        flag = f"turn:{user}:{password}@{nat.PUBLIC_ADDRESS}:3478"
        started = time.monotonic()
        results = await call(s, "--ice-server", flag)
    # The patient gathers first (it offers): it stops at once, naming the URL and the cause.
    status, summary, process = results["patient"]
    assert status == 1, process.log()
    assert summary["exit_reason"] == "ice-failed"
    assert any(
        f"TURN server turn:{nat.PUBLIC_ADDRESS}:3478" in line and "expired" in line
        for line in process.lines
    ), process.log()
    assert time.monotonic() - started < 20  # told at gathering, not after ICE gave up


async def test_credentials_signed_with_a_wrong_secret_are_refused_at_once(tmp_path: Path) -> None:
    """The relay's turn.secret differs from coturn's: the peer says so at gathering."""
    async with scene("symmetric", tmp_path, []) as s:
        config = relay.RelayConfig.from_mapping(
            {"turn": {"secret": "not-the-secret", "urls": [s.url("tcp")], "ttl": 600}}, env={}
        )
        (minted,) = relay.turn_credentials(config.turn, "nat", "patient", time.time())
        user, password = (quote(minted[key], safe="") for key in ("username", "credential"))
        flag = f"turn:{user}:{password}@{nat.PUBLIC_ADDRESS}:3478?transport=tcp"
        results = await call(s, "--ice-server", flag)
    status, _, process = results["patient"]
    assert status == 1, process.log()
    assert any(
        f"TURN server turn:{nat.PUBLIC_ADDRESS}:3478?transport=tcp" in line and "401" in line
        for line in process.lines
    ), process.log()


async def test_a_turn_url_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    """No resolver is reachable from the hosts: the lookup fails there, and nothing leaves."""
    async with scene("symmetric", tmp_path, []) as s:
        results = await call(s, "--ice-server", "turn:u:p@turn.epedicare.invalid:3478")
    status, _, process = results["patient"]
    assert status == 1, process.log()
    assert any("turn.epedicare.invalid" in line for line in process.lines), process.log()
