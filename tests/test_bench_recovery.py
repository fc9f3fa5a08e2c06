"""How ``make bench-recovery`` reads a page's first frame again (bench/recovery.py, pure)."""

from __future__ import annotations

from bench.recovery import Sample, frame_after_stall

CALL = 0.5  # a call's identity, as the page reports it


def steady(start: float, stop: float, frames: int, call: float = CALL) -> list[Sample]:
    """Samples every 50 ms from ``start`` to ``stop``, one new frame in each."""
    count = round((stop - start) / 0.05)
    return [(start + 0.05 * i, frames + i, call) for i in range(count)]


def test_a_page_back_within_the_stall_of_an_outages_end_is_back_then() -> None:
    """After a 3 s outage, a frame 0.1 s after its end counts (not the next hiccup)."""
    before = steady(0.0, 1.0, 100)  # the outage begins at 1.0; its last frame at 0.95
    silent = [(1.0 + 0.05 * i, 119, CALL) for i in range(1, 62)]  # to 4.05
    after = steady(4.1, 6.0, 120)
    assert frame_after_stall(before + silent + after, since=4.0, quiet_from=1.0) == 4.1


def test_frames_on_their_way_after_a_change_are_not_a_recovery() -> None:
    """After a change, frames decoded at once do not count; the first after a stall does."""
    flowing = steady(0.0, 1.2, 100)  # the change at 1.0; frames still decode until 1.15
    silent = [(1.2 + 0.05 * i, 123, CALL) for i in range(20)]  # to 2.15
    assert frame_after_stall(flowing, since=1.0, quiet_from=1.0) is None
    samples = flowing + silent + steady(2.2, 3.0, 124)
    assert frame_after_stall(samples, since=1.0, quiet_from=1.0) == 2.2


def test_a_new_call_counts_from_its_first_frame() -> None:
    """A new RTCPeerConnection (counting from 0) is back at its first frame, without a stall."""
    samples = [*steady(0.0, 1.0, 100), (1.0, 0, 0.7), (1.05, 0, 0.7), (1.1, 1, 0.7)]
    assert frame_after_stall(samples, since=0.9, quiet_from=0.9) == 1.1
