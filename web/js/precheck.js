// The pre-call check on the start page: the camera's preview, the microphone's
// level, whether the relay answers (GET /health, then a WebSocket to /ws
// opened and closed again), and, when the relay has a TURN server for this
// seat (GET rtc-config.json?session=&role=&token= with the link's values: the
// credentials a join would get, docs/protocol.md), whether it gives this
// browser a relayed candidate (checkTurn). It
// ends with one verdict; the camera and microphone it opened are handed to the
// call when the person joins.
//
// checkTurn(iceServers): a throwaway RTCPeerConnection with the TURN servers
// only and iceTransportPolicy "relay" gathers candidates: a "relay" candidate
// is "ok"; an icecandidateerror with a 4xx STUN code (401 Unauthorized, 403
// Forbidden, 437, 441...) is "refused" (the credentials, or the server's
// policy); nothing by TURN_TIMEOUT_MS (or only network errors, 701) is
// "unreachable". The page runs it again at join time when the relay hands it
// short-lived TURN credentials (joined.ice_servers): the aiortc peers do the
// same (issue 16).

import { MediaError, openLocalMedia, stopMedia } from "./media.js";
import * as view from "./view.js";

const { els } = view;
const CHECK_TIMEOUT_MS = 5000;
export const TURN_TIMEOUT_MS = 5000; // no relay candidate by then: unreachable

export class Precheck {
  /**
   * @param {string} relayUrl
   * @param {() => {session: string, role: string, token: string}} seat  the start form's seat:
   *   the relay hands that seat's TURN credentials for the check (as a join would)
   */
  constructor(relayUrl, seat = () => ({})) {
    this.relayUrl = relayUrl;
    this.seat = seat;
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
    const turn = this.checkTurn(run);
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

  /** The TURN servers of rtc-config.json, if any: a relayed candidate, refused, or unreachable. */
  async checkTurn(run) {
    const servers = turnServers(await rtcIceServers(this.seat()));
    view.showCheck("turn", servers.length > 0);
    if (!servers.length || run !== this.run_) return;
    view.renderCheck("turn", "running", "check.turn.running");
    const { result } = await checkTurn(servers);
    if (run !== this.run_) return;
    this.results.turn = result;
    const seconds = TURN_TIMEOUT_MS / 1000;
    view.renderCheck("turn", result === "ok" ? "ok" : "fail", `check.turn.${result}`, { seconds });
  }

  /** Nothing running (after a hang-up: the camera stays off until asked). */
  idle() {
    this.run_++;
    this.stop();
    for (const name of ["camera", "mic", "relay", "turn"]) view.renderCheck(name, "idle", `check.${name}.idle`);
    view.renderVerdict("idle");
  }

  decide() {
    const { relay, media, turn } = this.results;
    if (relay === "down") view.renderVerdict("relay-down");
    else if (relay !== "ok") view.renderVerdict(relay);
    else if (turn && turn !== "ok") view.renderVerdict(`turn-${turn}`);
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

/** Does the relay's HTTP side answer GET path with 2xx (within CHECK_TIMEOUT_MS)? */
export async function httpOk(path) {
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

/** The relay's iceServers for the pages (GET rtc-config.json); [] when it has none. With the
 * seat of the link (session, role, token), the relay adds the TURN credentials a join would get. */
async function rtcIceServers({ session, role, token } = {}) {
  const query = new URLSearchParams();
  if (session && role) {
    query.set("session", session);
    query.set("role", role);
    if (token) query.set("token", token);
  }
  const url = query.size ? `rtc-config.json?${query}` : "rtc-config.json";
  try {
    const response = await fetch(url, { cache: "no-store", signal: AbortSignal.timeout(CHECK_TIMEOUT_MS) });
    if (!response.ok) return [];
    const data = await response.json();
    return Array.isArray(data.iceServers) ? data.iceServers : [];
  } catch {
    return [];
  }
}

/** The entries of iceServers that have a turn: or turns: URL (with their credentials). */
export function turnServers(iceServers) {
  return (iceServers || []).filter((server) => {
    const urls = Array.isArray(server.urls) ? server.urls : [server.urls];
    return urls.some((url) => /^turns?:/.test(String(url)));
  });
}

/**
 * Gather with the TURN servers only (iceTransportPolicy "relay"): {result, detail}, where
 * result is "ok" (a relayed candidate), "refused" (a 4xx from the server: credentials or
 * policy) or "unreachable" (nothing within timeoutMs, or only network errors).
 */
export function checkTurn(servers, timeoutMs = TURN_TIMEOUT_MS) {
  return new Promise((resolve) => {
    let pc;
    try {
      pc = new RTCPeerConnection({ iceServers: servers, iceTransportPolicy: "relay" });
    } catch (err) {
      resolve({ result: "unreachable", detail: `${err.name}: ${err.message}` });
      return;
    }
    const errors = [];
    let timer;
    const done = (result, detail) => {
      clearTimeout(timer);
      pc.onicecandidate = pc.onicecandidateerror = null;
      pc.close();
      console.info(`precheck: TURN ${result}${detail ? ` (${detail})` : ""}`);
      resolve({ result, detail });
    };
    const refusal = () => errors.find((e) => e.errorCode >= 400 && e.errorCode < 500);
    pc.onicecandidateerror = (event) => {
      errors.push({ errorCode: event.errorCode, errorText: event.errorText, url: event.url });
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && candidate.type === "relay") {
        done("ok", `${candidate.protocol} relay ${candidate.address}`);
      } else if (!candidate) {
        // Gathering is over without a relayed candidate.
        const refused = refusal();
        if (refused) done("refused", `${refused.errorCode} ${refused.errorText}`);
        else done("unreachable", errors.map((e) => `${e.errorCode} ${e.errorText}`).join(", ") || "no answer");
      }
    };
    timer = setTimeout(() => {
      const refused = refusal();
      if (refused) done("refused", `${refused.errorCode} ${refused.errorText}`);
      else done("unreachable", `no relay candidate within ${timeoutMs} ms`);
    }, timeoutMs);
    pc.createDataChannel("turn-check"); // something to gather for
    pc.createOffer().then((offer) => pc.setLocalDescription(offer)).catch((err) => {
      done("unreachable", `${err.name}: ${err.message}`);
    });
  });
}
