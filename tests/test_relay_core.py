"""The relay's pure core: parsing, seats, routing, limits, tokens. No event loop."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import resource
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relay
from relay import Close, ProtocolError, Send, State
from tests.support import SEAT_STORES, relay_config

SECRET = "test-secret"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# The seat store that make_state() builds the state on: each of SEAT_STORES in turn.
_store: list[Callable[[], relay.SeatStore]] = [relay.MemorySeats]


@pytest.fixture(autouse=True, scope="module", params=sorted(SEAT_STORES))
def seat_store(request: pytest.FixtureRequest) -> Callable[[], relay.SeatStore]:
    """Every test of the module runs once per seat store: make_state() builds on it."""
    _store[0] = SEAT_STORES[request.param]
    return _store[0]


def make_state(**sections: dict[str, Any]) -> tuple[State, Clock]:
    clock = Clock()
    config = relay_config(**sections)
    return State(config, monotonic=clock, wallclock=clock, seats=_store[0]()), clock


def frames_to(actions: list[relay.Action], conn: int) -> list[dict[str, Any]]:
    return [json.loads(a.text) for a in actions if isinstance(a, Send) and a.conn == conn]


def send(state: State, conn: int, **fields: Any) -> list[relay.Action]:
    return relay.receive(state, conn, json.dumps(fields))


def joined_conn(state: State, session: str, role: str, **fields: Any) -> int:
    conn, actions = relay.connect(state)
    assert actions == []
    reply = frames_to(send(state, conn, type="join", session=session, role=role, **fields), conn)
    assert reply[0]["type"] == "joined", reply
    return conn


def error_code(actions: list[relay.Action], conn: int) -> str:
    (frame,) = frames_to(actions, conn)
    assert frame["type"] == "error"
    assert isinstance(frame["message"], str) and frame["message"]
    code: str = frame["code"]
    return code


# -- parse_frame ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        pytest.param(b'{"type":"ping"}', "binary-frame", id="binary"),
        pytest.param("x" * 70_000, "frame-too-large", id="too-large-ascii"),
        pytest.param('"' + "é" * 40_000 + '"', "frame-too-large", id="too-large-by-utf8-bytes"),
        pytest.param("{not json", "bad-json", id="invalid-json"),
        pytest.param("[1, 2]", "bad-json", id="array"),
        pytest.param('"join"', "bad-json", id="string"),
        pytest.param("[" * 50_000 + "]" * 50_000, "frame-too-large", id="deep-nesting-too-large"),
        pytest.param("[" * 30_000 + "]" * 30_000, "bad-json", id="deep-nesting"),
        pytest.param("{}", "missing-field", id="no-type"),
        pytest.param('{"type": 3}', "bad-field", id="type-not-string"),
        pytest.param('{"type": "hello"}', "unknown-type", id="unknown-type"),
        pytest.param('{"type": "offer"}', "missing-field", id="offer-without-sdp"),
        pytest.param('{"type": "answer", "sdp": 5}', "bad-field", id="sdp-not-string"),
        pytest.param('{"type": "candidate"}', "missing-field", id="candidate-missing"),
        pytest.param('{"type": "candidate", "candidate": "x"}', "bad-field", id="candidate-string"),
        pytest.param(
            '{"type": "candidate", "candidate": {}}', "missing-field", id="candidate-init-empty"
        ),
        pytest.param(
            '{"type": "candidate", "candidate": {"candidate": "a", "sdpMLineIndex": "0"}}',
            "bad-field",
            id="mline-index-string",
        ),
        pytest.param(
            '{"type": "candidate", "candidate": {"candidate": "a", "sdpMLineIndex": true}}',
            "bad-field",
            id="mline-index-bool",
        ),
        pytest.param('{"type": "bye", "reason": 1}', "bad-field", id="bye-reason-number"),
        pytest.param(
            '{"type": "candidate", "candidate": {"candidate": "a", "sdpMid": 0}}',
            "bad-field",
            id="sdp-mid-number",
        ),
        pytest.param(
            '{"type": "candidate", "candidate": {"candidate": "a", "sdpMLineIndex": 0.5}}',
            "bad-field",
            id="mline-index-fraction",
        ),
        # Strict JSON (RFC 8259): what a peer's parser may read differently never passes.
        pytest.param('{"type": "offer", "sdp": "\\ud800"}', "bad-json", id="lone-surrogate"),
        pytest.param('{"type": "ping", "n": NaN}', "bad-json", id="nan"),
        pytest.param('{"type": "ping", "n": 1e400}', "bad-json", id="infinite-number"),
    ],
)
def test_parse_frame_refuses(message: str | bytes, code: str) -> None:
    """A bad frame raises ProtocolError with its own code and a readable message."""
    with pytest.raises(ProtocolError) as caught:
        relay.parse_frame(message, 65_536)
    assert caught.value.code == code
    assert str(caught.value).endswith(".")


@pytest.mark.parametrize(
    "message",
    [
        pytest.param('{"type": "ping"}', id="ping"),
        pytest.param('{"type": "offer", "sdp": "v=0", "extra": [1]}', id="extra-fields"),
        pytest.param('{"type": "candidate", "candidate": null}', id="end-of-candidates"),
        pytest.param(
            '{"type":"candidate","candidate":{"candidate":"","sdpMid":null,"sdpMLineIndex":null}}',
            id="empty-candidate-nulls",
        ),
        pytest.param('{"type": "bye"}', id="bye-without-reason"),
        pytest.param(
            '{"type": "candidate", "candidate": {"candidate": "a", "sdpMid": null,'
            ' "sdpMLineIndex": null}}',
            id="candidate-null-mid-and-index",
        ),
    ],
)
def test_parse_frame_accepts(message: str) -> None:
    """A valid frame parses, keeping its text for verbatim forwarding."""
    kind, data, text = relay.parse_frame(message, 65_536)
    assert kind == data["type"] == json.loads(message)["type"]
    assert text is message


# Any JSON value, weighted to the types that the checks tell apart.
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.mark.parametrize("number", [-(2**63) - 1, 2**64], ids=["below-int64", "above-uint64"])
def test_integer_beyond_64_bits_is_not_an_integer(number: int) -> None:
    """orjson reads an integer beyond 64 bits as a float: sdpMLineIndex is then bad-field."""
    frame = {"type": "candidate", "candidate": {"candidate": "c", "sdpMLineIndex": number}}
    with pytest.raises(ProtocolError) as caught:
        relay.parse_frame(json.dumps(frame), 65_536)
    assert caught.value.code == "bad-field"


WELL_FORMED: dict[str, dict[str, Any]] = {
    "candidate": {
        "type": "candidate",
        "candidate": {
            "candidate": "candidate:1 1 udp 1 198.18.0.2 9 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
        },
    },
    "offer": {"type": "offer", "sdp": "v=0"},
    "answer": {"type": "answer", "sdp": "v=0"},
}
FIELD_PATHS = [
    ("candidate",),
    ("candidate", "candidate"),
    ("candidate", "sdpMid"),
    ("candidate", "sdpMLineIndex"),
    ("sdp",),
    ("extra",),
]
DELETE = object()


@st.composite
def relayed_frames(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed candidate, offer or answer with up to two fields removed or replaced."""
    data: dict[str, Any] = copy.deepcopy(WELL_FORMED[draw(st.sampled_from(sorted(WELL_FORMED)))])
    for path in draw(st.lists(st.sampled_from(FIELD_PATHS), max_size=2)):
        *parents, name = path
        target: Any = data
        for parent in parents:
            target = target.get(parent)
        if type(target) is not dict:
            continue
        value = draw(st.one_of(st.just(DELETE), JSON_VALUES))
        if value is DELETE:
            target.pop(name, None)
        else:
            target[name] = value
    return data


def field_checks_verdict(kind: str, text: str) -> str | None:
    """The error code of the field-by-field checks for this frame, None if they accept it.

    They see what the relay's parser reads (orjson turns an integer beyond 64 bits into
    a float), as parse_frame and route do."""
    try:
        relay._check_fields(kind, orjson.loads(text))
    except ProtocolError as exc:
        return exc.code
    return None


@given(relayed_frames())
def test_fast_accept_agrees_with_the_field_checks(data: dict[str, Any]) -> None:
    """parse_frame's shortcut for well-formed relayed frames accepts exactly
    what the field-by-field checks accept, which name what is wrong otherwise."""
    text = json.dumps(data)
    expected = field_checks_verdict(data["type"], text)
    try:
        relay.parse_frame(text, 65_536)
        got = None
    except ProtocolError as exc:
        got = exc.code
    assert got == expected


@given(relayed_frames())
def test_route_shortcut_agrees_with_the_field_checks(data: dict[str, Any]) -> None:
    """route()'s own lines for relayed frames forward exactly what the
    field-by-field checks accept, and refuse the rest with their code."""
    text = json.dumps(data)
    expected = field_checks_verdict(data["type"], text)
    state, _ = make_state()
    patient = joined_conn(state, "s1", "patient")
    practitioner = joined_conn(state, "s1", "practitioner")
    got = relay.route(state, patient, text)
    if expected is None:
        assert got == practitioner
        assert state.stats.frames[data["type"]] == 1
    else:
        assert isinstance(got, list)
        assert error_code(got, patient) == expected
        assert sum(state.stats.frames.values()) == 0


def test_frame_exactly_at_limit_is_accepted() -> None:
    """The size limit is inclusive and counted in UTF-8 bytes."""
    message = json.dumps({"type": "offer", "sdp": ""})
    padded = message[:-2] + "é" * ((100 - len(message)) // 2) + '"}'
    size = len(padded.encode())
    assert relay.parse_frame(padded, size)[0] == "offer"
    with pytest.raises(ProtocolError, match="over the"):
        relay.parse_frame(padded, size - 1)


# -- seats and routing ------------------------------------------------------------


def test_seat_store_contract(seat_store: Callable[[], relay.SeatStore]) -> None:
    """A store seats, frees and holds exactly as the core relies on (opener back when empty)."""
    store = seat_store()
    first, second = relay.Seat(1, "k1", resumed=False), relay.Seat(2, "k2", resumed=True)
    assert store.take("s1", "patient", first, "10.0.0.1") is True
    assert store.take("s1", "practitioner", second, "10.0.0.2") is False
    assert store.sessions == {"s1": {"patient": first, "practitioner": second}}
    assert (store.session_count(), store.seats_taken()) == (1, 2)
    assert store.release("s1", "patient") == (first, None)
    store.hold("s1", "patient", "k1", 100.0)
    assert store.holder("s1", "patient", 99.0) == ("k1", 100.0)
    assert store.release("s1", "practitioner") == (second, "10.0.0.1")
    assert (store.sessions, store.session_count(), store.seats_taken()) == ({}, 0, 0)
    assert store.holder("s1", "patient", 100.0) is None  # expired at its deadline
    store.hold("s1", "patient", "k1", 200.0)
    store.unhold("s1", "patient")
    assert store.holder("s1", "patient", 150.0) is None


@pytest.mark.parametrize("first", ["patient", "practitioner"])
def test_either_side_joins_first(first: str) -> None:
    """Whoever joins second sees peer: true; the first gets peer-joined."""
    state, _ = make_state()
    second = relay.OTHER_ROLE[first]
    a = joined_conn(state, "s1", first)
    b, _ = relay.connect(state)
    actions = send(state, b, type="join", session="s1", role=second)
    (joined,) = frames_to(actions, b)
    assert joined["peer"] is True
    assert frames_to(actions, a) == [{"type": "peer-joined", "role": second, "resumed": False}]


def test_frames_forwarded_verbatim_to_other_seat_only() -> None:
    """offer/answer/candidate go verbatim to the other seat of the same session."""
    state, _ = make_state()
    patient, practitioner = (
        joined_conn(state, "s1", "patient"),
        joined_conn(state, "s1", "practitioner"),
    )
    other_session = joined_conn(state, "s2", "practitioner")
    text = '{"type": "offer", "sdp": "v=0", "x": 1}'
    assert relay.receive(state, patient, text) == [Send(practitioner, text)]
    answer = '{"type":"answer","sdp":"v=0"}'
    assert relay.receive(state, practitioner, answer) == [Send(patient, answer)]
    assert state.stats.frames["offer"] == 1
    assert frames_to(relay.receive(state, patient, text), other_session) == []


def test_role_taken_and_seat_unchanged() -> None:
    """A second claim on a taken role is refused and changes nothing."""
    state, _ = make_state()
    first = joined_conn(state, "s1", "patient")
    intruder, _ = relay.connect(state)
    actions = send(state, intruder, type="join", session="s1", role="patient")
    assert error_code(actions, intruder) == "role-taken"
    assert state.sessions["s1"]["patient"].conn == first
    assert state.conns[intruder].session is None


def test_resume_replaces_stale_connection_of_its_own_seat() -> None:
    """The resume key replaces the stale connection (closed 4001) and tells the peer."""
    state, _ = make_state()
    stale, _ = relay.connect(state)
    key = frames_to(send(state, stale, type="join", session="s1", role="patient"), stale)[0][
        "resume"
    ]
    practitioner = joined_conn(state, "s1", "practitioner")
    fresh, _ = relay.connect(state)
    actions = send(state, fresh, type="join", session="s1", role="patient", resume=key)
    assert Close(stale, relay.CLOSE_REPLACED, "replaced") in actions
    (joined,) = frames_to(actions, fresh)
    assert joined["resumed"] is True and joined["peer"] is True
    # A fresh key at every join: the one just used no longer takes the seat.
    assert joined["resume"] != key
    assert relay.verify_resume(state.resume_secret, joined["resume"], "s1", "patient")
    assert frames_to(actions, practitioner) == [
        {"type": "peer-joined", "role": "patient", "resumed": True}
    ]
    # The stale connection's late disconnect frees nothing.
    assert relay.disconnect(state, stale) == []
    assert state.sessions["s1"]["patient"].conn == fresh


@pytest.mark.parametrize(
    ("session", "role"),
    [
        pytest.param("s1", "practitioner", id="other-role"),
        pytest.param("s2", "patient", id="other-session"),
    ],
)
def test_resume_key_opens_no_other_seat(session: str, role: str) -> None:
    """A resume key for one seat never replaces another seat's connection."""
    state, _ = make_state()
    patient, _ = relay.connect(state)
    key = frames_to(send(state, patient, type="join", session="s1", role="patient"), patient)[0][
        "resume"
    ]
    holder = joined_conn(state, session, role)
    thief, _ = relay.connect(state)
    actions = send(state, thief, type="join", session=session, role=role, resume=key)
    assert error_code(actions, thief) == "role-taken"
    assert state.sessions[session][role].conn == holder


def test_verified_resume_key_takes_a_free_seat_after_a_restart() -> None:
    """A key signed with the relay's secret takes the free seat, resumed, in a new relay."""
    secret = b"r" * 32
    before, _ = make_state()
    before.resume_secret = secret
    conn = joined_conn(before, "s1", "patient")
    key = before.sessions["s1"]["patient"].resume
    assert conn in before.conns
    after, _ = make_state()  # the restarted relay: no seats, the same secret
    after.resume_secret = secret
    practitioner = joined_conn(after, "s1", "practitioner")
    fresh, _ = relay.connect(after)
    actions = send(after, fresh, type="join", session="s1", role="patient", resume=key)
    (joined,) = frames_to(actions, fresh)
    assert joined["resumed"] is True and joined["peer"] is True
    assert frames_to(actions, practitioner) == [
        {"type": "peer-joined", "role": "patient", "resumed": True}
    ]
    assert after.stats.resumes == 1


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("anything", id="made-up"),
        pytest.param("r1" + "A" * 40, id="right-shape-wrong-mac"),
        pytest.param("k" * 22, id="old-random-key"),
    ],
)
def test_made_up_resume_key_is_no_resume(key: str) -> None:
    """A key the relay did not sign joins a free seat as a fresh client: resumed false."""
    state, _ = make_state()
    practitioner = joined_conn(state, "s1", "practitioner")
    conn, _ = relay.connect(state)
    actions = send(state, conn, type="join", session="s1", role="patient", resume=key)
    (joined,) = frames_to(actions, conn)
    assert joined["resumed"] is False and joined["resume"] != key
    assert frames_to(actions, practitioner) == [
        {"type": "peer-joined", "role": "patient", "resumed": False}
    ]
    assert state.stats.resumes == 0


def test_resume_key_from_another_secret_is_no_resume() -> None:
    """A key signed with another relay's secret is not verified."""
    state, _ = make_state()
    key = relay.mint_resume(b"another secret", "s1", "patient")
    conn, _ = relay.connect(state)
    (joined,) = frames_to(
        send(state, conn, type="join", session="s1", role="patient", resume=key), conn
    )
    assert joined["resumed"] is False


def test_unclean_drop_holds_the_seat_for_its_key_alone() -> None:
    """After an unclean drop, only the previous key takes the seat during the grace period."""
    state, _ = make_state(limits={"resume_grace_s": 30})
    patient = joined_conn(state, "s1", "patient")
    key = state.sessions["s1"]["patient"].resume
    practitioner = joined_conn(state, "s1", "practitioner")
    actions = relay.disconnect(state, patient)
    assert frames_to(actions, practitioner) == [
        {"type": "peer-left", "role": "patient", "reason": "disconnected"}
    ]
    squatter, _ = relay.connect(state)
    forged = relay.mint_resume(b"guess", "s1", "patient")
    for fields in ({}, {"resume": "anything"}, {"resume": forged}):
        actions = send(state, squatter, type="join", session="s1", role="patient", **fields)
        assert error_code(actions, squatter) == "seat-held"
        assert Close(squatter, relay.CLOSE_TRY_AGAIN_LATER, "seat-held") in actions
        state.conns[squatter].closing = False  # the same client tries again
    back, _ = relay.connect(state)
    actions = send(state, back, type="join", session="s1", role="patient", resume=key)
    assert frames_to(actions, back)[0]["resumed"] is True
    assert frames_to(actions, practitioner) == [
        {"type": "peer-joined", "role": "patient", "resumed": True}
    ]


def test_held_seat_is_free_after_the_grace_period() -> None:
    """Once the grace period has passed, anyone with the link takes the seat (not resumed)."""
    state, clock = make_state(limits={"resume_grace_s": 30})
    patient = joined_conn(state, "s1", "patient")
    relay.disconnect(state, patient)
    clock.now += 30.5
    conn, _ = relay.connect(state)
    (joined,) = frames_to(send(state, conn, type="join", session="s1", role="patient"), conn)
    assert joined["type"] == "joined" and joined["resumed"] is False
    assert state.seats.holder("s1", "patient", clock.now) is None


def test_clean_close_and_bye_hold_no_seat() -> None:
    """A close frame (a page reload) or bye frees the seat for anyone at once."""
    state, _ = make_state()
    patient = joined_conn(state, "s1", "patient")
    relay.disconnect(state, patient, clean=True)
    other = joined_conn(state, "s1", "patient")
    send(state, other, type="bye")
    joined_conn(state, "s1", "patient")


def test_resume_key_is_stateless_hmac_of_session_role_and_nonce() -> None:
    """The key is r1 + nonce + HMAC: minted from the same nonce, it is the same anywhere."""
    nonce = bytes(range(12))
    key = relay.mint_resume(b"s" * 32, "s1", "patient", nonce)
    assert key == relay.mint_resume(b"s" * 32, "s1", "patient", nonce)
    assert len(key) == relay.RESUME_KEY_LEN and relay.RESUME_RE.fullmatch(key)
    assert relay.verify_resume(b"s" * 32, key, "s1", "patient")
    assert not relay.verify_resume(b"s" * 32, key, "s1", "practitioner")
    assert not relay.verify_resume(b"s" * 32, key, "s2", "patient")
    assert not relay.verify_resume(b"x" * 32, key, "s1", "patient")


def test_bye_forwarded_then_peer_left_and_seat_freed() -> None:
    """bye is forwarded verbatim, followed by peer-left; the session goes when empty."""
    state, _ = make_state()
    patient, practitioner = (
        joined_conn(state, "s1", "patient"),
        joined_conn(state, "s1", "practitioner"),
    )
    bye = '{"type":"bye","reason":"done"}'
    actions = relay.receive(state, practitioner, bye)
    assert actions == [
        Send(patient, bye),
        Send(patient, relay.frame("peer-left", role="practitioner", reason="bye")),
        relay.JoinDeadline(practitioner, 1),  # seatless again: the join deadline restarts
    ]
    assert "practitioner" not in state.sessions["s1"]
    relay.disconnect(state, patient)
    assert state.sessions == {}
    # The connection that said bye may join again.
    assert frames_to(
        send(state, practitioner, type="join", session="s1", role="practitioner"), practitioner
    )


def test_disconnect_is_not_bye() -> None:
    """A dropped connection frees its seat with reason 'disconnected'."""
    state, _ = make_state()
    patient, practitioner = (
        joined_conn(state, "s1", "patient"),
        joined_conn(state, "s1", "practitioner"),
    )
    actions = relay.disconnect(state, practitioner)
    assert frames_to(actions, patient) == [
        {"type": "peer-left", "role": "practitioner", "reason": "disconnected"}
    ]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        pytest.param({"session": "a b", "role": "patient"}, "bad-session", id="space"),
        pytest.param({"session": "", "role": "patient"}, "bad-session", id="empty"),
        pytest.param({"session": "x" * 65, "role": "patient"}, "bad-session", id="65-chars"),
        pytest.param({"session": "s", "role": "doctor"}, "bad-role", id="bad-role"),
        pytest.param({"role": "patient"}, "missing-field", id="no-session"),
        pytest.param({"session": "s"}, "missing-field", id="no-role"),
        pytest.param({"session": 5, "role": "patient"}, "bad-field", id="session-number"),
        pytest.param(
            {"session": "s", "role": "patient", "token": 1}, "bad-field", id="token-number"
        ),
        pytest.param(
            {"session": "s", "role": "patient", "resume": "a/b"}, "bad-field", id="bad-resume"
        ),
    ],
)
def test_join_refused(fields: dict[str, Any], code: str) -> None:
    """A join with a bad field is refused with its code and takes no seat."""
    state, _ = make_state()
    conn, _ = relay.connect(state)
    assert error_code(send(state, conn, type="join", **fields), conn) == code
    assert state.sessions == {}


def test_session_id_of_64_chars_accepted() -> None:
    """Session ids are 1-64 characters of [A-Za-z0-9_-]."""
    state, _ = make_state()
    joined_conn(state, "A-z_9" + "x" * 59, "patient")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param({"type": "offer", "sdp": "v=0"}, "not-joined", id="offer"),
        pytest.param({"type": "bye"}, "not-joined", id="bye"),
    ],
)
def test_frames_before_join_refused(frame: dict[str, Any], code: str) -> None:
    """Only join and ping are accepted before join."""
    state, _ = make_state()
    conn, _ = relay.connect(state)
    assert error_code(send(state, conn, **frame), conn) == code
    assert frames_to(send(state, conn, type="ping"), conn) == [{"type": "pong"}]


def test_already_joined_and_no_peer() -> None:
    """A second join and a frame with nobody to receive it are refused."""
    state, _ = make_state()
    conn = joined_conn(state, "s1", "patient")
    assert error_code(send(state, conn, type="join", session="s2", role="patient"), conn) == (
        "already-joined"
    )
    assert error_code(send(state, conn, type="offer", sdp="v=0"), conn) == "no-peer"
    assert list(state.sessions) == ["s1"]


# -- limits -----------------------------------------------------------------------


def test_rate_limit_token_bucket() -> None:
    """Past the burst, frames are refused until the bucket refills at the configured rate."""
    state, clock = make_state(limits={"frames_per_second": 10, "burst": 3})
    conn, _ = relay.connect(state)
    for _ in range(3):
        assert frames_to(send(state, conn, type="ping"), conn) == [{"type": "pong"}]
    assert error_code(send(state, conn, type="ping"), conn) == "rate-limited"
    clock.now += 0.1
    assert frames_to(send(state, conn, type="ping"), conn) == [{"type": "pong"}]
    assert error_code(send(state, conn, type="ping"), conn) == "rate-limited"
    assert state.stats.errors["rate-limited"] == 2


def test_relayed_frames_and_control_frames_share_one_bucket() -> None:
    """Relayed frames (route's own lines) and pings or pongs take from the same
    token bucket, and a relayed frame past it is refused with rate-limited."""
    state, clock = make_state(limits={"frames_per_second": 10, "burst": 3})
    patient = joined_conn(state, "s1", "patient")
    practitioner = joined_conn(state, "s1", "practitioner")
    clock.now += 1.0  # the joins' tokens back
    offer = json.dumps({"type": "offer", "sdp": "v=0"})
    assert relay.route(state, patient, offer) == practitioner
    assert relay.control_frame(state, patient) == []
    assert relay.route(state, patient, offer) == practitioner
    refused = relay.route(state, patient, offer)
    assert isinstance(refused, list)
    assert error_code(refused, patient) == "rate-limited"
    assert relay.control_frame(state, patient) == [Close(patient, 1008, "rate-limited")]
    assert state.stats.frames["offer"] == 2


@given(
    st.sampled_from([1, 2, 8, 64]),
    st.integers(min_value=1, max_value=20),
    st.lists(st.tuples(st.integers(0, 128), st.booleans()), max_size=60),
)
def test_frame_budget_is_a_token_bucket(
    rate: int, burst: int, steps: list[tuple[int, bool]]
) -> None:
    """The frame budget kept as one time (route, _take_token) refuses exactly the
    frames that a bucket of `burst` tokens refilled at `rate` a second refuses."""
    state, clock = make_state(limits={"frames_per_second": rate, "burst": burst})
    conn, _ = relay.connect(state)
    tokens, last = Fraction(burst), Fraction(clock.now)
    for sixty_fourths, control in steps:
        clock.now += sixty_fourths / 64  # exact in a float, as every sum here
        now = Fraction(clock.now)
        tokens, last = min(Fraction(burst), tokens + (now - last) * rate), now
        expected = tokens >= 1
        tokens -= expected
        if control:
            taken = relay.control_frame(state, conn) == []
            if not taken:
                state.conns[conn].closing = False  # go on counting after the close
        else:
            actions = relay.receive(state, conn, json.dumps({"type": "ping"}))
            taken = frames_to(actions, conn) == [{"type": "pong"}]
        assert taken == expected


def test_server_full_connections() -> None:
    """Past max_connections, a new connection gets server-full and is closed with 1013."""
    state, _ = make_state(limits={"max_connections": 1})
    relay.connect(state)
    conn, actions = relay.connect(state)
    assert error_code(actions, conn) == "server-full"
    assert Close(conn, 1013, "server-full") in actions
    assert send(state, conn, type="ping") == []


def test_server_full_sessions() -> None:
    """Past max_sessions, a join that would open a new session is refused and closed."""
    state, _ = make_state(limits={"max_sessions": 1})
    joined_conn(state, "s1", "patient")
    joined_conn(state, "s1", "practitioner")  # an existing session still fills
    conn, _ = relay.connect(state)
    actions = send(state, conn, type="join", session="s2", role="patient")
    assert error_code(actions, conn) == "server-full"
    assert Close(conn, 1013, "server-full") in actions


def test_join_timeout_only_before_first_join() -> None:
    """The join deadline closes a connection that never joined (1008), nothing else."""
    state, _ = make_state()
    idle, _ = relay.connect(state)
    actions = relay.join_expired(state, idle)
    assert error_code(actions, idle) == "join-timeout"
    assert Close(idle, 1008, "join-timeout") in actions
    member = joined_conn(state, "s1", "patient")
    assert relay.join_expired(state, member) == []


# -- tokens and TURN credentials ---------------------------------------------------------


def test_token_round_trip_and_binding() -> None:
    """A token opens exactly its session and role, until its expiry."""
    token = relay.mint_token(SECRET, "s1", "patient", 2_000)
    relay.check_token(SECRET, token, "s1", "patient", 1_999)
    for session, role in [("s2", "patient"), ("s1", "practitioner")]:
        with pytest.raises(ProtocolError) as caught:
            relay.check_token(SECRET, token, session, role, 1_999)
        assert caught.value.code == "bad-token"
    with pytest.raises(ProtocolError) as caught:
        relay.check_token(SECRET, token, "s1", "patient", 2_001)
    assert caught.value.code == "token-expired"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("v2.99999999999.abc", id="wrong-version"),
        pytest.param("v1.-5.abc", id="negative-expiry"),
        pytest.param("v1.99999999999.", id="no-signature"),
        pytest.param("v1.99999999999.AAAA", id="wrong-signature"),
    ],
)
def test_malformed_tokens(token: str | None) -> None:
    """Missing, malformed and forged tokens are bad-token."""
    with pytest.raises(ProtocolError) as caught:
        relay.check_token(SECRET, token, "s1", "patient", 0)
    assert caught.value.code == "bad-token"


def test_forged_token_with_other_secret() -> None:
    """A token signed with another secret is refused."""
    token = relay.mint_token("other", "s1", "patient", 2_000)
    with pytest.raises(ProtocolError, match="not valid"):
        relay.check_token(SECRET, token, "s1", "patient", 0)


def test_join_requires_token_when_secret_set() -> None:
    """With auth.secret, joins need a valid token; the right one takes the seat."""
    state, clock = make_state(auth={"secret": SECRET})
    conn, _ = relay.connect(state)
    assert (
        error_code(send(state, conn, type="join", session="s1", role="patient"), conn)
        == "bad-token"
    )
    token = relay.mint_token(SECRET, "s1", "patient", int(clock.now) + 60)
    actions = send(state, conn, type="join", session="s1", role="patient", token=token)
    assert frames_to(actions, conn)[0]["type"] == "joined"


def test_token_with_not_before_opens_only_inside_its_window() -> None:
    """A v2 token is token-not-yet-valid before its not-before, valid inside, expired after."""
    token = relay.mint_token(SECRET, "s1", "patient", 2_000, not_before=1_000)
    assert token.startswith("v2.1000.2000.")
    with pytest.raises(ProtocolError) as caught:
        relay.check_token(SECRET, token, "s1", "patient", 999)
    assert caught.value.code == "token-not-yet-valid"
    assert relay.check_token(SECRET, token, "s1", "patient", 1_000) == (1_000, 2_000)
    with pytest.raises(ProtocolError) as caught:
        relay.check_token(SECRET, token, "s1", "patient", 2_001)
    assert caught.value.code == "token-expired"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("v2.1000.2000", id="no-signature-part"),
        pytest.param("v2.01000.2000.AAAA", id="leading-zero"),
        pytest.param("v2.1\u0661000.2000.AAAA", id="arabic-digit"),
        pytest.param("v1.1000.2000.AAAA", id="v1-with-four-parts"),
    ],
)
def test_malformed_v2_tokens(token: str) -> None:
    """A v2 token in any other spelling is bad-token."""
    with pytest.raises(ProtocolError) as caught:
        relay.check_token(SECRET, token, "s1", "patient", 1_500)
    assert caught.value.code == "bad-token"


def test_moving_the_window_breaks_the_signature() -> None:
    """A v2 token whose not-before is edited (or dropped: v1) is bad-token."""
    token = relay.mint_token(SECRET, "s1", "patient", 2_000, not_before=1_500)
    signature = token.rsplit(".", 1)[1]
    for forged in (f"v2.1000.2000.{signature}", f"v1.2000.{signature}"):
        with pytest.raises(ProtocolError) as caught:
            relay.check_token(SECRET, forged, "s1", "patient", 1_600)
        assert caught.value.code == "bad-token"


def test_invite_gives_the_practitioner_a_patient_token_with_its_window() -> None:
    """A joined practitioner's invite is answered with a patient token for the same window."""
    state, clock = make_state(auth={"secret": SECRET})
    start, end = int(clock.now) - 10, int(clock.now) + 600
    own = relay.mint_token(SECRET, "s1", "practitioner", end, not_before=start)
    conn = joined_conn(state, "s1", "practitioner", token=own)
    (reply,) = frames_to(send(state, conn, type="invite", token=own), conn)
    assert reply == {
        "type": "invite",
        "session": "s1",
        "role": "patient",
        "token": relay.mint_token(SECRET, "s1", "patient", end, not_before=start),
        "expires": end,
    }


def test_invite_is_refused_to_a_patient() -> None:
    """A patient asking for an invitation gets not-practitioner; before join, not-joined."""
    state, _ = make_state()
    patient = joined_conn(state, "s1", "patient")
    assert error_code(send(state, patient, type="invite"), patient) == "not-practitioner"
    fresh, _ = relay.connect(state)
    assert error_code(send(state, fresh, type="invite"), fresh) == "not-joined"


def test_invite_without_auth_has_no_token() -> None:
    """Without auth.secret the invitation carries token null (the link needs none)."""
    state, _ = make_state()
    conn = joined_conn(state, "s1", "practitioner")
    (reply,) = frames_to(send(state, conn, type="invite"), conn)
    assert reply["token"] is None and reply["session"] == "s1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"[1]", "one JSON object", id="not-an-object"),
        pytest.param(b"{", "not valid JSON", id="bad-json"),
        pytest.param(b'{"ttl_s": "1h"}', "'ttl_s'", id="ttl-not-integer"),
        pytest.param(b'{"ttl_s": 10}', "'ttl_s'", id="ttl-too-short"),
        pytest.param(b'{"not_before": "2026-12-09"}', "'not_before'", id="not-before-text"),
        pytest.param(b'{"session": "mine"}', "'session'", id="unknown-field"),
    ],
)
def test_consultation_request_names_the_bad_field(body: bytes, message: str) -> None:
    """The API's body errors name the field (or say the body is not a JSON object)."""
    with pytest.raises(ProtocolError, match=message):
        relay.consultation_request(body, 3600)


def test_api_keys_are_hashes_and_need_the_token_secret() -> None:
    """api.keys must hold sha256: hashes, and needs auth.secret to sign the links."""
    good = relay.hash_api_key("k" * 32)
    with pytest.raises(relay.ConfigError, match=r"api\.keys\[0\]"):
        relay_config(auth={"secret": SECRET}, api={"keys": ["k" * 32]})
    with pytest.raises(relay.ConfigError, match=r"api\.keys: set auth\.secret"):
        relay_config(api={"keys": [good]})
    assert relay_config(auth={"secret": SECRET}, api={"keys": [good]}).api.keys == (good,)


def test_turn_rest_credentials() -> None:
    """joined carries TURN REST credentials that coturn's use-auth-secret accepts."""
    state, clock = make_state(
        turn={"secret": "turnsecret", "urls": ["turn:198.18.0.1:3478"], "ttl": 600}
    )
    conn, _ = relay.connect(state)
    (joined,) = frames_to(send(state, conn, type="join", session="s1", role="patient"), conn)
    (server,) = joined["ice_servers"]
    assert server["urls"] == ["turn:198.18.0.1:3478"]
    assert server["username"] == f"{int(clock.now) + 600}:s1-patient"
    digest = hmac.new(b"turnsecret", server["username"].encode(), hashlib.sha1).digest()
    assert server["credential"] == base64.b64encode(digest).decode()


def test_no_ice_servers_without_turn_secret() -> None:
    """Without turn.secret, joined has no ice_servers."""
    state, _ = make_state()
    conn, _ = relay.connect(state)
    (joined,) = frames_to(send(state, conn, type="join", session="s1", role="patient"), conn)
    assert "ice_servers" not in joined


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        pytest.param(
            {"limits": {"max_frame_bytes": "big"}}, "limits.max_frame_bytes", id="not-int"
        ),
        pytest.param({"limits": {"burst": 0}}, "limits.burst", id="zero"),
        pytest.param(
            {"limits": {"frames_per_second": -1}}, "limits.frames_per_second", id="negative"
        ),
        pytest.param({"limits": {"max_frame_byte": 1}}, "limits.max_frame_byte", id="typo"),
        pytest.param(
            {"limits": {"max_frame_bytes": 10, "hard_max_bytes": 10}},
            "limits.hard_max_bytes",
            id="hard-not-above",
        ),
        pytest.param({"relay": {"port": 70_000}}, "relay.port", id="port-range"),
        pytest.param({"relay": {"port": True}}, "relay.port", id="port-bool"),
        pytest.param({"auth": {"open": "yes"}}, "auth.open", id="open-not-bool"),
        pytest.param({"auth": []}, "auth", id="section-not-mapping"),
        pytest.param({"tls": {"cert": "c.pem"}}, "tls.key", id="cert-without-key"),
        pytest.param({"turn": {"urls": ["stun:x:3478"]}}, "turn.urls[0]", id="turn-url-scheme"),
        pytest.param([1], "(top level)", id="top-not-mapping"),
        pytest.param({"limts": {"burst": 5}}, "limts", id="unknown-section"),
        pytest.param({"call": {"media_timeout_s": 0.1}}, "call.media_timeout_s", id="call-min"),
        pytest.param({"cluster": {"redis_url": "http://x"}}, "cluster.redis_url", id="redis-url"),
        pytest.param({"cluster": {"node_id": "a b"}}, "cluster.node_id", id="node-id"),
        pytest.param({"cluster": {"seat_ttl_s": 0}}, "cluster.seat_ttl_s", id="seat-ttl"),
        pytest.param({"limits": {"burst": 5.5}}, "limits.burst", id="integer-expected"),
        pytest.param(
            {"limits": {"frames_per_second": float("inf")}},
            "limits.frames_per_second",
            id="infinite",
        ),
        pytest.param(
            {"limits": {"join_timeout_s": float("nan")}}, "limits.join_timeout_s", id="nan"
        ),
    ],
)
def test_config_errors_name_their_key(data: object, key: str) -> None:
    """A bad configuration value is reported with its dotted key."""
    with pytest.raises(relay.ConfigError) as caught:
        relay.RelayConfig.from_mapping(data, env={})
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")


def test_yaml_error_names_the_position_not_the_line(tmp_path: Path) -> None:
    """A YAML syntax error names file, line and column, never the text of the line."""
    path = tmp_path / "c.yaml"
    path.write_text("auth:\n  secret: hunter2-very-secret\n  open: [\n", encoding="utf-8")
    with pytest.raises(relay.ConfigError) as caught:
        relay.RelayConfig.load(path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML at line 4, column 1")
    assert "hunter2" not in message
    assert len(message.splitlines()) == 1


def test_every_reader_refuses_the_same_unknown_section() -> None:
    """The relay, the peers and the local coturn read one file and refuse the same names."""
    from peers.config import PeerSettings
    from peers.turnserver import TurnServerSettings

    data = {"turn": {"secret": "s"}, "limts": {"burst": 5}}
    below = {"call": {"heartbeat_s": 0.01}}
    with pytest.raises(relay.ConfigError, match=r"^call\.heartbeat_s: "):
        PeerSettings.from_mapping(below)  # the peers read call: as the relay does
    readers: list[Callable[[], object]] = [
        lambda: relay.RelayConfig.from_mapping(data, env={}),
        lambda: PeerSettings.from_mapping(data),
        lambda: TurnServerSettings.from_mapping(data, env={}),
    ]
    for read in readers:
        with pytest.raises(relay.ConfigError) as caught:
            read()
        assert caught.value.key == "limts"
        assert "unknown section" in str(caught.value)


def test_shipped_config_loads_with_documented_defaults() -> None:
    """config.yaml as shipped loads, on loopback, with the documented defaults."""
    config = relay.RelayConfig.load(Path(relay.ROOT / "config.yaml"), env={})
    assert (config.host, config.port) == ("127.0.0.1", 5001)
    assert config.limits == relay.Limits()
    assert config.auth.secret is None
    assert config.cluster == relay.ClusterConfig()  # a relay alone, seats in memory


def test_redis_url_from_environment() -> None:
    """EPEDICARE_REDIS_URL overrides cluster.redis_url."""
    data = {"cluster": {"redis_url": "redis://127.0.0.1:1/0"}}
    env = {relay.REDIS_URL_ENV: "unix:///run/redis.sock"}
    config = relay.RelayConfig.from_mapping(data, env=env)
    assert config.cluster.redis_url == "unix:///run/redis.sock"


def test_secret_from_environment() -> None:
    """EPEDICARE_AUTH_SECRET overrides auth.secret."""
    config = relay.RelayConfig.from_mapping({}, env={relay.AUTH_SECRET_ENV: "from-env"})
    assert config.auth.secret == "from-env"


@pytest.mark.parametrize(
    ("host", "auth", "refused"),
    [
        pytest.param("127.0.0.1", {}, False, id="loopback-open"),
        pytest.param("::1", {}, False, id="ipv6-loopback"),
        pytest.param("localhost", {}, False, id="localhost"),
        pytest.param("0.0.0.0", {}, True, id="any-without-secret"),
        pytest.param("198.18.0.1", {"secret": "s"}, False, id="secret"),
        pytest.param("198.18.0.1", {"open": True}, False, id="explicitly-open"),
    ],
)
def test_exposure_rule(host: str, auth: dict[str, Any], refused: bool) -> None:
    """Beyond loopback the relay needs auth.secret, or auth.open: true."""
    config = relay.RelayConfig.from_mapping({"relay": {"host": host}, "auth": auth}, env={})
    if refused:
        with pytest.raises(relay.ConfigError, match=r"^auth\.secret: required"):
            config.check_exposure()
    else:
        config.check_exposure()


@pytest.mark.parametrize(
    ("ice", "key"),
    [
        ({"servers": "stun:x"}, "ice.servers"),
        ({"servers": [{"urls": 5}]}, "ice.servers[0].urls"),
        ({"servers": [{"urls": "turn:x", "username": 1}]}, "ice.servers[0].username"),
        ({"policy": "sometimes"}, "ice.policy"),
        ({"polcy": "all"}, "ice.polcy"),
    ],
)
def test_ice_section_errors_name_their_key(ice: dict[str, Any], key: str) -> None:
    with pytest.raises(relay.ConfigError) as caught:
        relay_config(ice=ice)
    assert caught.value.key == key


def test_turn_ttl_is_capped_at_a_day() -> None:
    """turn.ttl over 86400 s is refused, naming the key."""
    with pytest.raises(relay.ConfigError) as refused:
        relay_config(turn={"ttl": 86_401})
    assert refused.value.key == "turn.ttl"


@pytest.mark.parametrize("key", ["frames_per_second", "join_timeout_s", "resume_grace_s"])
def test_infinite_limits_are_refused(key: str) -> None:
    """.inf (or nan) for a limit is refused with the key's name."""
    for value in (float("inf"), float("nan")):
        with pytest.raises(relay.ConfigError) as refused:
            relay_config(limits={key: value})
        assert refused.value.key == f"limits.{key}"


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    """raise_fd_limit lifts the soft RLIMIT_NOFILE to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 512), hard))
        relay.raise_fd_limit(100)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- reconnect storms (issue 14, point 11) -------------------------------------------------------


def test_the_pacer_assumes_reconnect_rate_until_it_has_measured_its_own() -> None:
    """rate() is limits.reconnect_rate with few completions, then what completed per second."""
    pacer = relay.HandshakePacer(500.0)
    for n in range(relay.HANDSHAKE_RATE_MIN_SAMPLES - 1):
        pacer.completed(100.0 + n / 100)
    assert pacer.rate(100.5) == 500.0
    for n in range(200):  # 100 a second over the window
        pacer.completed(101.0 + n / 100)
    assert pacer.rate(103.0) == pytest.approx(100.0, rel=0.02)
    assert pacer.rate(200.0) == 500.0  # the window is empty again


def test_each_refused_client_gets_the_next_place_after_those_in_progress() -> None:
    """retry_after(): 1 / rate apart after in_progress / rate, whole seconds, 1 to 60."""
    pacer = relay.HandshakePacer(10.0)
    places = [pacer.retry_after(50.0, 20) for _ in range(25)]
    # In progress: 2 s of work; then one every 0.1 s: 2.1, 2.2, ... 4.5 s, rounded up.
    assert places == [3] * 9 + [4] * 10 + [5] * 6
    assert pacer.retry_after(60.0, 0) == 1  # the schedule drained: at once (at least 1 s)
    assert relay.HandshakePacer(0.01).retry_after(0.0, 100) == relay.BUSY_RETRY_MAX_S


def test_a_stopping_relay_gives_its_clients_one_place_each() -> None:
    """restart_delays(n): n delays 1 / reconnect_rate apart from 0; the reason says each."""
    assert relay.HandshakePacer(4.0).restart_delays(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert relay.RECONNECT_REASON.format(0.25) == "relay shutting down; reconnect in 0.25 s"
    assert len(relay.RECONNECT_REASON.format(86_400).encode()) <= 123  # a close reason's limit


@pytest.mark.parametrize(
    "value", [0, -5, "fast", float("inf")], ids=["zero", "negative", "text", "inf"]
)
def test_reconnect_rate_must_be_a_positive_number(value: object) -> None:
    """limits.reconnect_rate: a finite number above 0, else an error naming it."""
    with pytest.raises(relay.ConfigError, match=r"^limits\.reconnect_rate: expected a number"):
        relay.RelayConfig.from_mapping({"limits": {"reconnect_rate": value}})
