"""aiortc's VP8 encoder on libvpx itself, so that a new target bitrate is a new rate and not a
new encoder (used by peers/aiortc_send.py).

Against aiortc 1.16.0: ``Vp8Encoder.encode`` (codecs/vpx.py:180-231) encodes through FFmpeg's
libvpx wrapper, whose bitrate is fixed when its context opens (FFmpeg's libvpxenc reads
``bit_rate`` once; setting it on an open context changes nothing). So each time the target
moves by more than 10 % (vpx.py:183-190) aiortc throws the context away and opens another,
whose first frame is a keyframe and whose rate control starts from nothing: 14 keyframes in
30 s at 5 % loss + 75 ms (docs/benchmarks.md, "RED and ULPFEC"), each several frames' worth of
packets on the lossy or narrow link that made the estimate move. libwebrtc's
``LibvpxVp8Encoder::SetRates`` gives the running encoder its new rate
(``vpx_codec_enc_config_set``); so does ``Encoder`` here, on the libvpx that PyAV ships
(av.libs), through ctypes. A new size is still a new encoder (VP8 needs a keyframe then;
libwebrtc's ``InitEncode`` too).

The settings are aiortc's (vpx.py:200-224: CBR, quantizers 2-56, undershoot 100 %, overshoot
15 %, ``cpu-used`` -6, realtime, no lag, noise sensitivity 4, static threshold 1, one token
partition, keyframes at most every 3000 frames, aiortc's thread count), with libwebrtc's buffer
model (1000 ms, initial 500, optimal 600: aiortc's FFmpeg options made it 1000 / 4000 / 833)
and its cap on a keyframe's size (``MaxIntraTarget``: half the optimal buffer x the frame rate
/ 10, in % of a frame's budget), which aiortc does not set.

``check()`` runs at start (peers/aiortc_patches.py): libvpx is the version this is written
against (v1.16.0), its encoder takes this ABI (``VPX_ENCODER_ABI_VERSION`` 39), and libvpx's
own VP8 defaults read back at this structure's offsets (320x240, 1/30, 256 kbit/s,
quantizers 4-63, buffers 6000 / 4000 / 5000 ms, keyframes every 128), so that a different
layout fails at start rather than as a corrupt encoder.

Upstream: PyAV/FFmpeg would take a new bitrate on an open libvpx context (as libvpxenc's
``vpx_codec_enc_config_set`` path for temporal layers does), and ``Vp8Encoder`` would set it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fractions
import glob
import multiprocessing
import os
from typing import Any

import av
from aiortc.codecs import vpx
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from av import VideoFrame

__all__ = ["LIBVPX_VERSION", "Vp8", "check", "encode", "running"]

LIBVPX_VERSION = "v1.16.0"
ENCODER_ABI_VERSION = (
    39  # 18 + VPX_CODEC_ABI_VERSION (4 + 5) + VPX_EXT_RATECTRL_ABI_VERSION (7 + 5)
)
IMG_FMT_I420 = 0x100 | 2
CX_FRAME_PKT = 0
EFLAG_FORCE_KF = 1
FRAME_IS_KEY = 1
DL_REALTIME = 1
CBR = 1
KF_AUTO = 1
VP8E_SET_CPUUSED = 13
VP8E_SET_NOISE_SENSITIVITY = 15
VP8E_SET_STATIC_THRESHOLD = 17
VP8E_SET_TOKEN_PARTITIONS = 18
VP8E_SET_MAX_INTRA_BITRATE_PCT = 26
# aiortc's own ``Vp8Encoder.encode``, as this module is imported (before aiortc_send wraps it).
AIORTC_ENCODE = vpx.Vp8Encoder.encode
TIME_BASE = fractions.Fraction(1, 90000)  # the RTP clock (aiortc's VIDEO_TIME_BASE)
BUFFER_MS, BUFFER_INITIAL_MS, BUFFER_OPTIMAL_MS = 1000, 500, 600  # libwebrtc's
MIN_INTRA_PCT = 300  # libwebrtc's MaxIntraTarget floor


class _Rational(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("den", ctypes.c_int)]


class _FixedBuf(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("sz", ctypes.c_size_t)]


# vpx/vpx_encoder.h at v1.16.0, ``struct vpx_codec_enc_cfg``.
class _EncCfg(ctypes.Structure):
    _fields_ = [
        ("g_usage", ctypes.c_uint), ("g_threads", ctypes.c_uint), ("g_profile", ctypes.c_uint),
        ("g_w", ctypes.c_uint), ("g_h", ctypes.c_uint), ("g_bit_depth", ctypes.c_int),
        ("g_input_bit_depth", ctypes.c_uint), ("g_timebase", _Rational),
        ("g_error_resilient", ctypes.c_uint32), ("g_pass", ctypes.c_int),
        ("g_lag_in_frames", ctypes.c_uint), ("rc_dropframe_thresh", ctypes.c_uint),
        ("rc_resize_allowed", ctypes.c_uint), ("rc_scaled_width", ctypes.c_uint),
        ("rc_scaled_height", ctypes.c_uint), ("rc_resize_up_thresh", ctypes.c_uint),
        ("rc_resize_down_thresh", ctypes.c_uint), ("rc_end_usage", ctypes.c_int),
        ("rc_twopass_stats_in", _FixedBuf), ("rc_firstpass_mb_stats_in", _FixedBuf),
        ("rc_target_bitrate", ctypes.c_uint), ("rc_min_quantizer", ctypes.c_uint),
        ("rc_max_quantizer", ctypes.c_uint), ("rc_undershoot_pct", ctypes.c_uint),
        ("rc_overshoot_pct", ctypes.c_uint), ("rc_buf_sz", ctypes.c_uint),
        ("rc_buf_initial_sz", ctypes.c_uint), ("rc_buf_optimal_sz", ctypes.c_uint),
        ("rc_2pass_vbr_bias_pct", ctypes.c_uint), ("rc_2pass_vbr_minsection_pct", ctypes.c_uint),
        ("rc_2pass_vbr_maxsection_pct", ctypes.c_uint),
        ("rc_2pass_vbr_corpus_complexity", ctypes.c_uint), ("kf_mode", ctypes.c_int),
        ("kf_min_dist", ctypes.c_uint), ("kf_max_dist", ctypes.c_uint),
        ("ss_number_layers", ctypes.c_uint), ("ss_enable_auto_alt_ref", ctypes.c_int * 5),
        ("ss_target_bitrate", ctypes.c_uint * 5), ("ts_number_layers", ctypes.c_uint),
        ("ts_target_bitrate", ctypes.c_uint * 5), ("ts_rate_decimator", ctypes.c_uint * 5),
        ("ts_periodicity", ctypes.c_uint), ("ts_layer_id", ctypes.c_uint * 16),
        ("layer_target_bitrate", ctypes.c_uint * 12), ("temporal_layering_mode", ctypes.c_int),
        ("use_vizier_rc_params", ctypes.c_int), ("vizier", _Rational * 15),
    ]  # fmt: skip


# vpx/vpx_image.h at v1.16.0, ``struct vpx_image``.
class _Image(ctypes.Structure):
    _fields_ = [
        ("fmt", ctypes.c_int), ("cs", ctypes.c_int), ("range", ctypes.c_int),
        ("w", ctypes.c_uint), ("h", ctypes.c_uint), ("bit_depth", ctypes.c_uint),
        ("d_w", ctypes.c_uint), ("d_h", ctypes.c_uint), ("r_w", ctypes.c_uint),
        ("r_h", ctypes.c_uint), ("x_chroma_shift", ctypes.c_uint),
        ("y_chroma_shift", ctypes.c_uint), ("planes", ctypes.c_void_p * 4),
        ("stride", ctypes.c_int * 4), ("bps", ctypes.c_int), ("user_priv", ctypes.c_void_p),
        ("img_data", ctypes.c_void_p), ("img_data_owner", ctypes.c_int),
        ("self_allocd", ctypes.c_int), ("fb_priv", ctypes.c_void_p),
    ]  # fmt: skip


# vpx/vpx_codec.h, ``struct vpx_codec_ctx`` (name, iface, err, err_detail, init_flags, config,
# priv), with room to spare.
class _Ctx(ctypes.Structure):
    _fields_ = [("words", ctypes.c_void_p * 16)]


class _FramePkt(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p), ("sz", ctypes.c_size_t), ("pts", ctypes.c_int64),
        ("duration", ctypes.c_ulong), ("flags", ctypes.c_uint32), ("partition_id", ctypes.c_int),
    ]  # fmt: skip


# ``struct vpx_codec_cx_pkt``: the kind, then (8-aligned) the frame's fields.
class _CxPkt(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("frame", _FramePkt)]


def _library() -> ctypes.CDLL:
    """The libvpx that PyAV's own libavcodec links to (its wheel's av.libs)."""
    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    found = sorted(glob.glob(os.path.join(libs, "libvpx-*.so*")))
    if not found:
        raise RuntimeError(f"no libvpx in {libs}: PyAV's wheel is not the pinned one")
    lib = ctypes.CDLL(found[0])
    lib.vpx_codec_version_str.restype = ctypes.c_char_p
    lib.vpx_codec_vp8_cx.restype = ctypes.c_void_p
    lib.vpx_codec_enc_config_default.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    lib.vpx_codec_enc_init_ver.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
    ]  # fmt: skip
    lib.vpx_codec_enc_config_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.vpx_codec_control_.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.vpx_img_wrap.restype = ctypes.c_void_p
    lib.vpx_img_wrap.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.vpx_codec_encode.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_ulong, ctypes.c_long,
        ctypes.c_ulong,
    ]  # fmt: skip
    lib.vpx_codec_get_cx_data.restype = ctypes.POINTER(_CxPkt)
    lib.vpx_codec_get_cx_data.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.vpx_codec_destroy.argtypes = [ctypes.c_void_p]
    lib.vpx_codec_error.restype = ctypes.c_char_p
    lib.vpx_codec_error.argtypes = [ctypes.c_void_p]
    return lib


_lib: list[ctypes.CDLL] = []


def lib() -> ctypes.CDLL:
    if not _lib:
        _lib.append(_library())
    return _lib[0]


def check() -> None:
    """RuntimeError unless libvpx is the pinned version with the layout written here."""
    found = lib().vpx_codec_version_str().decode()
    if found != LIBVPX_VERSION:
        raise RuntimeError(f"libvpx {found} is not {LIBVPX_VERSION}: re-check peers/aiortc_vp8.py")
    cfg = _EncCfg()
    if lib().vpx_codec_enc_config_default(lib().vpx_codec_vp8_cx(), ctypes.byref(cfg), 0):
        raise RuntimeError("libvpx gave no VP8 default configuration")
    seen = (
        cfg.g_w, cfg.g_h, cfg.g_input_bit_depth, cfg.g_timebase.num, cfg.g_timebase.den,
        cfg.rc_resize_up_thresh, cfg.rc_resize_down_thresh, cfg.rc_target_bitrate,
        cfg.rc_min_quantizer, cfg.rc_max_quantizer, cfg.rc_buf_sz, cfg.rc_buf_initial_sz,
        cfg.rc_buf_optimal_sz, cfg.kf_mode, cfg.kf_max_dist, cfg.ts_number_layers,
        cfg.vizier[14].num, cfg.vizier[14].den,
    )  # fmt: skip
    # libvpx's vp8e_usage_cfg_map (vp8/vp8_cx_iface.c) in the order above
    if seen != (320, 240, 8, 1, 30, 60, 30, 256, 4, 63, 6000, 4000, 5000, KF_AUTO, 128, 1, 1, 1):
        raise RuntimeError(f"libvpx's encoder configuration is not laid out as expected: {seen}")


class Vp8:
    """One libvpx VP8 encoder of one size; ``rate(bps)`` retunes it in place."""

    def __init__(self, width: int, height: int, bitrate: int, fps: float = 30.0) -> None:
        self.width, self.height = width, height
        self.cfg = _EncCfg()
        if lib().vpx_codec_enc_config_default(lib().vpx_codec_vp8_cx(), ctypes.byref(self.cfg), 0):
            raise RuntimeError("libvpx gave no VP8 default configuration")
        cfg = self.cfg
        cfg.g_w, cfg.g_h = width, height
        cfg.g_timebase = _Rational(TIME_BASE.numerator, TIME_BASE.denominator)
        cfg.g_threads = vpx.number_of_threads(width * height, multiprocessing.cpu_count())
        cfg.g_lag_in_frames = 0
        cfg.g_error_resilient = 0
        cfg.rc_dropframe_thresh = 0
        cfg.rc_resize_allowed = 0
        cfg.rc_end_usage = CBR
        cfg.rc_target_bitrate = max(1, round(bitrate / 1000))
        cfg.rc_min_quantizer, cfg.rc_max_quantizer = 2, 56
        cfg.rc_undershoot_pct, cfg.rc_overshoot_pct = 100, 15
        cfg.rc_buf_sz, cfg.rc_buf_initial_sz = BUFFER_MS, BUFFER_INITIAL_MS
        cfg.rc_buf_optimal_sz = BUFFER_OPTIMAL_MS
        cfg.kf_mode, cfg.kf_min_dist, cfg.kf_max_dist = KF_AUTO, 0, 3000
        self.ctx = _Ctx()
        self._open = False
        if lib().vpx_codec_enc_init_ver(
            ctypes.byref(self.ctx), lib().vpx_codec_vp8_cx(), ctypes.byref(cfg), 0,
            ENCODER_ABI_VERSION,
        ):  # fmt: skip
            raise RuntimeError(f"libvpx: {self._error()}")
        self._open = True
        for control, value in (
            (VP8E_SET_CPUUSED, -6),
            (VP8E_SET_NOISE_SENSITIVITY, 4),
            (VP8E_SET_STATIC_THRESHOLD, 1),
            (VP8E_SET_TOKEN_PARTITIONS, 0),
            (
                VP8E_SET_MAX_INTRA_BITRATE_PCT,
                max(MIN_INTRA_PCT, round(BUFFER_OPTIMAL_MS * 0.5 * fps / 10)),
            ),
        ):
            if lib().vpx_codec_control_(ctypes.byref(self.ctx), control, value):
                raise RuntimeError(f"libvpx control {control}: {self._error()}")
        self.image = _Image()
        self.last_pts: int | None = None
        self.keyframes = 0

    def _error(self) -> str:
        error = lib().vpx_codec_error(ctypes.byref(self.ctx))
        return error.decode(errors="replace") if error else "unknown error"

    @property
    def bitrate(self) -> int:
        return int(self.cfg.rc_target_bitrate) * 1000

    def rate(self, bitrate: int) -> None:
        """The running encoder's new target (libwebrtc's SetRates): no new keyframe."""
        kbps = max(1, round(bitrate / 1000))
        if kbps != self.cfg.rc_target_bitrate:
            self.cfg.rc_target_bitrate = kbps
            if lib().vpx_codec_enc_config_set(ctypes.byref(self.ctx), ctypes.byref(self.cfg)):
                raise RuntimeError(f"libvpx: {self._error()}")

    def encode(self, frame: VideoFrame, pts: int, keyframe: bool = False) -> bytes:
        """One frame (yuv420p, this encoder's size) at ``pts`` (90 kHz): the VP8 frame, or
        nothing when libvpx dropped it."""
        if (frame.width, frame.height) != (self.width, self.height):
            raise ValueError(
                f"a {frame.width}x{frame.height} frame for a {self.width}x{self.height} encoder"
            )
        planes = frame.planes
        lib().vpx_img_wrap(
            ctypes.byref(self.image), IMG_FMT_I420, self.width, self.height, 1,
            ctypes.c_void_p(planes[0].buffer_ptr),
        )  # fmt: skip
        for i in range(3):
            self.image.planes[i] = planes[i].buffer_ptr
            self.image.stride[i] = planes[i].line_size
        duration = (
            pts - self.last_pts if self.last_pts is not None and pts > self.last_pts else 3000
        )
        self.last_pts = pts
        if lib().vpx_codec_encode(
            ctypes.byref(self.ctx), ctypes.byref(self.image), pts, duration,
            EFLAG_FORCE_KF if keyframe else 0, DL_REALTIME,
        ):  # fmt: skip
            raise RuntimeError(f"libvpx: {self._error()}")
        out = b""
        it = ctypes.c_void_p()
        while packet := lib().vpx_codec_get_cx_data(ctypes.byref(self.ctx), ctypes.byref(it)):
            if packet.contents.kind == CX_FRAME_PKT:
                got = packet.contents.frame
                out += ctypes.string_at(got.buf, got.sz)
                self.keyframes += bool(got.flags & FRAME_IS_KEY)
        return out

    def close(self) -> None:
        if self._open:
            self._open = False
            lib().vpx_codec_destroy(ctypes.byref(self.ctx))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the library may be gone
            self.close()


def running(encoder: vpx.Vp8Encoder) -> Vp8 | None:
    """The libvpx encoder behind ``encoder`` (in place of aiortc's ``Vp8Encoder.codec``)."""
    found: Vp8 | None = encoder.__dict__.get("_epc_vpx")
    return found


def encode(
    self: vpx.Vp8Encoder, frame: Any, force_keyframe: bool = False
) -> tuple[list[bytes], int]:
    """``Vp8Encoder.encode`` (vpx.py:180) on ``Vp8``: the same frames in, the same
    payloads and timestamp out; a new target retunes the encoder, a new size opens another."""
    assert isinstance(frame, VideoFrame)
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    pts = round(frame.pts * frame.time_base / TIME_BASE)
    encoder: Vp8 | None = self.__dict__.get("_epc_vpx")
    if encoder is None or (encoder.width, encoder.height) != (frame.width, frame.height):
        if encoder is not None:
            encoder.close()
        encoder = self.__dict__["_epc_vpx"] = Vp8(frame.width, frame.height, self.target_bitrate)
    else:
        encoder.rate(self.target_bitrate)
    data = encoder.encode(frame, pts, force_keyframe)
    if not data:  # dropped by libvpx: no picture ID spent (a gap would read as a lost frame)
        return [], 0
    payloads = self._packetize(data, self.picture_id)
    self.picture_id = (self.picture_id + 1) % (1 << 15)
    return payloads, convert_timebase(frame.pts, frame.time_base, VIDEO_TIME_BASE)
