"""The aiortc peers: pure parts, then real calls inside a private network namespace.

The first call is two ``peers.call.Call`` objects in this process; the others
use the real relay and the real ``python -m peers.patient`` /
``peers.practitioner`` command lines (tests/processes.py), inside a namespace
this test run creates and deletes: aioice never gathers on 127.0.0.1, and
nothing leaves the machine. Tests wait for what they need (a log line, a
number of frames), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import av
import pytest
import pytest_asyncio
import yaml
from av import VideoFrame

from peers import aiortc_patches, ice
from peers.call import CallOptions
from peers.config import ConfigError, PeerSettings, parse_ice_urls
from peers.media import PatternTrack, latency_ms, read_stamp, stamp_bits
from peers.netns import Netns, Network, inside, netns_missing
from relay import mint_token
from tests.inprocess import LocalPair, chatless_patient
from tests.processes import Process, RelayProcess, peer_argv, relay_process, spawn
from tests.support import within

FPS = 15
VIDEO = {"width": 320, "height": 240, "fps": FPS}


# -- pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"session": "a b"}, "session"),
        ({"relay": {"url": 5}}, "relay.url"),
        ({"ice": {"policy": "turn"}}, "ice.policy"),
        ({"ice": {"servers": "stun:x"}}, "ice.servers"),
        ({"ice": {"servers": [{"urls": "http://x"}]}}, "ice.servers[0].urls"),
        ({"ice": {"servers": [{"urls": "turns:x:5349?transport=udp"}]}}, "ice.servers[0].urls"),
        (
            {"ice": {"servers": [{"urls": "turn:x", "credentialType": "oauth"}]}},
            "ice.servers[0].credentialType",
        ),
        ({"ice": {"servers": [{"urls": "stun:x", "user": "u"}]}}, "ice.servers[0].user"),
        ({"ice": {"timeout_s": 0}}, "ice.timeout_s"),
        ({"relay": {"reconnect_max_s": 0.1}}, "relay.reconnect_max_s"),
        ({"relay": {"join_timeout_s": "soon"}}, "relay.join_timeout_s"),
        ({"ice": {"polcy": "all"}}, "ice.polcy"),
        ({"media": {"video": {"width": "wide"}}}, "media.video.width"),
        ({"media": {"video": {"codec": "av1"}}}, "media.video.codec"),
        ({"media": {"video": {"fec": "sometimes"}}}, "media.video.fec"),
        ({"media": {"audio": "loud"}}, "media.audio"),
    ],
)
def test_config_errors_name_their_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PeerSettings.from_mapping(data)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")
    assert len(str(caught.value).splitlines()) == 1


def test_settings_aiortc_would_ignore_are_warned_about() -> None:
    settings = PeerSettings.from_mapping(
        {
            "ice": {
                "servers": [
                    {"urls": ["stun:a:3478", "stun:b:3478"]},
                    {"urls": "turn:t:3478", "username": "u", "credential": "p"},
                    {"urls": "turn:u:3478", "username": "u", "credential": "p"},
                ]
            }
        }
    )
    assert any("only the first STUN URL" in w and "stun:b:3478" in w for w in settings.warnings)
    assert any("only the first TURN URL" in w and "turn:u:3478" in w for w in settings.warnings)


def test_the_shipped_config_works_offline() -> None:
    settings = PeerSettings.load(Path(__file__).resolve().parent.parent / "config.yaml")
    assert settings.ice_servers == ()  # no public STUN server, ever
    config = ice.configuration(settings, ice.ice_servers(settings, None))
    assert config.iceServers == []


def test_ice_server_flag_carries_credentials_and_relay_credentials_come_first() -> None:
    (server,) = parse_ice_urls(["turn:alice:s3cret@198.18.0.9:3478?transport=tcp"])
    assert server.urls == ("turn:198.18.0.9:3478?transport=tcp",)
    assert (server.username, server.credential) == ("alice", "s3cret")
    settings = PeerSettings(ice_servers=(server,))
    minted = [{"urls": ["turn:198.18.0.1:3478"], "username": "1:s-patient", "credential": "x"}]
    servers = ice.ice_servers(settings, minted)
    assert servers[0].username == "1:s-patient"
    assert servers[1].username == "alice"


@pytest.mark.parametrize(("timeout", "retries"), [(3.5, 2), (7.5, 3), (20, 4), (63.5, 6)])
def test_the_ice_timeout_sets_aioice_retransmissions(timeout: float, retries: int) -> None:
    import aioice.stun

    saved = aioice.stun.RETRY_MAX
    try:
        assert ice.honour_timeout(timeout) == retries
        assert 0.5 * (2 ** (retries + 1) - 1) <= timeout  # what aioice waits in all
    finally:
        aioice.stun.RETRY_MAX = saved


@pytest.mark.asyncio
async def test_the_pattern_stamp_reads_back_and_a_plain_frame_has_none() -> None:
    track = PatternTrack(320, 240, 30)
    for _ in range(3):
        frame = await track.recv()
        stamp = read_stamp(frame)
        assert stamp is not None
        assert stamp[0] == track.counter - 1
        assert 0 <= latency_ms(stamp[1]) < 1000  # the send time, wrapped to 36 bits
    gray = VideoFrame(320, 240, "gray")
    gray.planes[0].update(bytes([128]) * 320 * 240)
    assert read_stamp(gray.reformat(format="yuv420p")) is None
    assert stamp_bits(1, 2) != stamp_bits(1, 3)
    track.stop()


# -- calls -------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def lan() -> AsyncIterator[Netns]:
    if reason := netns_missing():
        pytest.skip(reason)
    async with Network("epc-peers") as net:
        yield await net.lan("198.18.0.2/24")


@pytest_asyncio.fixture
async def relay(lan: Netns, config: Path) -> AsyncIterator[RelayProcess]:
    """relay.py inside the namespace, port 0 (kept across a restart), stopped by PID."""
    async with relay_process(config, lan.name) as running:
        yield running


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    # The relay client's knobs shortened (a restart is noticed and rejoined within a second).
    relay = {"open_timeout_s": 2, "join_timeout_s": 3, "reconnect_max_s": 1}
    path.write_text(
        yaml.safe_dump({"relay": relay, "media": {"video": VIDEO}, "ice": {"timeout_s": 10}})
    )
    return path


def summary(tmp_path: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    return data


def assert_media_arrived(got: dict[str, Any], seconds: float) -> None:
    video = got["video"]
    assert (video["width"], video["height"]) == (VIDEO["width"], VIDEO["height"])
    assert video["frames"] >= FPS * seconds * 0.6, video
    # Decoded frames are ours: their stamps read back. A frame or two may be
    # too blurred to read when the encoder's bitrate dips on a loaded machine
    # (seen once in CI: 176 of 177), so 98 % of them, not every one.
    assert video["stamped"] >= video["frames"] * 0.98, video
    assert video["in_order"], video
    assert got["audio"]["frames"] >= 50 * seconds * 0.6, got["audio"]
    assert got["ice"]["local_type"] == "host"
    assert got["latency_ms"]["p50"] > 0
    # What the user felt and what this side sends (issue 13): on a clean link, the full size.
    assert got["video"]["freezes"] >= 0 and got["audio"]["concealed"] >= 0
    assert (got["sending"]["width"], got["sending"]["height"]) == (VIDEO["width"], VIDEO["height"])


class Peer(Protocol):
    async def __call__(self, role: str, *args: str, name: str = "") -> Process: ...


@pytest_asyncio.fixture
async def peer(
    lan: Netns, relay: RelayProcess, config: Path, tmp_path: Path
) -> AsyncIterator[Peer]:
    """Starts ``python -m peers.ROLE`` in the namespace, joined to the relay's session "call"
    with the pattern and the tone; every one still running at the end is stopped by PID."""
    started: list[Process] = []

    async def start(role: str, *args: str, name: str = "") -> Process:
        argv = peer_argv(
            role, config, "--relay", relay.url, "--session", "call", "--video", "pattern",
            "--audio", "tone", "--stats-json", str(tmp_path / f"{name or role}.json"), *args,
        )  # fmt: skip
        started.append(await spawn(name or role, argv, lan.command()))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            await process.stop()


@pytest.mark.netns
@pytest.mark.asyncio
async def test_two_calls_in_one_process_exchange_media_and_chat(lan: Netns) -> None:
    """Two Calls wired in memory exchange stamped video, audio and a chat line both ways."""
    pair = LocalPair((CallOptions(), CallOptions()), (lan, lan), width=320, height=240, fps=FPS)
    chats: dict[str, asyncio.Queue[str]] = {
        "patient": asyncio.Queue(),
        "practitioner": asyncio.Queue(),
    }
    for call in pair.calls:
        call.on_chat = chats[call.name].put_nowait
    async with contextlib.aclosing(pair):
        await within(pair.connect(), 2)
        await within(pair.flowing(video=FPS * 2, audio=50 * 2), 4)
        for call in pair.calls:
            got = call.receiver.received
            assert (got.width, got.height) == (320, 240)
            assert got.stamped == got.video_frames
            assert got.counters == sorted(got.counters)
            assert call.path is not None and call.path.type == "host"
        assert pair.a.send_chat("from the patient")
        assert await within(chats["practitioner"].get()) == "from the patient"
        assert pair.b.send_chat("from the practitioner")
        assert await within(chats["patient"].get()) == "from the practitioner"


@pytest.mark.netns
@pytest.mark.asyncio
async def test_candidates_before_the_offer_wait_for_it(lan: Netns) -> None:
    """Trickled candidates that arrive before the description are applied once it is set."""
    async with contextlib.aclosing(LocalPair(namespaces=(lan, lan))) as pair:
        with inside(lan):
            await within(pair.a.offer(), 2)
        # As from a browser, which trickles: no end-of-candidates in the offer itself.
        sdp = pair.inbox[1].get_nowait()["sdp"].replace("a=end-of-candidates\r\n", "")
        # A candidate that is not in the offer (port 9): only the queue can bring it in.
        line = "candidate:9 1 udp 2130706431 198.18.0.2 9 typ host"
        init = {"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0}
        await pair.b.add_candidate(init)
        await pair.b.add_candidate(None)  # end-of-candidates, as a browser sends it
        assert pair.b.pc.remoteDescription is None  # kept, not refused
        with inside(lan):
            await within(pair.b.answer(sdp), 2)
        [transport, *_] = ice.ice_transports(pair.b.pc)
        remote = aiortc_patches.ice_connection(transport).remote_candidates
        assert [(c.host, c.port) for c in remote if c.port == 9] == [("198.18.0.2", 9)]


@pytest.mark.netns
@pytest.mark.asyncio
@pytest.mark.parametrize("first", ["patient", "practitioner"])
async def test_a_call_through_the_relay_in_either_join_order(
    peer: Peer, tmp_path: Path, first: str
) -> None:
    """Whoever joins first, both command lines receive each other's media."""
    second = "practitioner" if first == "patient" else "patient"
    a = await peer(first, "--duration", "6")
    await a.expect("waiting for the")  # joined, alone
    b = await peer(second, "--duration", "4")
    assert await b.wait(30) == 0, b.log()
    assert await a.wait(30) == 0, a.log()
    for role in ("patient", "practitioner"):
        got = summary(tmp_path, role)
        assert_media_arrived(got, 3)
        assert got["first_frame_ms"] < 5000


@pytest.mark.netns
@pytest.mark.asyncio
async def test_the_call_survives_a_relay_restart(
    peer: Peer, relay: RelayProcess, tmp_path: Path
) -> None:
    """The relay stops and starts again on its port: one call, media all along, resumed seats."""
    url = relay.url
    patient = await peer("patient", "--duration", "12")
    practitioner = await peer("practitioner", "--duration", "12")
    for process in (patient, practitioner):
        await process.expect("call 1: connected", 20)
    assert await relay.stop() == 0
    # The relay is away and media keeps flowing; both peers retry at least once.
    for process in (patient, practitioner):
        await process.expect("reconnecting in", 10)
    assert await relay.start() == url  # the same port
    assert await patient.wait(40) == 0, patient.log()
    assert await practitioner.wait(40) == 0, practitioner.log()
    for role, process in (("patient", patient), ("practitioner", practitioner)):
        got = summary(tmp_path, role)
        assert got["calls"] == 1, process.log()  # one call from start to end
        assert got["relay_reconnects"] >= 1
        assert_media_arrived(got, 11)  # no gap: frames all along
        assert any("(resumed)" in line for line in process.lines), process.log()
        # The call flowed all along: never "waiting" once it had connected.
        connected = next(i for i, line in enumerate(process.lines) if "call 1: connected" in line)
        assert not any("waiting for the" in line for line in process.lines[connected:])
    # The first side back finds the other seat empty and says the call is in progress.
    back_first = [
        line
        for process in (patient, practitioner)
        for line in process.lines
        if "call 1: in progress; the " in line and "'s signaling is not back yet" in line
    ]
    assert back_first, patient.log() + "\n" + practitioner.log()


@pytest.mark.netns
@pytest.mark.asyncio
async def test_a_second_practitioner_gets_a_fresh_call(peer: Peer, tmp_path: Path) -> None:
    """After the first practitioner hangs up, the patient calls the next one afresh."""
    patient = await peer("patient", "--duration", "12")
    first = await peer("practitioner", "--duration", "3", name="first")
    assert await first.wait(30) == 0, first.log()
    second = await peer("practitioner", "--duration", "4", name="second")
    assert await second.wait(30) == 0, second.log()
    assert await patient.wait(30) == 0, patient.log()
    assert any("hung up" in line for line in patient.lines), patient.log()
    assert summary(tmp_path, "patient")["calls"] == 2
    # Each call's lines carry its own number; the second's never read as the first's.
    said = patient.log()
    for number in (1, 2):
        assert f"call {number}: offer sent to the practitioner" in said
        assert f"call {number}: ICE path: host" in said
        assert f"call {number}: media flowing" in said
    assert all(
        re.search(r"call \d+: (ICE path|stats): ", line)
        for line in patient.lines
        if "ICE path: " in line or "stats: path" in line
    ), said
    assert_media_arrived(summary(tmp_path, "first"), 2)
    assert_media_arrived(summary(tmp_path, "second"), 3)


@pytest.mark.netns
@pytest.mark.asyncio
async def test_a_second_patient_exits_2_with_role_taken(peer: Peer) -> None:
    """A second patient in a session is refused with role-taken and exits 2."""
    first = await peer("patient", "--duration", "6")
    await first.expect("waiting for the")  # the seat is taken
    second = await peer("patient", name="second")
    assert await second.wait(20) == 2
    assert any("role-taken" in line for line in second.lines), second.log()
    assert await first.stop() == 0


@pytest.mark.netns
@pytest.mark.asyncio
async def test_an_impossible_ice_path_fails_within_the_timeout_with_its_cause(
    peer: Peer, tmp_path: Path
) -> None:
    """TURN only without a TURN server: exit 1 within the ICE timeout, naming the cause."""
    args = ("--ice-policy", "relay", "--ice-timeout", "3")  # TURN only, and no TURN server
    patient = await peer("patient", *args)
    practitioner = await peer("practitioner", *args)
    assert await patient.wait(20) == 1, patient.log()
    await practitioner.stop()
    message = "\n".join(patient.lines)
    assert "no TURN server is configured" in message
    assert summary(tmp_path, "patient")["exit_reason"] == "ice-failed"


@pytest.mark.asyncio
async def test_a_bad_flag_or_key_exits_2_naming_it(config: Path, tmp_path: Path) -> None:
    """A bad YAML value or flag exits 2 with one line naming the key or flag."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("ice: {policy: sometimes}\n")
    for argv, named in (
        (peer_argv("patient", bad), "ice.policy"),
        (peer_argv("patient", config, "--session", "no spaces"), "--session"),
        (peer_argv("patient", config, "--relay", "http://x"), "--relay"),
    ):
        process = await spawn("patient", argv)
        assert await process.wait(20) == 2
        assert any(named in line for line in process.lines), process.log()


@pytest.mark.netns
@pytest.mark.asyncio
async def test_record_to_a_file_then_send_that_file(peer: Peer, tmp_path: Path) -> None:
    """--record-to keeps what arrived; --video FILE --audio FILE sends it back out."""
    recording = tmp_path / "received.mkv"
    practitioner = await peer("practitioner", "--duration", "4", "--record-to", str(recording))
    patient = await peer("patient", "--duration", "4")
    assert await patient.wait(30) == 0, patient.log()
    assert await practitioner.wait(30) == 0, practitioner.log()
    with av.open(str(recording)) as container:
        kinds = {stream.type for stream in container.streams}
        frames = [read_stamp(frame) for frame in container.decode(video=0)]
    assert kinds == {"audio", "video"}
    assert len(frames) >= FPS * 2
    assert sum(stamp is not None for stamp in frames) >= len(frames) * 0.9  # ours, recorded
    replay = await peer(
        "patient", "--duration", "3", "--video", str(recording), "--audio", str(recording),
        name="replay",
    )  # fmt: skip
    listener = await peer("practitioner", "--duration", "3")
    assert await replay.wait(30) == 0, replay.log()
    assert await listener.wait(30) == 0, listener.log()
    got = summary(tmp_path, "practitioner")
    assert got["video"]["frames"] > 10
    assert got["video"]["stamped"] > 10  # the recorded stamps went out again
    assert got["audio"]["frames"] > 50


@pytest.mark.asyncio
@pytest.mark.parametrize(("age", "code"), [(None, "bad-token"), (-60, "token-expired")])
async def test_a_refused_token_exits_2_naming_the_code(
    tmp_path: Path, age: int | None, code: str
) -> None:
    """No ICE is involved: the relay refuses the join, the peer says why and does not retry."""
    config = tmp_path / "secured.yaml"
    config.write_text(yaml.safe_dump({"auth": {"secret": "clinic-secret"}}))
    async with relay_process(config) as relay:
        args = ["--relay", relay.url, "--session", "s1"]
        if age is not None:
            args += [
                "--token",
                mint_token("clinic-secret", "s1", "patient", int(time.time()) + age),
            ]
        process = await spawn("patient", peer_argv("patient", config, *args))
        assert await process.wait(20) == 2
    refusals = [line for line in process.lines if "join refused" in line]
    assert len(refusals) == 1, process.log()
    assert code in refusals[0]


@pytest.mark.netns
@pytest.mark.asyncio
async def test_a_peer_gone_before_any_call_is_not_a_call_going_on(peer: Peer) -> None:
    """The patient exits on a TURN error before any call: the practitioner says no call is on."""
    practitioner = await peer("practitioner", "--duration", "30")
    await practitioner.expect("waiting for the patient")
    # A TURN server where nothing listens: the patient gives up before its offer goes out.
    patient = await peer("patient", "--ice-server", "turn:u:p@198.18.0.2:9", "--ice-timeout", "3")
    assert await patient.wait(40) == 1, patient.log()
    await practitioner.expect(
        re.escape(
            "the patient's signaling dropped (disconnected); "
            "no call in progress: waiting for the patient"
        ),
        20,
    )
    assert not any("the call goes on" in line for line in practitioner.lines), practitioner.log()
    assert await practitioner.stop() == 0


@pytest.mark.netns
@pytest.mark.asyncio
async def test_a_chat_line_to_a_side_without_a_chat_channel_says_so(
    lan: Netns, relay: RelayProcess, config: Path
) -> None:
    """An offer with no chat channel: a line typed on the practitioner's side says why it fails."""
    argv = peer_argv(
        "practitioner", config, "--relay", relay.url, "--session", "nochat",
        "--video", "pattern", "--audio", "tone", "--duration", "30",
    )  # fmt: skip
    practitioner = await spawn("practitioner", argv, lan.command(), stdin=asyncio.subprocess.PIPE)
    try:
        await practitioner.expect("waiting for the patient")
        async with chatless_patient(relay.url, "nochat", lan):
            await practitioner.expect("call 1: connected", 20)
            stdin = practitioner.proc.stdin
            assert stdin is not None
            stdin.write(b"hello\n")
            await stdin.drain()
            await practitioner.expect(
                re.escape(
                    "chat: call 1: the patient's side opened no chat channel in this call; "
                    "line dropped"
                )
            )
    finally:
        await practitioner.stop()
