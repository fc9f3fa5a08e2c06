"""Each patch of peers/aiortc_patches.py still fires on the pinned aioice and aiortc.

No root needed: coturn listens on 127.0.0.1 and may relay to loopback peers
(``allow_loopback_peers``, a test-only setting), and both Calls gather with the
TURN-only policy (no host candidates: nothing touches the machine's own
interfaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioice.stun
import pytest
import pytest_asyncio
from aioice import stun
from aioice.turn import create_turn_endpoint

import relay
from peers import aiortc_patches, ice
from peers.aiortc_patches import UnsupportedVersion, check_versions
from peers.call import Call, CallOptions
from peers.config import PeerSettings
from peers.errors import CallFailed, IceFailed
from peers.turnserver import TurnServer, TurnServerSettings
from tests.inprocess import LocalPair
from tests.support import within

SECRET = "patch-test-secret"
ROOT = Path(__file__).resolve().parent.parent

needs_coturn = pytest.mark.skipif(
    shutil.which("turnserver") is None,
    reason="coturn's turnserver is missing: run `make turn-deps` (Debian's coturn)",
)


@pytest_asyncio.fixture
async def coturn() -> AsyncIterator[TurnServer]:
    settings = TurnServerSettings.from_mapping(
        {"turn": {"secret": SECRET, "port": 0, "tls_port": 0}}, env={}
    )
    async with TurnServer(dataclasses.replace(settings, allow_loopback_peers=True)) as server:
        yield server


def options(server: TurnServer, transport: str = "udp", **changes: Any) -> CallOptions:
    """TURN-only options with credentials minted as the relay mints them."""
    url = f"turn:127.0.0.1:{server.port}?transport={transport}"
    config = relay.RelayConfig.from_mapping(
        {"turn": {"secret": SECRET, "urls": [url], "ttl": 600}}, env={}
    )
    [entry] = relay.turn_credentials(config.turn, "patches", "patient", time.time())
    servers = ice.ice_servers(PeerSettings(), [entry])
    return CallOptions(servers=tuple(servers), policy="relay", **changes)


def relay_clients(call: Call) -> list[Any]:
    return [
        inner
        for transport in ice.ice_transports(call.pc)
        for _, inner in aiortc_patches.relay_protocols(aiortc_patches.ice_connection(transport))
    ]


# -- no coturn needed ---------------------------------------------------------------------------


def test_the_pinned_versions_pass_and_others_fail_in_one_line() -> None:
    """check_versions() accepts aioice 0.13.0 / aiortc 1.16.0 and names any other version."""
    check_versions()  # what is installed
    versions = {"aioice": "0.14.0", "aiortc": "1.16.0"}
    with pytest.raises(UnsupportedVersion) as caught:
        check_versions(versions.__getitem__)
    message = str(caught.value)
    assert caught.value.code == "unsupported-version"
    assert "aioice 0.14.0 (expected 0.13.0)" in message
    assert "aiortc" not in message.split("installed:")[1]
    assert len(message.splitlines()) == 1


def test_a_peer_with_another_aioice_stops_at_start_in_one_line(tmp_path: Path) -> None:
    """python -m peers.patient with aioice reported as 0.14.0: exit 2, one line naming it."""
    script = (
        "import importlib.metadata as m, sys\n"
        "real = m.version\n"
        "m.version = lambda name: '0.14.0' if name == 'aioice' else real(name)\n"
        "from peers.cli import main\n"
        "sys.exit(main('patient', ['--config', sys.argv[1]]))\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    done = subprocess.run(
        [sys.executable, "-c", script, str(config)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "patient: peers/aiortc_patches.py is proven against the pinned versions only; "
        "installed: aioice 0.14.0 (expected 0.13.0) (run `make setup`)"
    ]


class _Silent:
    """A STUN transaction's sender that counts what it sends and never hears back."""

    def __init__(self) -> None:
        self.sent = 0

    def send_stun(self, message: stun.Message, addr: tuple[str, int]) -> None:
        self.sent += 1


@pytest.mark.asyncio
@pytest.mark.parametrize("retries", [1, 3])
async def test_aioice_reads_the_retry_count(monkeypatch: pytest.MonkeyPatch, retries: int) -> None:
    """set_check_retries(n): an unanswered STUN request is sent 1 + n times, then gives up."""
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", aioice.stun.RETRY_MAX)  # restored after
    monkeypatch.setattr(aioice.stun, "RETRY_RTO", 0.01)  # fast retransmissions
    aiortc_patches.set_check_retries(retries)
    assert aiortc_patches.check_retries() == retries
    sender = _Silent()
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    transaction = stun.Transaction(request, ("127.0.0.1", 9), sender)
    with pytest.raises(stun.TransactionTimeout):
        await within(transaction.run())
    assert sender.sent == 1 + retries


# -- through a real coturn on loopback -----------------------------------------------------------


@needs_coturn
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_chosen_path_is_read_from_the_nominated_pair(
    coturn: TurnServer, transport: str
) -> None:
    """Two TURN-only Calls connect; each reports relay -> relay with its transport to TURN."""
    async with contextlib.aclosing(
        LocalPair((options(coturn, transport), options(coturn, transport)))
    ) as pair:
        await within(pair.connect(), 2)
        await within(pair.flowing(), 3)
        for call in pair.calls:
            path = call.path
            assert path is not None
            assert (path.local_type, path.remote_type, path.relay) == ("relay", "relay", transport)


@needs_coturn
@pytest.mark.asyncio
@pytest.mark.parametrize("early", [True, False], ids=["early", "not-early"])
async def test_channels_are_bound_early(coturn: TurnServer, early: bool) -> None:
    """With early channels, each relayed candidate has a channel to its own relayed address
    as soon as gathering ends (aioice alone never binds one there)."""
    opts = options(coturn, early_channels=early)
    async with contextlib.aclosing(LocalPair((opts, opts))) as pair:
        await within(pair.a.offer(), 2)
        clients = relay_clients(pair.a)
        assert clients
        for inner in clients:
            assert inner.relayed_address is not None
            assert (inner.relayed_address in inner.peer_to_channel) is early


@needs_coturn
@pytest.mark.asyncio
async def test_a_lost_allocation_is_reported(coturn: TurnServer) -> None:
    """coturn going away under a TURN-over-TCP call is reported once, as IceFailed."""
    failures: list[CallFailed] = []
    async with contextlib.aclosing(
        LocalPair((options(coturn, "tcp"), options(coturn, "tcp")))
    ) as pair:
        pair.a.on_failed = failures.append
        await within(pair.connect(), 2)
        await within(pair.flowing(), 3)
        assert pair.a.lost == []
        await coturn.stop()
        while not failures:
            await within(pair.a.receiver.frames(pair.a.receiver.received.audio_frames + 1), 1)
        [failure] = failures
        assert isinstance(failure, IceFailed)
        assert failure.code == "ice-failed"
        assert str(failure).startswith("TURN: the TURN allocation ")
        assert len(pair.a.lost) == 1


def test_loopback_peers_are_a_test_only_setting() -> None:
    """allow_loopback_peers is off by default and no YAML key turns it on."""
    settings = TurnServerSettings.from_mapping({"turn": {"secret": SECRET}}, env={})
    assert not settings.allow_loopback_peers
    assert "allow-loopback-peers" not in settings.coturn_config(Path("/run"), 3478, 5349)
    loopback = dataclasses.replace(settings, allow_loopback_peers=True)
    text = loopback.coturn_config(Path("/run"), 3478, 5349)
    assert "allow-loopback-peers" in text
    assert "denied-peer-ip=127.0.0.0-127.255.255.255" not in text
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in text  # private peers still refused


@needs_coturn
@pytest.mark.asyncio
async def test_coturns_403_is_named_with_the_address(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """coturn's 403 for a denied peer is logged once: refuses to relay to ADDRESS, add it."""
    monkeypatch.setattr(aiortc_patches, "_named", set())  # nothing named by earlier tests
    settings = TurnServerSettings.from_mapping(
        {"turn": {"secret": SECRET, "port": 0, "tls_port": 0}}, env={}
    )
    async with TurnServer(settings) as server:  # loopback peers denied, as by default
        [entry] = options(server).servers
        transport, _ = await within(
            create_turn_endpoint(
                asyncio.DatagramProtocol,
                server_addr=("127.0.0.1", server.port),
                username=entry.username,
                password=entry.credential,
            )
        )
        try:
            inner = aiortc_patches.turn_transport_client(transport)
            for _ in range(2):
                with pytest.raises(stun.TransactionFailed):
                    await within(aiortc_patches.bind_channel(inner, ("127.0.0.7", 40000)))
        finally:
            transport.close()
    named = [r.getMessage() for r in caplog.records if "refuses to relay" in r.getMessage()]
    assert named == [
        "coturn refuses to relay to 127.0.0.7 (403 Forbidden IP): add it to turn.allowed_peers"
    ]
