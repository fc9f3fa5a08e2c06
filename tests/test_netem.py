"""The link emulator (tests/netem.py): netem's arithmetic, then what the probe measures.

The first tier checks ``Shaper``, the pure core, with a seeded random source
and no I/O. The second builds two namespaces joined by one veth, impairs one
side's interface and measures through it with the probe (root only).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
from typing import Any

import pytest

from peers.netns import Netns
from tests import netem
from tests.mediacheck import needs_root
from tests.netem import GilbertElliott, Impairment, Link, LinkError, Shaper
from tests.support import within

MS = 1_000_000  # ns

# -- the pure core ---------------------------------------------------------------------------


def test_fixed_delay_sets_each_time_to_send_exactly() -> None:
    """A fixed delay puts every packet's time to send exactly that far after its arrival."""
    shaper = Shaper(Impairment(delay_ms=50))
    assert [shaper.admit(t * MS, 100) for t in (0, 3, 7)] == [50 * MS, 53 * MS, 57 * MS]


def test_jitter_draws_uniformly_within_its_bounds() -> None:
    """Packets further apart than the jitter range get delays uniform in [delay - j, delay + j)."""
    shaper = Shaper(Impairment(delay_ms=50, jitter_ms=10, limit=10**6), random.Random(1))
    delays = [(shaper.admit(t * 25 * MS, 100) or 0) / MS - t * 25 for t in range(2000)]
    assert 40 <= min(delays) < 40.1
    assert 59.9 < max(delays) < 60
    assert abs(sum(delays) / len(delays) - 50) < 0.5  # uniform: sd 5.8 ms, mean's sd 0.13 ms


def test_jitter_never_lets_a_packet_overtake_another() -> None:
    """Packets 1 ms apart with 10 ms jitter leave in order, none before its own minimum delay."""
    shaper = Shaper(Impairment(delay_ms=50, jitter_ms=10, limit=10**6), random.Random(1))
    sent = [shaper.admit(t * MS, 100) or 0 for t in range(2000)]
    assert sent == sorted(sent)
    delays = [(s - t * MS) / MS for t, s in enumerate(sent)]
    assert min(delays) >= 40
    assert max(delays) < 60  # held behind an earlier packet: never past that one's bound


def test_jitter_reorders_only_when_asked() -> None:
    """With reorder=True jitter reorders packets, as netem without rate does."""
    shaper = Shaper(Impairment(delay_ms=50, jitter_ms=10, reorder=True), random.Random(1))
    sent = [shaper.admit(t * MS, 100) for t in range(200)]
    assert sent != sorted(sent, key=lambda s: s or 0)


def test_rate_spaces_packets_by_their_transmission_time() -> None:
    """At 300 kbit/s back-to-back 1000-byte packets leave (1000 + 14) * 8 / 300 ms apart."""
    shaper = Shaper(Impairment(delay_ms=40, rate_kbit=300))
    times = [shaper.admit(0, 1000) for _ in range(3)]
    step = round(1014 * 8 / 300_000 * 1e9)
    assert times == [40 * MS + step, 40 * MS + 2 * step, 40 * MS + 3 * step]


def test_queue_bound_tail_drops_what_would_wait_longer() -> None:
    """A 100 ms buffer at 300 kbit/s holds 3750 bytes: the fourth 1000-byte packet is dropped."""
    shaper = Shaper(Impairment(rate_kbit=300, queue_ms=100))
    verdicts = [shaper.admit(0, 986) for _ in range(5)]  # 1000 bytes on the wire each
    assert [v is not None for v in verdicts] == [True, True, True, False, False]
    assert shaper.counters.overflow == 2


def test_limit_tail_drops_beyond_the_packets_held() -> None:
    """netem's limit: with 3 packets held, the next is dropped until one leaves."""
    shaper = Shaper(Impairment(delay_ms=10, limit=3))
    assert [shaper.admit(0, 100) is not None for _ in range(4)] == [True, True, True, False]
    shaper.sent(10 * MS, 10 * MS, 100)
    assert shaper.admit(1, 100) is not None


def test_outage_drops_everything() -> None:
    """During an outage no packet is admitted, and each is counted as blacked out."""
    shaper = Shaper(Impairment(outage=True))
    assert {shaper.admit(t, 100) for t in range(50)} == {None}
    assert shaper.counters.blackout == 50


def test_gilbert_elliott_loss_is_bursty_at_its_stationary_rate() -> None:
    """Gilbert-Elliott (p=1 %, r=25 %) loses about 3.8 % of packets, in bursts of 4 on average."""
    ge = GilbertElliott(p=0.01, r=0.25)
    shaper = Shaper(Impairment(burst=ge, limit=10**6), random.Random(7))
    lost = [shaper.admit(t, 100) is None for t in range(100_000)]
    bursts = sum(1 for i, x in enumerate(lost) if x and (i == 0 or not lost[i - 1]))
    assert abs(sum(lost) / len(lost) - ge.mean_loss) < 0.005
    assert 3 < sum(lost) / bursts < 5  # mean burst length 1 / r = 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": 5}, "Impairment.loss: expected a number from 0 to 1, got 5"),
        ({"delay_ms": -1}, "Impairment.delay_ms: expected a number >= 0, got -1"),
        ({"delay_ms": 10, "jitter_ms": 20}, "Impairment.jitter_ms: expected a number from 0 to 10"),
        ({"queue_ms": 50}, "Impairment.queue_ms: a queue bound needs rate_kbit"),
        ({"rate_kbit": math.inf}, "Impairment.rate_kbit: expected a number >= 1, got inf"),
        ({"limit": 0}, "Impairment.limit: expected a whole number >= 1, got 0"),
    ],
    ids=["loss-as-percent", "negative-delay", "jitter-over-delay", "queue-without-rate", "inf-rate",
         "zero-limit"],
)  # fmt: skip
def test_bad_settings_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    """A bad setting is refused with the field's name and what was expected."""
    with pytest.raises(ValueError, match=f"^{message}"):
        Impairment(**kwargs)


# -- through a real link (root) ----------------------------------------------------------------


def binomial_bounds(n: int, p: float, tail: float) -> tuple[int, int]:
    """The smallest lo and largest hi with P(X < lo) <= tail and P(X > hi) <= tail, X ~ B(n, p)."""

    def pmf(k: int) -> float:
        log = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        return math.exp(log + k * math.log(p) + (n - k) * math.log1p(-p))

    lo, below = 0, 0.0
    while below + pmf(lo) <= tail:
        below += pmf(lo)
        lo += 1
    hi, above = n, 0.0
    while above + pmf(hi) <= tail:
        above += pmf(hi)
        hi -= 1
    return lo, hi


@pytest.mark.netns
@needs_root
@pytest.mark.asyncio
async def test_delay_measured_is_delay_set(link_pair: tuple[Netns, Netns, str]) -> None:
    """50 ms set on a's egress measures 50 ms one way: never less, p50 within 1 ms, p95 within 2."""
    a, b, dev = link_pair
    async with Link(a, dev, egress=Impairment(delay_ms=50)):
        result = await within(netem.probe(a, b, count=500, rate_pps=200), 3)
    forward = sorted(result.forward_ms)
    assert len(forward) == 500
    assert forward[0] >= 50.0, forward[:5]
    assert netem.percentile(forward, 50) < 51.0, forward[245:255]
    assert netem.percentile(forward, 95) < 52.0, forward[-30:]
    assert netem.percentile(result.backward_ms, 50) < 1.0
    assert result.reordered == 0


@pytest.mark.netns
@needs_root
@pytest.mark.asyncio
async def test_loss_measured_is_loss_set(link_pair: tuple[Netns, Netns, str]) -> None:
    """5 % loss on a's egress: of 4000 packets, as many are lost as B(4000, 0.05) allows.

    Each packet is lost independently with p = 0.05 (netem's ``loss random``),
    so the count lost is binomial, B(n = 4000, p = 0.05): mean 200, standard
    deviation 13.8. The accepted range [lo, hi] is computed exactly from that
    distribution (``binomial_bounds``) so that each tail outside it has
    probability at most 1e-6: 138 to 269 lost (3.45 % to 6.73 %). A correct
    emulator fails this about once in 500,000 runs. One that loses 2.5 % passes
    with probability 0.0002, 3 % with 0.055, 7.5 % with 0.032, 10 % or nothing
    never. The way back is not impaired and loses nothing; the emulator's own
    count of losses equals the probe's (nothing else drops).
    """
    a, b, dev = link_pair
    n, p = 4000, 0.05
    async with Link(a, dev, egress=Impairment(loss=p)) as link:
        result = await within(netem.probe(a, b, count=n, rate_pps=1000), 3)
        stats = await link.stats()
    lost = n - len(result.arrived_ns)
    lo, hi = binomial_bounds(n, p, 1e-6)
    assert (lo, hi) == (138, 269)  # the docstring's figures
    assert lo <= lost <= hi, (lost, lo, hi)
    assert stats["directions"]["egress"]["lost"] == lost
    assert result.backward_loss == 0


@pytest.mark.netns
@needs_root
@pytest.mark.asyncio
async def test_rate_measured_is_rate_set(link_pair: tuple[Netns, Netns, str]) -> None:
    """300 kbit/s with a 100 ms buffer, offered twice that, delivers 300 kbit/s within 10 %."""
    a, b, dev = link_pair
    egress = Impairment(rate_kbit=300, queue_ms=100)
    async with Link(a, dev, egress=egress) as link:
        result = await within(netem.probe(a, b, count=225, rate_pps=75, payload=1000), 3)
        stats = await link.stats()
    assert result.offered_kbit > 450, result.offered_kbit  # well over the rate, however loaded
    assert 270 <= result.throughput_kbit <= 330, result.throughput_kbit
    assert stats["directions"]["egress"]["overflow"] > 30
    one_packet_ms = 1042 * 8 / 300
    # Without the buffer's bound the queue would grow by 300 kbit/s, to over a second in 3 s.
    assert max(result.forward_ms) < 100 + one_packet_ms + 10, max(result.forward_ms)


@pytest.mark.netns
@needs_root
@pytest.mark.asyncio
async def test_outage_blocks_everything_then_lets_it_through_at_once(
    link_pair: tuple[Netns, Netns, str],
) -> None:
    """Nothing passes during an outage, held packets included; after it, packets pass at once."""
    a, b, dev = link_pair
    async with Link(a, dev, both=Impairment(delay_ms=20)) as link:
        switched: list[int] = []

        async def flip(_: netem.ProbeResult) -> None:
            await asyncio.sleep(0.8)
            switched.append(await link.update(outage=True))
            await asyncio.sleep(0.8)
            switched.append(await link.update(outage=False))

        result = await within(netem.probe(a, b, count=500, rate_pps=200, during=flip), 3)
        stats = await link.stats()
    on, off = switched
    during = [s for s, t in result.sent_ns.items() if on <= t < off]
    after = [s for s, t in result.sent_ns.items() if t >= off]
    assert len(during) > 100 and len(after) > 100
    # Not one packet reached b while the link was down: those held when it went down were lost.
    assert not [t for t in result.arrived_ns.values() if on < t < off]
    assert all(s in result.returned_ns for s in after)
    first = min(after)  # the first packet sent once the link was back: through in its 20 ms
    assert result.arrived_ns[first] - result.sent_ns[first] < 25 * MS
    egress = stats["directions"]["egress"]
    assert egress["blackout"] > len(during)  # the held ones too
    assert egress["seen"] == egress["passed"] + egress["blackout"]


@pytest.mark.netns
@needs_root
@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["normal", "exception", "child-killed"])
async def test_nothing_is_left_after_the_block(
    link_pair: tuple[Netns, Netns, str], how: str
) -> None:
    """No rule, queue or child remains after the block, however it ended; the link is clean."""
    a, b, dev = link_pair
    link = Link(a, dev, both=Impairment(delay_ms=20))
    expected: contextlib.AbstractContextManager[object] = (
        pytest.raises(RuntimeError) if how == "exception" else contextlib.nullcontext()
    )
    with expected:
        async with link:
            assert len(await link.rules()) == 2
            pid = link.pid
            assert pid is not None
            if how == "exception":
                raise RuntimeError("the test failed")
            if how == "child-killed":
                os.kill(pid, signal.SIGKILL)
                with pytest.raises(LinkError, match="exited with status -9"):
                    await link.stats()
    assert await link.rules() == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert await netem.run_in(a, "cat", "/proc/net/netfilter/nfnetlink_queue") == ""
    result = await within(netem.probe(a, b, count=20, rate_pps=100, drain_s=0.2))
    assert len(result.returned_ns) == 20
    assert netem.percentile(result.rtt_ms, 50) < 5


@pytest.mark.netns
@needs_root
@pytest.mark.asyncio
async def test_unknown_interface_is_refused_by_name(link_pair: tuple[Netns, Netns, str]) -> None:
    """A link on an interface the namespace lacks fails at start, naming it, and leaves nothing."""
    a, _, _ = link_pair
    link = Link(a, "nope0", egress=Impairment(delay_ms=10))
    with pytest.raises(LinkError, match=r"^link emulator on .*: no interface 'nope0' in this"):
        await link.__aenter__()
    assert link.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(link.pid, 0)
    assert await link.rules() == []
