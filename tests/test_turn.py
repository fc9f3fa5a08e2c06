"""The local coturn (peers/turnserver.py) and TURN allocations by aioice, on 127.0.0.1.

These need coturn (``make turn-deps``) but no root: coturn listens on loopback
and aioice gathers with the relay policy only (no host candidates, so nothing
touches the machine's own interfaces).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aioice import Candidate, Connection, TransportPolicy, stun
from aioice.turn import create_turn_endpoint
from aiortc import RTCIceServer

import relay
from peers import aiortc_patches
from peers.turnclient import TurnServerUrl, diagnose, first_turn_server
from peers.turnserver import (
    TurnServer,
    TurnServerError,
    TurnServerSettings,
    TurnStartError,
    stun_binding,
)
from tests.nat import TlsFiles, make_tls_files
from tests.processes import peer_argv, relay_process, spawn
from tests.support import TIMEOUT, within, write_yaml

SECRET = "test-turn-secret"

pytestmark = pytest.mark.skipif(
    shutil.which("turnserver") is None,
    reason="coturn's turnserver is missing: run `make turn-deps` (Debian's coturn)",
)


def settings(**turn: Any) -> TurnServerSettings:
    return TurnServerSettings.from_mapping(
        {"turn": {"secret": SECRET, "port": 0, "tls_port": 0, **turn}}, env={}
    )


def minted(server: TurnServer, now: float | None = None, secret: str = SECRET) -> dict[str, Any]:
    """The ``ice_servers`` entry that the relay hands a joined patient."""
    config = relay.RelayConfig.from_mapping(
        {"turn": {"secret": secret, "urls": server.urls(), "ttl": 600}}, env={}
    )
    now = time.time() if now is None else now
    [entry] = relay.turn_credentials(config.turn, "s1", "patient", now)
    return entry


@pytest_asyncio.fixture
async def coturn() -> AsyncIterator[TurnServer]:
    async with TurnServer(settings()) as server:
        yield server


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"), "127.0.0.1")


async def relay_candidates(
    host: str, port: int, username: str, password: str, *, transport: str = "udp", tls: bool = False
) -> list[Candidate]:
    """What aioice gathers with the relay policy (aiortc's code path, minus aiortc)."""
    connection = Connection(
        ice_controlling=True,
        components=1,
        turn_server=(host, port),
        turn_username=username,
        turn_password=password,
        turn_ssl=tls,
        turn_transport=transport,
        transport_policy=TransportPolicy.RELAY,
    )
    try:
        await within(connection.gather_candidates(), 3)
        return [c for c in connection.local_candidates if c.type == "relay"]
    finally:
        await within(connection.close())


async def allocate(host: str, port: int, username: str, password: str) -> tuple[str, int]:
    """One TURN allocation over UDP; raises stun.TransactionFailed when refused."""
    transport, _ = await within(
        create_turn_endpoint(_Sink, server_addr=(host, port), username=username, password=password)
    )
    try:
        address: tuple[str, int] = transport.get_extra_info("sockname")
        return address
    finally:
        transport.close()


class _Sink(asyncio.DatagramProtocol):
    """Receives nothing that matters: only the allocation is tested."""


# -- configuration (no coturn started) ------------------------------------------------------


def test_config_denies_private_and_loopback_peers() -> None:
    """By default coturn refuses private, loopback and multicast peers, and never runs open."""
    text = settings().coturn_config(Path("/run"), 3478, 5349)
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in text
    assert "denied-peer-ip=127.0.0.0-127.255.255.255" in text
    assert "denied-peer-ip=192.168.0.0-192.168.255.255" in text
    assert "no-multicast-peers" in text
    assert "use-auth-secret" in text
    assert "allowed-peer-ip" not in text
    assert "no-tls" in text  # no certificate, no TLS listener


def test_config_lan_profile_allows_private_but_not_loopback() -> None:
    """The LAN-only development profile allows private peers and still refuses loopback."""
    text = settings(allow_private_peers=True).coturn_config(Path("/run"), 3478, 5349)
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" not in text
    assert "denied-peer-ip=127.0.0.0-127.255.255.255" in text


def test_config_static_user_and_tls(tls_files: TlsFiles) -> None:
    """A static user uses the long-term mechanism; a certificate opens the TLS port."""
    text = TurnServerSettings.from_mapping(
        {"turn": {"username": "doc", "credential": "pw", "cert": str(tls_files.cert),
                  "key": str(tls_files.key), "allowed_peers": ["198.19.0.0/16"]}},
        env={},
    ).coturn_config(Path("/run"), 3478, 5349)  # fmt: skip
    assert "lt-cred-mech" in text and "user=doc:pw" in text
    assert "tls-listening-port=5349" in text
    assert "allowed-peer-ip=198.19.0.0-198.19.255.255" in text


@pytest.mark.parametrize(
    ("turn", "key"),
    [
        pytest.param({"secret": None}, "turn.secret", id="no-credentials"),
        pytest.param({"port": 70000}, "turn.port", id="bad-port"),
        pytest.param({"min_port": 60000, "max_port": 50000}, "turn.min_port", id="port-range"),
        pytest.param({"cert": "c.pem"}, "turn.key", id="cert-without-key"),
        pytest.param({"username": "doc"}, "turn.credential", id="user-without-credential"),
        pytest.param({"listen": "turn.example.org"}, "turn.listen", id="listen-not-an-ip"),
        pytest.param({"allowed_peers": ["nope"]}, "turn.allowed_peers[0]", id="bad-network"),
        pytest.param({"allow_private_peers": "yes"}, "turn.allow_private_peers", id="bad-flag"),
    ],
)
def test_config_errors_name_the_key(turn: dict[str, Any], key: str) -> None:
    """A bad turn: value is refused with its dotted key."""
    with pytest.raises(relay.ConfigError) as info:
        settings(**turn)
    assert info.value.key == key


def test_counting_allocations_needs_the_verbose_log() -> None:
    """coturn logs its allocations only with turn.verbose: counting them without it is refused."""
    with pytest.raises(TurnServerError, match=r"reads coturn's verbose log: set turn\.verbose"):
        TurnServer(settings()).allocations()


def test_secret_from_environment() -> None:
    """EPEDICARE_TURN_SECRET overrides turn.secret, as for the relay."""
    loaded = TurnServerSettings.from_mapping({}, env={"EPEDICARE_TURN_SECRET": "from-env"})
    assert loaded.secret == "from-env"


def test_relay_accepts_the_coturn_keys() -> None:
    """The shipped config.yaml (coturn keys included) loads in the relay."""
    config = relay.RelayConfig.load(Path(__file__).parent.parent / "config.yaml", env={})
    assert config.turn.urls == ()


# -- a running coturn -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_coturn_answers_stun(coturn: TurnServer) -> None:
    """coturn answers a STUN Binding request over UDP and TCP with our mapped address."""
    for transport in ("udp", "tcp"):
        mapped = await stun_binding(coturn.host, coturn.port, transport, wait=TIMEOUT)
        assert mapped is not None and mapped[0] == "127.0.0.1", transport


@pytest.mark.asyncio
async def test_busy_port_is_refused(coturn: TurnServer) -> None:
    """A second coturn on a busy port is refused (coturn's SO_REUSEPORT would share it)."""
    with pytest.raises(TurnStartError, match="not available"):
        await TurnServer(settings(port=coturn.port)).start()


@pytest.mark.asyncio
async def test_stop_ends_the_process() -> None:
    """Leaving the block stops coturn by its PID and removes its run directory."""
    async with TurnServer(settings()) as server:
        assert server.process is not None and server.run_dir is not None
        process, run_dir = server.process, server.run_dir
    assert process.returncode is not None
    assert not run_dir.exists()


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_minted_credentials_give_a_relay_candidate(
    coturn: TurnServer, transport: str
) -> None:
    """Credentials minted by the relay get a relayed candidate over UDP and TCP."""
    entry = minted(coturn)
    assert entry["username"].endswith(":s1-patient")
    candidates = await relay_candidates(
        coturn.host, coturn.port, entry["username"], entry["credential"], transport=transport
    )
    assert [c.type for c in candidates] == ["relay"]
    assert candidates[0].host == "127.0.0.1"


@pytest.mark.asyncio
async def test_static_user_gives_a_relay_candidate() -> None:
    """A static turn.username/credential works as well (lt-cred-mech)."""
    static = TurnServerSettings.from_mapping(
        {"turn": {"username": "doc", "credential": "pw", "port": 0}}, env={}
    )
    async with TurnServer(static) as server:
        candidates = await relay_candidates(server.host, server.port, "doc", "pw")
        assert [c.type for c in candidates] == ["relay"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "age"),
    [
        pytest.param("expired", 700.0, id="expired"),
        pytest.param("wrong-secret", 0.0, id="wrong-secret"),
    ],
)
async def test_bad_credentials_are_refused(coturn: TurnServer, case: str, age: float) -> None:
    """Expired or wrongly signed credentials get 401 and no relay candidate at all."""
    secret = "not-the-secret" if case == "wrong-secret" else SECRET
    entry = minted(coturn, now=time.time() - age, secret=secret)
    with pytest.raises(stun.TransactionFailed) as info:
        await allocate(coturn.host, coturn.port, entry["username"], entry["credential"])
    assert info.value.response.error_code == 401
    # aioice itself says nothing: the candidate is silently missing.
    assert (
        await relay_candidates(coturn.host, coturn.port, entry["username"], entry["credential"])
        == []
    )


@pytest.mark.asyncio
async def test_tls_with_trusted_ca(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """turns: gets a relay candidate once the test CA is trusted, and none before."""
    tls = settings(cert=str(tls_files.cert), key=str(tls_files.key))
    async with TurnServer(tls) as server:
        entry = minted(server)
        assert f"turns:127.0.0.1:{server.tls_port}?transport=tcp" in server.urls()
        args = (server.host, server.tls_port, entry["username"], entry["credential"])
        untrusted = await relay_candidates(*args, transport="tcp", tls=True)
        assert untrusted == []  # aioice verifies with the default context: unknown CA
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
        trusted = await relay_candidates(*args, transport="tcp", tls=True)
        assert [c.type for c in trusted] == ["relay"]


# -- explaining a missing relay candidate (peers/turnclient.py) -----------------------------


def server_url(url: str, entry: dict[str, Any]) -> TurnServerUrl:
    found = first_turn_server([RTCIceServer(url, entry["username"], entry["credential"])])
    assert found is not None
    return found


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "cause"),
    [
        pytest.param("expired", "the credentials expired", id="expired"),
        pytest.param("wrong-secret", "refused the credentials (401", id="wrong-secret"),
        pytest.param("down-udp", "no answer", id="coturn-down-udp"),
        pytest.param("down-tcp", "connection was refused", id="coturn-down-tcp"),
    ],
)
async def test_diagnose_names_the_cause(coturn: TurnServer, case: str, cause: str) -> None:
    """Each reason for a missing relay candidate is told apart, quickly."""
    entry = minted(
        coturn,
        now=time.time() - 700 if case == "expired" else None,
        secret="not-the-secret" if case == "wrong-secret" else SECRET,
    )
    port = coturn.port
    transport = "tcp" if case == "down-tcp" else "udp"
    if case.startswith("down"):
        await coturn.stop()
    server = server_url(f"turn:127.0.0.1:{port}?transport={transport}", entry)
    assert cause in await within(diagnose(server), 2)


@pytest.mark.asyncio
async def test_diagnose_untrusted_certificate(tls_files: TlsFiles) -> None:
    """An untrusted turns: certificate is named as such, with the setting that fixes it."""
    async with TurnServer(settings(cert=str(tls_files.cert), key=str(tls_files.key))) as server:
        entry = minted(server)
        url = f"turns:127.0.0.1:{server.tls_port}?transport=tcp"
        cause = await within(diagnose(server_url(url, entry)))
        assert "not trusted" in cause and "turn.ca_file" in cause
        trusted = await within(diagnose(server_url(url, entry), ca_file=tls_files.ca))
        assert "server answers now" in trusted


def test_first_turn_server_follows_aiortc() -> None:
    """Only the first usable turn:/turns: URL counts, as in aiortc; DTLS is skipped."""
    servers = [
        RTCIceServer("stun:198.19.0.1:3478"),
        RTCIceServer(["turns:198.19.0.1:5349?transport=udp", "turn:198.19.0.1:3478"], "u", "p"),
        RTCIceServer("turns:198.19.0.1:5349", "u", "p"),
    ]
    found = first_turn_server(servers)
    assert found is not None
    assert (found.url, found.transport, found.tls, found.label) == (
        "turn:198.19.0.1:3478", "udp", False, "udp",
    )  # fmt: skip


# -- the peers check their TURN server at join ----------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("secret", "status", "said"),
    [
        pytest.param(SECRET, None, "allocation granted", id="granted"),
        pytest.param("not-" + SECRET, 1, "refused the credentials (401", id="refused"),
    ],
)
async def test_a_peer_checks_its_turn_server_as_soon_as_it_joins(
    coturn: TurnServer, tmp_path: Path, secret: str, status: int | None, said: str
) -> None:
    """Alone in its session, a peer checks its TURN server and says so (exit 1 if refused)."""
    url = f"turn:127.0.0.1:{coturn.port}?transport=udp"
    config = write_yaml(
        tmp_path / "relay.yaml",
        {
            "relay": {"host": "127.0.0.1", "port": 0},
            "auth": {"open": True},
            "turn": {"secret": secret, "urls": [url]},
        },
    )
    async with relay_process(config) as running:
        peer = await spawn(
            "practitioner",
            peer_argv("practitioner", config, "--relay", running.url, "--session", "alone"),
        )
        try:
            await peer.expect(re.escape(f"TURN server {url}") + ".*" + re.escape(said), TIMEOUT * 6)
            if status is not None:
                assert await peer.wait(TIMEOUT) == status, peer.log()
            else:
                assert peer.proc.returncode is None  # granted: it waits for the patient
        finally:
            await peer.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("allowed", "granted"),
    [
        pytest.param([], False, id="denied-by-default"),
        pytest.param(["127.0.0.7/32"], True, id="allowed-address"),
        pytest.param(["127.0.0.0/8"], True, id="allowed-range"),
        pytest.param(["127.0.0.5/32"], False, id="other-address-allowed"),
    ],
)
async def test_allowed_peers_really_let_a_range_through(allowed: list[str], granted: bool) -> None:
    """turn.allowed_peers opens exactly its ranges, loopback included; others get coturn's 403."""
    async with TurnServer(settings(allowed_peers=allowed)) as server:
        entry = minted(server)
        transport, _ = await within(
            create_turn_endpoint(
                _Sink,
                server_addr=("127.0.0.1", server.port),
                username=entry["username"],
                password=entry["credential"],
            )
        )
        try:
            bind = aiortc_patches.bind_channel(
                aiortc_patches.turn_transport_client(transport), ("127.0.0.7", 40000)
            )
            if granted:
                await within(bind)
            else:
                with pytest.raises(stun.TransactionFailed, match="403"):
                    await within(bind)
        finally:
            transport.close()
