"""relay.py without its ``ApiBodyReader``: the baseline of bench-relay's handshake figure.

Never deployed (``POST /api/consultations`` cannot read its body here): it
runs the relay with ``RelayConnection`` reduced to websockets' own
``ServerConnection.__init__``, so that ``make bench-relay`` can measure what
wrapping the line reader of every connection costs a handshake.
"""

from __future__ import annotations

import sys
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.server import ServerProtocol

import relay


def _plain_init(self: relay.RelayConnection, protocol: ServerProtocol, *a: Any, **kw: Any) -> None:
    ServerConnection.__init__(self, protocol, *a, **kw)
    self.relay.live.add(self)


if __name__ == "__main__":
    relay.RelayConnection.__init__ = _plain_init  # type: ignore[method-assign]
    sys.exit(relay.main())
