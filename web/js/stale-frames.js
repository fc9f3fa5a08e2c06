// Stale video frames after an outage, told from the frame's own clock (used by
// keyframe-worker.js; pure, so that a page can test it).
//
// What happens after an outage between two Chromiums (docs/benchmarks.md): a few hundred ms
// into it the sender's congestion window is full, and the frames it encodes next wait in its
// pacer, behind the frames it sent into the void. When the network returns they leave first,
// as new packets (not retransmissions), carrying RTP timestamps about the outage's length
// old. The receiver feeds their arrival into its timing model as if they were new, and the
// key frame that follows (the one the page asks for) is then scheduled about two seconds in
// the future: the video stays frozen although complete frames arrive. Dropped here, before
// the receiver's frame buffer sees them, those frames change nothing, and the key frame
// decodes as it arrives.
//
// A frame is stale when it arrives STALE_MS later than the stream's frames usually do, for
// its RTP timestamp: (receive time - RTP timestamp / 90) against the lowest such offset seen,
// which may creep up by DRIFT_PER_MS (clocks drift, paths lengthen). Stale delta frames are
// dropped; the frames after them refer to them, so from the first drop until a key frame
// passes the caller asks for one (judge() says "+ask"), every ASK_EVERY_MS, MAX_ASKS times at
// most. A key frame always passes. Dropping for longer than GIVE_UP_MS means the delay changed
// for good: the offset is taken as the new normal and frames pass again.

export const STALE_MS = 1000; // far above jitter; a 3 s outage's frames are 2.6-3.4 s late
export const GIVE_UP_MS = 2000;
// The sender encodes one key frame per 300 ms at most (libwebrtc's EncoderRtcpFeedback).
export const ASK_EVERY_MS = 300;
export const MAX_ASKS = 10;
const DRIFT_PER_MS = 0.01; // the baseline may rise 10 ms per second of stream
const RTP_TICKS_PER_MS = 90; // video RTP clock: 90 kHz

export class StaleFrames {
  constructor() {
    this.baseline = null; // the lowest offset seen (ms), crept up with time
    this.lastReceived = null; // the previous frame's receive time (ms)
    this.rtp = null; // the previous frame's RTP timestamp, unwrapped
    this.rtpLast32 = 0;
    this.droppingSince = null; // receive time of the first frame dropped, while dropping
    this.dropped = 0; // frames dropped in this burst
    this.worst = 0; // the latest of them, ms late
    this.needKey = false; // frames were dropped and no key frame passed since
    this.askedAt = null;
    this.asks = 0;
  }

  /**
   * One frame: "pass" or "drop", with "+ask" when the sender should be asked for a key frame.
   * @param {boolean} key  a key frame
   * @param {number} rtpTimestamp  the frame's RTP timestamp (32 bits, 90 kHz)
   * @param {number} receivedMs  when its last packet arrived (ms, any monotonic origin)
   */
  judge(key, rtpTimestamp, receivedMs) {
    if (this.rtp === null) {
      this.rtp = rtpTimestamp;
    } else {
      this.rtp += (rtpTimestamp - this.rtpLast32) | 0; // signed 32-bit step: wraps are unwrapped
    }
    this.rtpLast32 = rtpTimestamp;
    const offset = receivedMs - this.rtp / RTP_TICKS_PER_MS;
    if (this.baseline !== null && this.lastReceived !== null) {
      this.baseline += DRIFT_PER_MS * Math.max(0, receivedMs - this.lastReceived);
    }
    this.lastReceived = receivedMs;
    if (this.baseline === null || offset < this.baseline) this.baseline = offset;
    const late = offset - this.baseline;
    if (key) {
      this.needKey = false;
      this.asks = 0;
      this.askedAt = null;
    } else if (late >= STALE_MS) {
      if (this.droppingSince === null || receivedMs - this.droppingSince < GIVE_UP_MS) {
        this.dropped += 1;
        this.worst = Math.max(this.worst, late);
        this.droppingSince ??= receivedMs;
        this.needKey = true;
        return this.ask(receivedMs) ? "drop+ask" : "drop";
      }
      this.baseline = offset; // not a burst: the stream's delay changed
    }
    this.droppingSince = null;
    return this.ask(receivedMs) ? "pass+ask" : "pass";
  }

  /** The burst just ended (a frame passed after drops): {dropped, worstMs}, else null. */
  takeBurst() {
    if (this.droppingSince !== null || this.dropped === 0) return null;
    const burst = { dropped: this.dropped, worstMs: Math.round(this.worst) };
    this.dropped = 0;
    this.worst = 0;
    return burst;
  }

  ask(receivedMs) {
    if (!this.needKey || this.asks >= MAX_ASKS) return false;
    if (this.askedAt !== null && receivedMs - this.askedAt < ASK_EVERY_MS) return false;
    this.askedAt = receivedMs;
    this.asks += 1;
    return true;
  }
}
