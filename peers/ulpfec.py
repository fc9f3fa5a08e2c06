"""RED (RFC 2198) and ULPFEC (RFC 5109) for video, byte for byte as libwebrtc sends and takes them.

aiortc 1.16 has neither (its codecs, codecs/__init__.py:30-86, list no ``video/red`` nor
``video/ulpfec``), so a lost video packet costs a NACK's round trip. Chromium protects each
frame with ULPFEC when its receiver offers red and ulpfec: at 5 % loss and 75 ms each way
Chromium<->Chromium froze 0.4-0.5 s per 30 s, and 2.5-3.5 s with its ULPFEC turned off
(``WebRTC-DisableUlpFecExperiment``; docs/benchmarks.md, "RED and ULPFEC"). This is the pure
core, on raw packets (no aiortc import): the send path (peers/aiortc_send.py) and the receive
path (peers/aiortc_receive.py) put it on the wire.

- RED: one block, a one-byte header (F = 0, the block's payload type), as libwebrtc sends
  video; a received packet of several blocks gives its primary block.
- ULPFEC: level 0 only (libwebrtc's ``UlpfecGenerator`` sends no other), the whole packet after
  the 12-byte RTP header protected (CSRCs, header extensions, payload, padding), a 16-bit mask
  (``L`` = 0) when the protected packets lie within 16 sequence numbers of the first, else 48.
- Mutable header extensions (abs-send-time, transport-wide sequence number, transmission time
  offset: written as a packet leaves the pacer, after its protection) are zeroed in each media
  packet before it is protected and before a received one is used to rebuild another
  (libwebrtc's ``RtpPacket::ZeroMutableExtensions``, on both sides): a packet rebuilt from FEC
  has them zeroed.
- With RED, ULPFEC packets travel on the media's SSRC, in its sequence space, as RED packets
  whose block is ULPFEC; nobody retransmits them, so a lost one is a hole in the sequence
  numbers that only VP8's picture IDs bridge.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MUTABLE_EXTENSIONS",
    "RED_MIME",
    "ULPFEC_MIME",
    "Recovery",
    "from_red",
    "header_length",
    "protect",
    "sequence_number",
    "to_red",
    "zero_mutable",
]

RED_MIME = "video/red"
ULPFEC_MIME = "video/ulpfec"
# The extensions a pacer writes as the packet leaves (libwebrtc: ZeroMutableExtensions).
MUTABLE_EXTENSIONS = frozenset(
    {
        "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "http://www.webrtc.org/experiments/rtp-hdrext/transport-wide-cc-02",
        "urn:ietf:params:rtp-hdrext:toffset",
    }
)
RTP_HEADER = 12
FEC_HEADER = 10  # E L P X CC M PT-recovery SN-base TS-recovery length-recovery
MASK_SHORT, MASK_LONG = 16, 48  # bits of the level-0 mask, L = 0 and L = 1
ONE_BYTE_PROFILE = 0xBEDE
TWO_BYTE_PROFILE = 0x1000  # and its low 4 bits (RFC 8285 "appbits")
MEDIA_KEPT = 1024  # packets a receiver keeps to rebuild others (libwebrtc: kMaxMediaPackets 48 x)
FEC_KEPT = 64  # FEC packets waiting for all but one of theirs, at most


def sequence_number(raw: bytes) -> int:
    return int.from_bytes(raw[2:4], "big")


def header_length(raw: bytes) -> int:
    """The RTP header's length: 12 bytes, the CSRCs and the header extension; ValueError when
    ``raw`` is not a whole RTP header."""
    if len(raw) < RTP_HEADER or raw[0] >> 6 != 2:
        raise ValueError("not an RTP packet")
    length = RTP_HEADER + 4 * (raw[0] & 0x0F)
    if raw[0] & 0x10:
        if len(raw) < length + 4:
            raise ValueError("RTP header extension cut short")
        length += 4 + 4 * int.from_bytes(raw[length + 2 : length + 4], "big")
    if len(raw) < length:
        raise ValueError("RTP header cut short")
    return length


def to_red(raw_media: bytes, red_pt: int) -> bytes:
    """``raw_media`` as a one-block RED packet of payload type ``red_pt`` (RFC 2198)."""
    head = header_length(raw_media)
    return b"".join(
        (
            raw_media[:1],
            bytes(((raw_media[1] & 0x80) | red_pt,)),
            raw_media[2:head],
            bytes((raw_media[1] & 0x7F,)),  # F = 0: the only (primary) block's payload type
            raw_media[head:],
        )
    )


def from_red(raw_red: bytes) -> tuple[int, bytes]:
    """The primary block of a RED packet: its payload type, and the packet it carries (the
    RED packet's header with that payload type, the block's data after it)."""
    head = header_length(raw_red)
    pos, skipped = head, 0
    while True:
        if pos >= len(raw_red):
            raise ValueError("RED header cut short")
        if not raw_red[pos] & 0x80:
            break  # the last header: one byte, the primary block's payload type
        if pos + 4 > len(raw_red):
            raise ValueError("RED block header cut short")
        skipped += int.from_bytes(raw_red[pos + 2 : pos + 4], "big") & 0x3FF
        pos += 4
    block_pt = raw_red[pos] & 0x7F
    pos += 1 + skipped  # the redundant blocks' data comes before the primary's
    if pos > len(raw_red):
        raise ValueError("RED blocks longer than the packet")
    packet = b"".join(
        (raw_red[:1], bytes(((raw_red[1] & 0x80) | block_pt,)), raw_red[2:head], raw_red[pos:])
    )
    return block_pt, packet


def zero_mutable(raw: bytes, ids: Collection[int]) -> bytes:
    """``raw`` with the values of the header extensions numbered ``ids`` zeroed (one-byte and
    two-byte forms, RFC 8285); ``raw`` itself when it has none of them."""
    if not ids or not raw[0] & 0x10:
        return raw
    start = RTP_HEADER + 4 * (raw[0] & 0x0F)
    profile = int.from_bytes(raw[start : start + 2], "big")
    end = start + 4 + 4 * int.from_bytes(raw[start + 2 : start + 4], "big")
    one_byte = profile == ONE_BYTE_PROFILE
    if not one_byte and profile & 0xFFF0 != TWO_BYTE_PROFILE:
        return raw
    out: bytearray | None = None
    pos = start + 4
    while pos < min(end, len(raw)):
        if raw[pos] == 0:  # padding
            pos += 1
            continue
        if one_byte:
            ext_id, length, pos = raw[pos] >> 4, (raw[pos] & 0x0F) + 1, pos + 1
            if ext_id == 15:
                break
        else:
            if pos + 1 >= end:
                break
            ext_id, length, pos = raw[pos], raw[pos + 1], pos + 2
        if ext_id in ids:
            out = out if out is not None else bytearray(raw)
            out[pos : min(pos + length, end)] = bytes(min(length, end - pos))
        pos += length
    return bytes(out) if out is not None else raw


def _xor(into: int, data: bytes, width: int) -> int:
    """``into`` XOR ``data`` padded with zeros to ``width`` bytes (as big integers)."""
    return into ^ int.from_bytes(data.ljust(width, b"\0"), "big")


def protect(
    media: Sequence[bytes], fec_count: int, mutable_ids: Collection[int] = frozenset()
) -> list[bytes]:
    """ULPFEC payloads (FEC header, level-0 header, level-0 payload) protecting ``media``: RTP
    packets in their media form (not RED), in sending order, their sequence numbers within
    48 of the first's; FEC ``j`` covers ``media[i]`` for ``i % fec_count == j`` (interleaved:
    any one loss in each set is rebuilt)."""
    if not media or fec_count < 1:
        return []
    base = sequence_number(media[0])
    offsets = [(sequence_number(p) - base) & 0xFFFF for p in media]
    if max(offsets) >= MASK_LONG or len(set(offsets)) != len(offsets):
        raise ValueError("ULPFEC protects up to 48 distinct packets from the first")
    long_mask = max(offsets) >= MASK_SHORT
    mask_bits = MASK_LONG if long_mask else MASK_SHORT
    packets = [zero_mutable(p, mutable_ids) for p in media]
    out = []
    for j in range(min(fec_count, len(media))):
        group = range(j, len(media), min(fec_count, len(media)))
        width = max(len(packets[i]) - RTP_HEADER for i in group)
        b0 = b1 = ts = length = mask = data = 0
        for i in group:
            packet = packets[i]
            b0, b1 = b0 ^ packet[0], b1 ^ packet[1]
            ts ^= int.from_bytes(packet[4:8], "big")
            length ^= len(packet) - RTP_HEADER
            data = _xor(data, packet[RTP_HEADER:], width)
            mask |= 1 << (mask_bits - 1 - offsets[i])
        header = struct.pack(
            "!BBHIHH", (0x40 if long_mask else 0) | (b0 & 0x3F), b1, base, ts, length, width
        )
        out.append(header + mask.to_bytes(mask_bits // 8, "big") + data.to_bytes(width, "big"))
    return out


@dataclass(eq=False)
class _Fec:
    """One received ULPFEC packet, parsed."""

    protected: frozenset[int]  # sequence numbers
    b0: int
    b1: int
    ts: int
    length: int
    width: int  # protection length
    data: int  # the level-0 payload as a big integer

    @classmethod
    def parse(cls, payload: bytes) -> _Fec:
        if len(payload) < FEC_HEADER + 4:
            raise ValueError("ULPFEC header cut short")
        b0, b1, base, ts, length, width = struct.unpack_from("!BBHIHH", payload)
        mask_bytes = (MASK_LONG if b0 & 0x40 else MASK_SHORT) // 8
        start = FEC_HEADER + 2 + mask_bytes
        if len(payload) < start + width:
            raise ValueError("ULPFEC payload shorter than its protection length")
        mask = int.from_bytes(payload[FEC_HEADER + 2 : start], "big")
        bits = mask_bytes * 8
        protected = frozenset(
            (base + i) & 0xFFFF for i in range(bits) if mask >> (bits - 1 - i) & 1
        )
        if not protected:
            raise ValueError("ULPFEC mask protects nothing")
        data = int.from_bytes(payload[start : start + width], "big")
        return cls(protected, b0, b1, ts, length, width, data)


class Recovery:
    """A receiver's ULPFEC decoder for one SSRC: the media packets that came (mutable
    extensions zeroed) and the FEC packets still missing more than one of theirs; a packet is
    rebuilt as soon as an FEC packet misses only it, and may in turn complete another."""

    def __init__(self, ssrc: int, mutable_ids: Collection[int] = frozenset()) -> None:
        self.ssrc = ssrc
        self.mutable_ids = frozenset(mutable_ids)
        self._media: dict[int, bytes] = {}
        self._order: collections.deque[int] = collections.deque()
        self._fec: collections.deque[_Fec] = collections.deque()
        self.recovered = 0  # packets rebuilt
        self.useless = 0  # FEC packets whose media all came

    def media(self, raw: bytes) -> list[bytes]:
        """A media packet (media form, as received): the packets rebuilt thanks to it."""
        seq = sequence_number(raw)
        if seq in self._media:
            return []
        self._keep(seq, zero_mutable(raw, self.mutable_ids))
        return self._rebuild_from(f for f in self._fec if seq in f.protected)

    def fec(self, payload: bytes) -> list[bytes]:
        """An ULPFEC payload (RED removed): the packets rebuilt thanks to it. ValueError when
        it is malformed."""
        fec = _Fec.parse(payload)
        if fec.protected <= self._media.keys():
            self.useless += 1
            return []
        self._fec.append(fec)
        while len(self._fec) > FEC_KEPT:
            self._fec.popleft()
        return self._rebuild_from((fec,))

    def _keep(self, seq: int, raw: bytes) -> None:
        self._media[seq] = raw
        self._order.append(seq)
        while len(self._order) > MEDIA_KEPT:
            self._media.pop(self._order.popleft(), None)

    def _rebuild_from(self, candidates: Iterable[_Fec]) -> list[bytes]:
        out: list[bytes] = []
        work = list(candidates)
        while work:
            fec = work.pop()
            missing = fec.protected - self._media.keys()
            if len(missing) > 1:
                continue
            if fec in self._fec:
                self._fec.remove(fec)
            if not missing:
                continue
            (seq,) = missing
            packet = self._rebuild(fec, seq)
            if packet is None:
                continue
            self._keep(seq, packet)
            self.recovered += 1
            out.append(packet)
            work.extend(f for f in self._fec if seq in f.protected)
        return out

    def _rebuild(self, fec: _Fec, seq: int) -> bytes | None:
        b0, b1, ts, length, data = fec.b0, fec.b1, fec.ts, fec.length, fec.data
        for other in fec.protected - {seq}:
            packet = self._media[other]
            if len(packet) - RTP_HEADER > fec.width:
                return None  # not the packet this FEC protected
            b0, b1 = b0 ^ packet[0], b1 ^ packet[1]
            ts ^= int.from_bytes(packet[4:8], "big")
            length ^= len(packet) - RTP_HEADER
            data = _xor(data, packet[RTP_HEADER:], fec.width)
        if length > fec.width:
            return None
        raw = (
            bytes((0x80 | (b0 & 0x3F), b1))
            + struct.pack("!HII", seq, ts, self.ssrc)
            + data.to_bytes(fec.width, "big")[:length]
        )
        try:
            header_length(raw)
        except ValueError:
            return None
        return raw
