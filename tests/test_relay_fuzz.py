"""Fuzz tier: random and mutated frames from many clients at once, real relay, real sockets.

For each example hypothesis draws a batch of frames per fuzzing client: random
text, valid JSON of the wrong shape, real frame types with fields of the wrong
kind, huge strings, deep nesting, binary frames and text frames that are not
UTF-8. The clients send them all concurrently while two valid sessions beside
them run a whole exchange. Then:

- the relay is still serving (a new connection joins, /health answers);
- every fuzzing connection answered each frame with frames of known types and
  error codes, and stayed open, except the ones that sent invalid UTF-8 (1007)
  or went over the hard ceiling (1009);
- the valid sessions received their own frames, complete and in order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

import relay
from tests.support import Client, pair, relay_config, running_relay, within

LIMITS = {
    "max_frame_bytes": 4096,
    "hard_max_bytes": 16384,
    "frames_per_second": 1000,
    "burst": 1000,
}
KNOWN_CODES = {
    "bad-json",
    "binary-frame",
    "frame-too-large",
    "missing-field",
    "bad-field",
    "unknown-type",
    "not-joined",
    "already-joined",
    "bad-session",
    "bad-role",
    "role-taken",
    "no-peer",
    "rate-limited",
}
REPLY_TYPES = {"error", "pong", "joined", "peer-joined", "peer-left"}
FRAME_TYPES = ["join", "offer", "answer", "candidate", "bye", "ping", "pong", "joined", ""]


class InvalidUtf8:
    """A text frame whose payload is not UTF-8 (written by hand: clients refuse to)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __repr__(self) -> str:
        return f"InvalidUtf8({self.payload!r})"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
wrong_shapes = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}),
    st.sampled_from(FRAME_TYPES) | json_values,
    st.dictionaries(
        st.sampled_from(["session", "role", "sdp", "candidate", "token", "resume", "reason"]),
        json_values,
        max_size=4,
    ),
)
deep = st.integers(min_value=100, max_value=50_000).map(lambda depth: "[" * depth + "]" * depth)
deep_objects = st.integers(min_value=100, max_value=3_000).map(
    lambda depth: '{"type":"offer","sdp":' + '{"a":' * depth + "1" + "}" * depth + "}"
)
huge = st.integers(min_value=4_000, max_value=20_000).map(
    lambda size: json.dumps({"type": "offer", "sdp": "x" * size})
)
mutated = st.builds(
    lambda text, at, junk: text[:at] + junk + text[at + 1 :],
    st.just('{"type":"candidate","candidate":{"candidate":"c","sdpMid":"0"}}'),
    st.integers(min_value=0, max_value=60),
    st.text(max_size=3),
)
invalid_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b'{"type":"\xed\xa0\x80"}', b"\xf8\x88\x80"])
frames: st.SearchStrategy[str | bytes | InvalidUtf8] = st.one_of(
    st.text(max_size=50),
    json_values.map(json.dumps),
    wrong_shapes,
    mutated,
    deep,
    deep_objects,
    huge,
    st.binary(max_size=64),
    invalid_utf8.map(InvalidUtf8),
)
batches = st.lists(st.lists(frames, min_size=1, max_size=8), min_size=1, max_size=10)


async def send(client: Client, message: str | bytes | InvalidUtf8) -> None:
    if isinstance(message, InvalidUtf8):
        payload = message.payload
        header = bytes([0x81, 0x80 | len(payload)])
        client.ws.transport.write(header + b"\0\0\0\0" + payload)
    else:
        await client.send_raw(message)


async def fuzz_client(url: str, n: int, messages: list[str | bytes | InvalidUtf8]) -> None:
    """Send every message, then check each reply and that the connection lives or died rightly."""
    client = await Client.open(url)
    if n % 2:  # half of them hold a seat (alone) in a session of their own
        await client.join(f"fuzz-{n}", "patient")
    expected_close: set[int] = set()
    for message in messages:
        if isinstance(message, InvalidUtf8):
            expected_close.add(1007)
        elif len(message) > LIMITS["hard_max_bytes"]:
            expected_close.add(1009)
        await send(client, message)
        if expected_close:
            break
    replies: list[dict[str, Any]] = []
    try:
        if not expected_close:
            await client.send(type="ping")
        # Until the pong of that last ping; or, when a close is due, until it comes.
        while (reply := await client.recv())["type"] != "pong" or expected_close:
            replies.append(reply)
    except ConnectionClosed:
        assert client.ws.close_code in expected_close, (client.ws.close_code, messages)
        return
    assert not expected_close, messages
    for reply in replies:
        assert reply["type"] in REPLY_TYPES, reply
        if reply["type"] == "error":
            assert reply["code"] in KNOWN_CODES, reply
            assert isinstance(reply["message"], str)
            assert reply["message"]


async def valid_session(url: str, name: str, frames: int = 20) -> None:
    patient, practitioner = await pair(url, name)
    for k in range(frames):
        await patient.send(type="candidate", candidate={"candidate": f"{name}:{k}"})
    for k in range(frames):
        got = await practitioner.expect("candidate")
        assert got["candidate"] == {"candidate": f"{name}:{k}"}
    await practitioner.send(type="bye")
    await patient.expect("bye")
    await patient.expect("peer-left", role="practitioner", reason="bye")


async def scenario(batch: list[list[str | bytes | InvalidUtf8]]) -> None:
    async with running_relay(relay_config(limits=LIMITS)) as running:
        await within(
            asyncio.gather(
                valid_session(running.url, "calm-a"),
                *(fuzz_client(running.url, n, messages) for n, messages in enumerate(batch)),
                valid_session(running.url, "calm-b"),
            ),
            units=4,
        )
        # Still serving.
        after = await Client.open(running.url)
        await after.join("after", "practitioner")
        assert isinstance(running.state, relay.State)


@settings(max_examples=200)
@given(batch=batches)
def test_random_and_mutated_frames_never_disturb_the_relay_or_valid_sessions(
    batch: list[list[str | bytes | InvalidUtf8]],
) -> None:
    asyncio.run(scenario(batch))


@pytest.mark.parametrize("payload", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
def test_invalid_utf8_closes_1007_only_that_connection(payload: bytes) -> None:
    asyncio.run(scenario([[InvalidUtf8(payload)], ['{"type":"ping"}']]))


# -- join tokens and resume keys (pure core: no socket needed) --------------------------

SECRET = "fuzz-secret"
EXPIRY = 4_000_000_000
GOOD_TOKEN = relay.mint_token(SECRET, "s1", "patient", EXPIRY)
RESUME_SECRET = b"fuzz-resume-secret"
GOOD_KEY = relay.mint_resume(RESUME_SECRET, "s1", "patient")
# Digits of other scripts, signs and spaces: what int() and str.isdigit() accept and ASCII does not.
ODD_DIGITS = "".join(c for c in map(chr, range(0x20000)) if c.isdigit()) + " +-_."


def mutations(valid: str) -> st.SearchStrategy[str]:
    """A valid string with one character replaced, inserted or deleted."""
    alphabet = st.sampled_from(ODD_DIGITS) | st.characters()
    index = st.integers(0, len(valid) - 1)
    return st.one_of(
        st.tuples(index, alphabet).map(lambda t: valid[: t[0]] + t[1] + valid[t[0] + 1 :]),
        st.tuples(index, alphabet).map(lambda t: valid[: t[0]] + t[1] + valid[t[0] :]),
        index.map(lambda i: valid[:i] + valid[i + 1 :]),
    )


tokens = st.one_of(
    st.text(),
    st.text(alphabet=ODD_DIGITS).map(lambda e: f"v1.{e}.{GOOD_TOKEN.rsplit('.', 1)[1]}"),
    mutations(GOOD_TOKEN),
)


@settings(max_examples=500)
@given(token=tokens)
def test_a_join_token_is_accepted_only_in_its_one_spelling(token: str) -> None:
    """Any token but the minted one is bad-token (never a crash, never a second spelling)."""
    if token == GOOD_TOKEN:
        relay.check_token(SECRET, token, "s1", "patient", now=1_000_000_000)
        return
    with pytest.raises(relay.ProtocolError) as refused:
        relay.check_token(SECRET, token, "s1", "patient", now=1_000_000_000)
    assert refused.value.code == "bad-token", token


GOOD_V2 = relay.mint_token(SECRET, "s1", "patient", EXPIRY, not_before=999_999_000)
tokens_v2 = st.one_of(
    st.text(alphabet=ODD_DIGITS).map(lambda e: f"v2.{e}.{EXPIRY}.{GOOD_V2.rsplit('.', 1)[1]}"),
    mutations(GOOD_V2),
)


@settings(max_examples=500)
@given(token=tokens_v2)
def test_a_token_with_not_before_is_accepted_only_in_its_one_spelling(token: str) -> None:
    """Any v2 token but the minted one is bad-token: the window cannot be edited or respelled."""
    if token == GOOD_V2:
        assert relay.check_token(SECRET, token, "s1", "patient", now=1_000_000_000)
        return
    with pytest.raises(relay.ProtocolError) as refused:
        relay.check_token(SECRET, token, "s1", "patient", now=1_000_000_000)
    assert refused.value.code == "bad-token", token


@settings(max_examples=500)
@given(
    key=st.one_of(st.text(), st.from_regex(relay.RESUME_RE, fullmatch=True), mutations(GOOD_KEY)),
    session=st.sampled_from(["s1", "s2"]),
    role=st.sampled_from(relay.ROLES),
)
def test_a_resume_key_verifies_only_as_minted_for_its_seat(
    key: str, session: str, role: str
) -> None:
    """verify_resume is true only for the relay's own key of that very session and role."""
    verified = relay.verify_resume(RESUME_SECRET, key, session, role)
    assert verified == (key == GOOD_KEY and (session, role) == ("s1", "patient"))


@settings(max_examples=200)
@given(key=st.one_of(st.from_regex(relay.RESUME_RE, fullmatch=True), mutations(GOOD_KEY)))
def test_a_join_with_any_other_key_is_not_resumed_and_gets_a_fresh_signed_key(key: str) -> None:
    """Through the core: a key that is not the seat's own never gives resumed: true."""
    state = relay.State(relay_config(), resume_secret=RESUME_SECRET)
    conn, _ = relay.connect(state)
    actions = relay.receive(
        state, conn, json.dumps({"type": "join", "session": "s2", "role": "patient", "resume": key})
    )
    (reply,) = [json.loads(a.text) for a in actions if isinstance(a, relay.Send)]
    if reply["type"] == "error":
        assert reply["code"] == "bad-field" and not relay.RESUME_RE.fullmatch(key)
        return
    assert reply["resumed"] is False
    assert relay.verify_resume(RESUME_SECRET, reply["resume"], "s2", "patient")
