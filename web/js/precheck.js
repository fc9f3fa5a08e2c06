// The pre-call check on the start page: the camera's preview, the microphone's
// level, and whether the relay answers (GET /health, then a WebSocket to /ws
// opened and closed again). It ends with one verdict; the camera and
// microphone it opened are handed to the call when the person joins.
//
// A TURN check (an allocation with the relay's short-lived credentials) can be
// added as checkTurn(): it gets the relay's rtc-config.json and returns one of
// the same results; the verdict already takes it into account.

import { MediaError, openLocalMedia, stopMedia } from "./media.js";
import * as view from "./view.js";

const { els } = view;
const CHECK_TIMEOUT_MS = 5000;

export class Precheck {
  constructor(relayUrl) {
    this.relayUrl = relayUrl;
    this.media = null; // {stream, notice} from openLocalMedia, or {error: MediaError}
    this.mediaChecked = Promise.resolve(); // the media check under way
    this.results = {};
    this.run_ = 0; // each run's number: a stale run's results are dropped
    this.meter = null;
  }

  /** Run every check again (at load, and from the "check again" button). */
  async run() {
    const run = ++this.run_;
    this.stop();
    this.results = {};
    view.renderVerdict("running");
    for (const name of ["camera", "mic", "relay"]) view.renderCheck(name, "running", `check.${name}.running`);
    const media = (this.mediaChecked = this.checkMedia(run));
    const relay = this.checkRelay(run);
    const turn = checkTurn();
    await Promise.all([media, relay, turn]);
    if (run === this.run_) this.decide();
  }

  /** Hand the camera and microphone over (to the call); the preview lets go of them. */
  async take() {
    await this.mediaChecked;
    const media = this.media;
    this.media = null;
    this.stopMeter();
    els.precheckVideo.srcObject = null;
    return media;
  }

  /** Release the camera and microphone (if the call did not take them). */
  stop() {
    this.stopMeter();
    els.precheckVideo.srcObject = null;
    if (this.media && this.media.stream) stopMedia(this.media.stream);
    this.media = null;
  }

  async checkMedia(run) {
    let media;
    try {
      media = await openLocalMedia();
    } catch (err) {
      if (!(err instanceof MediaError)) throw err;
      media = { error: err };
    }
    if (run !== this.run_) {
      if (media.stream) stopMedia(media.stream);
      return;
    }
    this.media = media;
    if (media.error) {
      const denied = media.error.key === "media.denied";
      view.renderCheck("camera", "fail", denied ? "check.camera.denied" : "check.camera.failed");
      view.renderCheck("mic", "fail", denied ? "check.mic.denied" : "check.camera.failed");
      this.results.media = "fail";
      return;
    }
    const stream = media.stream;
    const video = Boolean(stream && stream.getVideoTracks().length);
    const audio = Boolean(stream && stream.getAudioTracks().length);
    view.renderCheck("camera", video ? "ok" : "warn", video ? "check.camera.ok" : "check.camera.missing");
    view.renderCheck("mic", audio ? "ok" : "warn", audio ? "check.mic.ok" : "check.mic.missing");
    this.results.media = video && audio ? "ok" : "warn";
    if (video) els.precheckVideo.srcObject = stream;
    if (audio) this.startMeter(stream);
  }

  /** The relay's HTTP side, then its WebSocket: down, ws-blocked (a proxy without upgrade) or ok. */
  async checkRelay(run) {
    let result = "down";
    if (await httpOk("health")) result = (await websocketOpens(this.relayUrl)) ? "ok" : "ws-blocked";
    if (run !== this.run_) return;
    this.results.relay = result;
    view.renderCheck("relay", result === "ok" ? "ok" : "fail", `check.relay.${result}`);
  }

  /** Nothing running (after a hang-up: the camera stays off until asked). */
  idle() {
    this.run_++;
    this.stop();
    for (const name of ["camera", "mic", "relay"]) view.renderCheck(name, "idle", `check.${name}.idle`);
    view.renderVerdict("idle");
  }

  decide() {
    const { relay, media } = this.results;
    if (relay === "down") view.renderVerdict("relay-down");
    else if (relay !== "ok") view.renderVerdict(relay);
    else view.renderVerdict(media === "ok" ? "ok" : "media");
  }

  /** The microphone's level in the meter, about 20 times a second. */
  startMeter(stream) {
    const context = new AudioContext();
    const analyser = context.createAnalyser();
    analyser.fftSize = 512;
    context.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const timer = setInterval(() => {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const x of samples) sum += x * x;
      // RMS, scaled so that speech at a normal distance fills about half the bar.
      els.micLevel.value = Math.min(1, Math.sqrt(sum / samples.length) * 4);
    }, 50);
    // An AudioContext made without a gesture may start suspended: the first
    // click or key on the page resumes it.
    const resume = () => context.resume().catch(() => {});
    addEventListener("pointerdown", resume, { once: true });
    addEventListener("keydown", resume, { once: true });
    resume();
    this.meter = { context, timer };
  }

  stopMeter() {
    if (!this.meter) return;
    clearInterval(this.meter.timer);
    this.meter.context.close().catch(() => {});
    this.meter = null;
    els.micLevel.value = 0;
  }
}

async function httpOk(path) {
  try {
    const response = await fetch(path, { cache: "no-store", signal: AbortSignal.timeout(CHECK_TIMEOUT_MS) });
    return response.ok;
  } catch {
    return false;
  }
}

function websocketOpens(url) {
  return new Promise((resolve) => {
    let ws;
    const done = (ok) => {
      clearTimeout(timer);
      if (ws) {
        ws.onopen = ws.onerror = ws.onclose = null;
        if (ok) ws.close(1000, "check");
      }
      resolve(ok);
    };
    const timer = setTimeout(() => {
      if (ws) ws.close();
      done(false);
    }, CHECK_TIMEOUT_MS);
    try {
      ws = new WebSocket(url);
    } catch {
      done(false);
      return;
    }
    ws.onopen = () => done(true);
    ws.onerror = () => done(false);
    ws.onclose = () => done(false);
  });
}

/** The hook for a TURN reachability check: not done yet, so it reports nothing. */
async function checkTurn() {
  return null;
}
