// A video receiver's encoded frames (an RTCRtpScriptTransform set by call.js; a module
// worker), passed through unchanged but for the stale frames that follow an outage
// (stale-frames.js), so that the page can ask the sender for a key frame when it wants one:
// RTCRtpScriptTransformer.sendKeyFrameRequest() (a PLI or a FIR), the only way a page has.
// To the page, on its port: {sent, error, why} for each key frame request (why: "page" when
// the page asked with a message, "stale" when stale frames were dropped), and {stale:
// {dropped, worstMs}} when frames pass again after a burst was dropped; the message "count"
// is answered with {count: {passed, dropped}}, the frames seen so far. options.dropStale
// false: every frame passes (to measure what the dropping changes).
import { StaleFrames } from "./stale-frames.js";

self.onrtctransform = ({ transformer }) => {
  const { port, dropStale } = transformer.options;
  const stale = new StaleFrames();
  const count = { passed: 0, dropped: 0 }; // frames seen, for the page's tests ("count")
  const ask = (why) =>
    transformer.sendKeyFrameRequest().then(
      () => port.postMessage({ sent: true, why }),
      (err) => port.postMessage({ sent: false, why, error: `${err.name}: ${err.message}` }),
    );
  const sieve = new TransformStream({
    transform(frame, out) {
      let verdict = "pass";
      try {
        const meta = frame.getMetadata();
        // receiveTime: when its last packet arrived (Chromium); else now, a little later.
        const received = meta.receiveTime ?? performance.now();
        if (dropStale) verdict = stale.judge(frame.type === "key", meta.rtpTimestamp ?? frame.timestamp, received);
      } catch (err) {
        console.warn("keyframe-worker: frame passed unjudged:", err.message); // never stop the video
      }
      if (verdict.endsWith("+ask")) ask("stale");
      if (!verdict.startsWith("pass")) {
        count.dropped += 1;
        return;
      }
      count.passed += 1;
      const burst = stale.takeBurst();
      if (burst) port.postMessage({ stale: burst });
      out.enqueue(frame);
    },
  });
  transformer.readable.pipeThrough(sieve).pipeTo(transformer.writable).catch(() => {}); // ends with its connection
  port.onmessage = ({ data }) => (data === "count" ? port.postMessage({ count }) : ask("page"));
};
