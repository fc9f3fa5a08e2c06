"""The peers' errors, each with a stable kebab-case ``code``, and the one retry policy.

::

    PeerError (RuntimeError)        code; str() reads as a sentence
    ├── SignalingError              the relay client stopped for good
    │   ├── JoinRefused             join-refused; an instance's code is the relay's
    │   │                           (one of FATAL_CODES: role-taken, bad-token, ...)
    │   ├── Replaced                replaced: another connection took the seat (close 4001)
    │   └── NotWebSocket            not-websocket: the relay URL answered HTTP, not a
    │                               WebSocket (a path other than /ws, another server)
    ├── CallFailed                  one call could not be made
    │   ├── IceFailed               ice-failed: no connection within ice.timeout_s
    │   ├── DtlsFailed              dtls-failed: ICE connected, the DTLS handshake failed
    │   │                           (not the network: never retried, ``bye`` says why)
    │   └── TurnUnavailable         turn-unavailable: a configured TURN server gave no
    │                               relay candidate (``url``, ``cause``)
    ├── MediaError                  media-error: a --video/--audio source cannot be opened
    └── NetworkError                network-error: a namespace, link or command in one failed

Configuration errors (``peers.config.ConfigError``) are the configuration
reader's own and name their key instead.

Retrying: ``is_fatal(code)`` says whether a relay's refusal is final (the same
list as ``FATAL_JOIN_CODES`` in web/js/signaling.js; a test compares them), and
``Backoff`` yields jittered, capped, exponential delays and starts again after a
successful join (``reset()``); after a relay restart the first delay is the
one the relay's close reason gives (``restart_delay``: "relay shutting down;
reconnect in 3.25 s"), or, from a relay that gives none, anywhere in
``RESTART_SPREAD_S``; an HTTP 503's ``Retry-After`` is honoured.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

__all__ = [
    "FATAL_CODES",
    "RESTART_SPREAD_S",
    "Backoff",
    "CallFailed",
    "DtlsFailed",
    "IceFailed",
    "JoinRefused",
    "MediaError",
    "NetworkError",
    "NotWebSocket",
    "PeerError",
    "Replaced",
    "SignalingError",
    "TurnUnavailable",
    "is_fatal",
    "relay_hint",
    "restart_delay",
]

# The first reconnection after a relay restart (close 1001/1012) waits a random
# moment in this many seconds, so that 10,000 clients do not come back in the
# same 100 ms (web/js/signaling.js: restartSpreadMs).
RESTART_SPREAD_S = 2.0

# A relay that stops tells each client when to come back, in its close reason
# (relay.py RECONNECT_REASON; web/js/signaling.js reads it the same way). A
# delay past RESTART_DELAY_MAX_S is taken as that.
RESTART_DELAY_RE = re.compile(r"reconnect in ([0-9]{1,6}(?:\.[0-9]{1,3})?) s")
RESTART_DELAY_MAX_S = 300.0


def restart_delay(reason: str) -> float | None:
    """The delay a relay's close reason asks before reconnecting, or None when it gives none."""
    found = RESTART_DELAY_RE.search(reason)
    return None if found is None else min(float(found.group(1)), RESTART_DELAY_MAX_S)


# Join refusals that retrying cannot fix: the person must change something.
FATAL_CODES = frozenset(
    {
        "bad-session",
        "bad-role",
        "role-taken",
        "bad-token",
        "token-expired",
        "token-not-yet-valid",
        "missing-field",
        "bad-field",
        "already-joined",
    }
)


def is_fatal(code: str | None) -> bool:
    """True when the relay's refusal ``code`` will not change by joining again."""
    return code in FATAL_CODES


class PeerError(RuntimeError):
    """The root of the peers' errors; ``code`` is stable, ``str()`` reads as a sentence."""

    code = "peer-error"


class SignalingError(PeerError):
    """The relay client stopped for good."""

    code = "signaling-error"


class JoinRefused(SignalingError):
    """The relay refused the join with a code that retrying cannot fix."""

    code = "join-refused"  # each instance carries the relay's own code instead

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Replaced(SignalingError):
    """Another connection took this seat over with its resume key."""

    code = "replaced"


class NotWebSocket(SignalingError):
    """The relay's URL answered with HTTP where a WebSocket was expected: never retried."""

    code = "not-websocket"

    def __init__(self, url: str, answer: str) -> None:
        super().__init__(f"relay {url}: {answer} instead of a WebSocket; {relay_hint(url)}")
        self.url = url
        self.answer = answer


def relay_hint(url: str) -> str:
    """What to check when the relay at ``url`` cannot be reached or is not a relay."""
    return f"is the relay running at {url}? the URL path must be /ws"


class CallFailed(PeerError):
    """A call could not be made."""

    code = "call-failed"


class IceFailed(CallFailed):
    """No connection could be made within the ICE timeout; the message says why."""

    code = "ice-failed"


class DtlsFailed(CallFailed):
    """ICE connected but the DTLS handshake failed: "DTLS handshake failed: <cause>"."""

    code = "dtls-failed"

    def __init__(self, cause: str) -> None:
        super().__init__(f"DTLS handshake failed: {cause}")
        self.cause = cause


class TurnUnavailable(CallFailed):
    """A configured TURN server gave no relayed candidate."""

    code = "turn-unavailable"

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"TURN server {url}: {cause}")
        self.url = url
        self.cause = cause


class MediaError(PeerError):
    """A media source or sink could not be opened; the message names it."""

    code = "media-error"


class NetworkError(PeerError):
    """A namespace, link or command inside one could not be set up."""

    code = "network-error"


class Backoff(Iterator[float]):
    """Jittered, capped exponential delays in seconds: ``next()`` for each retry.

    Attempt n waits between half and all of ``min(cap_s, base_s * 2**n)``;
    ``reset()`` after a successful join starts again from ``base_s``.
    ``after_restart(delay_s)`` is the first delay when the relay itself went
    away (close 1001 or 1012): every client of that relay comes back at
    once, so the relay gives each its moment (``restart_delay`` of the
    close reason) and an older relay that gives none leaves each to pick
    one anywhere in ``restart_spread_s``. ``busy()`` is the delay after an
    HTTP 503 with ``Retry-After`` (the relay has too many handshakes in
    progress; the value is this client's place in its queue): what it asks,
    plus up to a second or a tenth of it (whole seconds, and a cap, give many
    clients the same value).
    """

    def __init__(
        self,
        base_s: float = 0.5,
        cap_s: float = 5.0,
        *,
        restart_spread_s: float = RESTART_SPREAD_S,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"backoff: expected 0 < base_s <= cap_s, got {base_s}, {cap_s}")
        if restart_spread_s < 0:
            raise ValueError(f"backoff: expected restart_spread_s >= 0, got {restart_spread_s}")
        self.base_s, self.cap_s = base_s, cap_s
        self.restart_spread_s = restart_spread_s
        self.attempt = 0
        self._jitter = jitter or random.random  # not for cryptography: S311 does not apply

    def __next__(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return float(ceiling * (0.5 + 0.5 * self._jitter()))

    def after_restart(self, delay_s: float | None = None) -> float:
        """The first delay after the relay closed with 1001/1012: its own, else in the spread."""
        self.attempt += 1
        if delay_s is not None:
            return float(delay_s)
        return float(self.restart_spread_s * self._jitter())

    def busy(self, retry_after_s: float) -> float:
        """After HTTP 503 + Retry-After: what it asks (at least base_s), plus up to 1 s or 10 %."""
        self.attempt += 1
        asked = max(retry_after_s, self.base_s)
        return float(asked + max(1.0, asked / 10) * self._jitter())

    def reset(self) -> None:
        self.attempt = 0
