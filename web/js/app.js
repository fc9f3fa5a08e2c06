// The page's flow: the start form, then one seat of a session, its calls and chat.
// The patient is the offerer: it offers when it learns the practitioner is there.

import { Call, MIN_VIDEO_KBPS, fingerprint } from "./call.js";
import { hasKey, initialLanguage, language, setLanguage, t } from "./i18n.js";
import { MediaError, openLocalMedia, stopMedia } from "./media.js";
import { Precheck, TURN_TIMEOUT_MS, checkTurn, httpOk, turnServers } from "./precheck.js";
import { Signaling, heartbeatOptions, relayUrl } from "./signaling.js";
import { summarize } from "./stats.js";
import * as view from "./view.js";

const { els } = view;
const SESSION_RE = /^[A-Za-z0-9_-]{1,64}$/;
const OTHER = { patient: "practitioner", practitioner: "patient" };
const STATS_INTERVAL_MS = 250; // getStats(): the media path's watchdog...
const STATS_WINDOW_MS = 1000; // ...and the details' rates, over about a second
// A lost path whose signaling is back waits this long before the patient renegotiates:
// a short outage comes back on the old connection meanwhile (that cancels it): its
// media arrives within a round trip of the network's return, seen at the next sample,
// and before the relay connection, which reconnects with backoff.
const SAME_PATH_GRACE_MS = 250;
// Media silent this long (or half the media timeout, if shorter): ask the relay client
// whether the relay is silent too; if so the network is gone: reconnect it at once.
const PROBE_MS = 1000;
// Media back after a silence this long, and no video frame decoded: ask the other side for a
// key frame at once, and again every KEY_RETRY_MS until one decodes, KEY_ASKS times at most.
const KEY_GAP_MS = 1000;
const KEY_RETRY_MS = 500;
const KEY_ASKS = 6;
// Media back after a loss: the page says "reconnecting" over the last frame until the other's
// video shows a frame again; none this long after the media came back: it says so, and
// stops waiting (the other side may send no video).
const FRAME_WAIT_MS = 5000;
// Renegotiation attempts (the patient): one with no answer after ANSWER_MS, or no media after
// ATTEMPT_MS, is followed by the next after a backoff from BACKOFF_MS, doubling, at most
// BACKOFF_CAP_MS: at worst attempts start at 0, 4.5, 9.5, 15.5, 23.5, 31.5... s (were 0, 4,
// 12, 28: a change whose first attempts failed came back 14 to 20 s later); ICE failing
// ends an attempt early. call.recovery_timeout_s bounds it all.
const ANSWER_MS = 2000;
const ATTEMPT_MS = 4000;
const BACKOFF_MS = 500;
const BACKOFF_CAP_MS = 4000;
const WIDE = "(min-width: 56rem)"; // style.css's desktop layout
// Failed attempts in a row before the page says what is wrong: the relay down, or its
// HTTP side up while the WebSocket (/ws) is refused or blocked (a proxy, an origin).
const HINT_AFTER = 3;

const app = {
  seat: null, // {session, role, token}
  local: null, // the local MediaStream, or null (receive only)
  rtcConfig: { iceServers: [] },
  // The relay's `call:` values (GET /rtc-config.json), in milliseconds.
  callSettings: { recoveryTimeoutMs: 60_000, mediaTimeoutMs: 3_000, heartbeatS: 1 },
  // ?recovery=ice-restart: between two browsers, recover with restartIce() on the same
  // connection instead of a new one (bench/recovery.py measures both).
  iceRestart: new URLSearchParams(location.search).get("recovery") === "ice-restart",
  // ?min-bitrate=N: the video sender's floor in kbit/s (0: none), for measurement (call.js).
  minVideoKbps: queryKbps("min-bitrate", MIN_VIDEO_KBPS),
  // ?stale-frames=keep: the video receiver keeps the stale frames that follow an outage
  // (keyframe-worker.js drops them), for measurement (bench/recovery.py).
  dropStale: new URLSearchParams(location.search).get("stale-frames") !== "keep",
  signaling: null,
  call: null,
  joinedOnce: false,
  calls: 0, // calls started by this seat: each call's console lines carry its number
  turnChecked: false, // the relay's TURN credentials were checked at this seat's first join
  wsBlocked: false, // /health answers but /ws does not: said once, not overwritten
  peerPresent: false,
  peerAway: false, // the other seat's signaling dropped; the call may go on
  ended: null, // why the last call ended: "left" | "gave-up" | "dropped" (before any call) | null
  media: null, // {call, bytes, at}: when the call's transport last received anything
  lost: null, // the media path is lost: {call, since, detectedAt, attempts, offeredAt, nextAt, backAt, method}
  awaitingFrame: null, // media is back after a loss, no video frame shown yet: {call, since, at}
  recoveries: [], // [{at_s, outage_ms, method}], like the peers' --stats-json
  statusLog: view.statusLog, // what the status line said, in order (view.js)
  keyFramesAsked: 0, // key frames this page asked for when media came back (askKeyFrame)
  seatStarted: 0, // Date.now() at the join
  pendingRemote: null, // a new call's remote stream, shown once its media flows
  stats: null, // the latest summary of getStats()...
  statsOf: null, // ...and the call it describes
  statsBase: null, // the summary the rates are measured from (about a second old)
  statsTimer: null,
  precheck: null, // the pre-call check of the start page
};
globalThis.epedicare = app; // for the tests and for debugging from the console

/** A whole number of kbit/s from the URL's query, or ``fallback`` (absent or not a number). */
function queryKbps(name, fallback) {
  const value = new URLSearchParams(location.search).get(name);
  return value !== null && /^\d{1,5}$/.test(value) ? Number(value) : fallback;
}

// -- start page --------------------------------------------------------------

function init() {
  setLanguage(initialLanguage());
  els.langSwitch.addEventListener("click", () => setLanguage(language() === "fr" ? "en" : "fr", { save: true }));
  const params = new URLSearchParams(location.search);
  if (params.get("session")) els.session.value = params.get("session");
  if (params.get("role") in OTHER) els.form.elements.role.value = params.get("role");
  if (params.get("token")) {
    els.token.value = params.get("token");
    els.tokenBox.open = true;
  }
  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    join();
  });
  els.mic.addEventListener("click", () => toggle("audio", els.mic, "call.mic.on", "call.mic.off"));
  els.camera.addEventListener("click", () => toggle("video", els.camera, "call.camera.on", "call.camera.off"));
  els.hangup.addEventListener("click", hangUp);
  els.inviteCopy.addEventListener("click", shareInvite);
  view.setInviteAction(Boolean(navigator.share));
  els.chatToggle.addEventListener("click", () => {
    if (view.toggleSheet("chat") && !els.chatInput.disabled) els.chatInput.focus();
  });
  els.detailsToggle.addEventListener("click", () => view.toggleSheet("details"));
  for (const button of document.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => {
      view.setSheet(button.dataset.close, false);
      els[`${button.dataset.close}Toggle`].focus();
    });
  }
  addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || els.callView.hidden) return;
    view.setSheet("chat", false);
    view.setSheet("details", false);
  });
  els.chatForm.addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat();
  });
  addEventListener("pagehide", () => app.signaling && app.signaling.hangUp("page closed"));
  // The network changed: the relay connection may be dead without knowing it yet.
  const networkChanged = (event) => app.signaling && app.signaling.reconnectNow(event.type);
  addEventListener("online", networkChanged);
  addEventListener("offline", networkChanged);
  if (navigator.connection) navigator.connection.addEventListener("change", networkChanged);
  if (typeof RTCPeerConnection === "undefined") {
    view.notify("rtc.unsupported");
    els.join.disabled = true;
    return;
  }
  app.precheck = new Precheck(relayUrl(), () => ({
    session: els.session.value.trim(),
    role: els.form.elements.role.value,
    token: els.token.value.trim(),
  }));
  els.precheckAgain.addEventListener("click", () => app.precheck.run());
  app.precheck.run();
  (els.session.value ? els.join : els.session).focus();
  document.body.dataset.ready = "true";
}

async function join() {
  view.clearNotice();
  const session = els.session.value.trim();
  if (!SESSION_RE.test(session)) {
    els.session.setAttribute("aria-invalid", "true");
    view.notify("error.bad-session");
    els.session.focus();
    return;
  }
  els.session.removeAttribute("aria-invalid");
  els.join.disabled = true;
  const role = els.form.elements.role.value;
  app.seat = { session, role, token: els.token.value.trim() };
  try {
    const { stream, notice } = await localMedia();
    app.local = stream;
    if (notice) view.notify(notice, {}, "info");
  } catch (err) {
    els.join.disabled = false;
    if (err instanceof MediaError) view.notify(err.key, err.params);
    else throw err;
    return;
  }
  app.rtcConfig = await loadRtcConfig();
  startSeat();
}

/** The pre-call check's camera and microphone if they are still live, else opened anew. */
async function localMedia() {
  const checked = await app.precheck.take();
  const live = (stream) => stream === null || stream.getTracks().every((track) => track.readyState === "live");
  if (checked && !checked.error && live(checked.stream)) return checked;
  if (checked && checked.stream) stopMedia(checked.stream);
  return openLocalMedia(); // MediaError when refused or busy
}

/** The relay's ICE settings for the page; none (LAN only) when it publishes none. */
async function loadRtcConfig() {
  try {
    const response = await fetch("rtc-config.json", { cache: "no-store" });
    if (response.ok) {
      const data = await response.json();
      const call = data.call || {};
      const seconds = (name, fallback) => (Number.isFinite(call[name]) && call[name] > 0 ? call[name] : fallback);
      app.callSettings = {
        recoveryTimeoutMs: 1000 * seconds("recovery_timeout_s", 60),
        mediaTimeoutMs: 1000 * seconds("media_timeout_s", 3),
        heartbeatS: seconds("heartbeat_s", 1),
      };
      return {
        iceServers: Array.isArray(data.iceServers) ? data.iceServers : [],
        iceTransportPolicy: data.iceTransportPolicy === "relay" ? "relay" : "all",
      };
    }
  } catch (err) {
    console.warn("rtc-config.json unreadable; no ICE servers:", err.message);
  }
  return { iceServers: [] };
}

function startSeat() {
  Object.assign(app, {
    joinedOnce: false, peerPresent: false, peerAway: false, ended: null,
    lost: null, recoveries: [], seatStarted: Date.now(), calls: 0, wsBlocked: false, turnChecked: false,
  });
  view.renderRecoveries(0);
  view.showCall(app.seat.session, OTHER[app.seat.role]);
  els.localVideo.srcObject = app.local;
  els.localVideo.hidden = !(app.local && app.local.getVideoTracks().length);
  view.setToggle(els.mic, false, "call.mic.on", "call.mic.off");
  view.setToggle(els.camera, false, "call.camera.on", "call.camera.off");
  els.mic.disabled = !(app.local && app.local.getAudioTracks().length);
  els.camera.disabled = !(app.local && app.local.getVideoTracks().length);
  view.showInvite(null); // the practitioner's comes with the relay's invite frame
  view.setChatOpen(false);
  view.renderStats(null);
  if (matchMedia(WIDE).matches) view.setSheet("chat", true); // room for it beside the video

  const signaling = new Signaling(relayUrl(), app.seat, heartbeatOptions(app.callSettings.heartbeatS));
  app.signaling = signaling;
  signaling.addEventListener("joined", ({ detail }) => onJoined(detail));
  signaling.addEventListener("frame", ({ detail }) => onFrame(detail));
  signaling.addEventListener("refused", ({ detail }) => onRefused(detail));
  signaling.addEventListener("state", () => renderStatus());
  signaling.addEventListener("retry", ({ detail }) => {
    // Unreachable: never opened, or dropped without a closing handshake (1006).
    // A relay that closed on purpose (server-full) has said why already.
    if (!app.joinedOnce && (detail.code === undefined || detail.code === 1006)) {
      const seconds = Math.ceil(detail.delay / 1000);
      if (!app.wsBlocked) view.notify("server.unreachable", { seconds });
      if (detail.attempt === HINT_AFTER) explainUnreachable(signaling, seconds);
    }
  });
  signaling.addEventListener("fatal", ({ detail }) => onFatal(detail));
  signaling.start();
  renderStatus();
}

/** After HINT_AFTER failed attempts: if the relay's HTTP side answers, the WebSocket is what
 * fails (a proxy without the upgrade, a firewall, an origin the relay does not accept). */
async function explainUnreachable(signaling, seconds) {
  if (!(await httpOk("health")) || signaling !== app.signaling || app.joinedOnce) return;
  app.wsBlocked = true;
  console.info(`signaling: /health answers but ${signaling.url} does not open (${HINT_AFTER} attempts)`);
  view.notify("server.ws-blocked", { seconds });
}

/** The relay's short-lived TURN credentials, checked once per seat as soon as it joins (before
 * the other side is there, as the aiortc peers do): a refusal or no answer is said at once. */
async function checkTurnAtJoin(iceServers) {
  const servers = turnServers(iceServers);
  if (!servers.length) return;
  app.turnChecked = true;
  const signaling = app.signaling;
  const { result } = await checkTurn(servers);
  if (result === "ok" || signaling !== app.signaling) return;
  view.notify(`turn.${result}`, { seconds: TURN_TIMEOUT_MS / 1000 });
}

/** The patient's link: this page's address, the session, and the token the relay minted. */
function inviteLink(token) {
  const url = new URL(location.pathname, location.origin);
  const params = { session: app.seat.session, role: "patient" };
  if (token) params.token = token;
  url.search = new URLSearchParams(params).toString();
  return url.toString();
}

/** One click: the share sheet where the browser has one (phones), else the clipboard. */
async function shareInvite() {
  const url = els.inviteLink.value;
  if (!url) return;
  if (navigator.share) {
    try {
      await navigator.share({ title: t("call.invite.share-title"), url });
      return;
    } catch (err) {
      if (err.name === "AbortError") return; // the person closed the share sheet
    }
  }
  try {
    await navigator.clipboard.writeText(url);
  } catch {
    els.inviteLink.select(); // no clipboard access: selected, for Ctrl-C
    return;
  }
  view.inviteCopied();
}

// -- signaling -----------------------------------------------------------------

function onJoined(frame) {
  if (!app.joinedOnce && ["server.unreachable", "server.ws-blocked"].includes(els.notice.dataset.key)) {
    view.clearNotice();
  }
  app.joinedOnce = true;
  if (Array.isArray(frame.ice_servers) && frame.ice_servers.length) {
    app.rtcConfig = { ...app.rtcConfig, iceServers: frame.ice_servers };
    if (!app.turnChecked) checkTurnAtJoin(frame.ice_servers);
  }
  app.peerPresent = frame.peer;
  app.peerAway = false;
  // The practitioner asks the relay for the patient's link (docs/protocol.md, invite).
  if (app.seat.role === "practitioner") app.signaling.send({ type: "invite", token: app.seat.token || undefined });
  // A rejoin keeps a call that is still alive; otherwise the patient offers.
  if (frame.peer && app.seat.role === "patient" && !(app.call && app.call.alive)) {
    if (!app.lost) startCall(); // a lost path: recover() renegotiates now that the signaling is back
  }
  if (app.lost) recover(Date.now()); // not at the next sample: the signaling is back now
  renderStatus();
}

function onFrame(frame) {
  switch (frame.type) {
    case "peer-joined":
      app.peerPresent = true;
      app.peerAway = false;
      app.ended = null;
      // resumed: the same client came back (signaling reconnect): the call goes on,
      // or its recovery does (the patient renegotiates as soon as it may: see recover()).
      if (frame.resumed && app.lost) {
        app.lost.nextAt = Math.min(app.lost.nextAt, Date.now());
      } else if (!(frame.resumed && app.call && app.call.alive)) {
        if (app.seat.role === "patient") startCall();
        else endCall(); // a new patient client will offer
      }
      break;
    case "peer-left": {
      app.peerPresent = false;
      const other = OTHER[app.seat.role];
      if (frame.reason === "disconnected" && app.call && (app.call.alive || app.lost)) {
        app.peerAway = true; // not a hang-up: media may still flow
        callLog(app.call, `the ${other}'s signaling dropped: the call goes on`);
      } else {
        // Gone before any call connected, without a bye: it may come back; no call to speak of.
        const dropped = frame.reason !== "bye" && !(app.call && app.call.everConnected);
        endCall();
        app.ended = dropped ? "dropped" : "left";
        if (dropped) console.info(`the ${other}'s signaling dropped (${frame.reason}); no call in progress`);
      }
      break;
    }
    case "offer":
      if (app.seat.role === "practitioner") answerCall(frame.sdp);
      break;
    case "answer":
      if (app.call) app.call.accept(frame.sdp).catch(callFailed);
      break;
    case "candidate":
      if (app.call) app.call.addCandidate(frame.candidate);
      break;
    case "invite":
      view.showInvite(inviteLink(frame.token));
      break;
    default:
      break; // "bye" is followed by peer-left; unknown types are ignored
  }
  renderStatus();
}

function onRefused(frame) {
  const key = hasKey(`error.${frame.code}`) ? `error.${frame.code}` : "error.unknown";
  view.notify(key, { message: frame.message, other: OTHER[app.seat.role], role: app.seat.role });
}

function onFatal({ code, message }) {
  endCall();
  stopMedia(app.local);
  app.local = null;
  app.signaling = null;
  view.showStart();
  app.precheck.run();
  if (code === "replaced") view.notify("server.replaced");
  else onRefused({ code, message });
}

// -- calls -------------------------------------------------------------------

function newCall({ recovering = false } = {}) {
  endCall({ recovering });
  app.signaling.clearOutbox();
  app.ended = null;
  const call = new Call(app.rtcConfig, app.local, app.minVideoKbps, app.dropStale);
  call.number = ++app.calls;
  app.call = call;
  app.media = { call, bytes: 0, at: Date.now() };
  call.addEventListener("signal", ({ detail }) => call === app.call && app.signaling.send(detail));
  call.addEventListener("remote", ({ detail }) => call === app.call && showRemote(detail));
  call.addEventListener("state", ({ detail }) => onCallState(call, detail));
  call.addEventListener("keyframe", ({ detail }) => detail.sent || callLog(call, `no key frame request: ${detail.error}`));
  call.addEventListener("stale", ({ detail }) => callLog(call, `${detail.dropped} stale video frame(s) dropped (up to ${detail.worstMs} ms late); key frame asked`));
  call.addEventListener("chat", ({ detail }) => view.addChatLine(detail.text, false, OTHER[app.seat.role]));
  call.addEventListener("chatstate", ({ detail }) => call === app.call && view.setChatOpen(detail));
  app.statsTimer = setInterval(updateStats, STATS_INTERVAL_MS);
  return call;
}

function startCall() {
  const call = newCall();
  call.offer().then(() => callLog(call, `offer sent to the ${OTHER[app.seat.role]}`), callFailed);
}

/** One console line about one call, with its number ("call 2: connected"). */
function callLog(call, text) {
  console.info(`call ${call ? call.number : "-"}: ${text}`);
}

/** The chat of a call whose offer has no data channel (m=application) cannot open: say so. */
function chatOffered(call, sdp) {
  if (!/^m=application /m.test(sdp || "")) {
    callLog(call, `the ${OTHER[app.seat.role]} opened no chat channel`);
    if (call === app.call) view.setChatOpen(false, OTHER[app.seat.role]);
  }
}

/** An offer: the first, a recovery's new connection, or an ICE restart of this one. */
function answerCall(sdp) {
  const call = app.call;
  if (call && !call.closed && call.remoteFingerprint && fingerprint(sdp) === call.remoteFingerprint) {
    if (!app.lost && call.everConnected) pathLost(app.media.at, "ice-restart");
    if (app.lost) app.lost.method = "ice-restart";
    call.reanswer(sdp).catch(callFailed);
    return;
  }
  // An offer during a call: the patient lost the path (maybe before this side saw it).
  if (call && call.everConnected && !app.lost) pathLost(app.media.at);
  const next = newCall({ recovering: Boolean(app.lost) });
  chatOffered(next, sdp);
  next.answer(sdp).then(() => callLog(next, `answer sent to the ${OTHER[app.seat.role]}`), callFailed);
}

/** Close the call; recovering: a new one follows at once (keep the last frame and the watch). */
function endCall({ recovering = false } = {}) {
  clearInterval(app.statsTimer);
  app.statsTimer = null;
  if (app.call) {
    const call = app.call;
    app.call = null;
    if (recovering) view.freezeRemote(); // closing ends its tracks: the video would go black
    call.close();
  }
  app.pendingRemote = null;
  if (recovering) return;
  app.lost = null;
  app.awaitingFrame = null;
  els.remoteVideo.srcObject = null;
  els.remoteFrozen.hidden = true;
  view.setChatOpen(false);
  // The statistics described that call: none until the next one measures.
  app.stats = null;
  app.statsOf = null;
  view.renderStats(null);
}

function onCallState(call, state) {
  callLog(call, state);
  if (call !== app.call) return;
  if (state === "connected") updateStats();
  if (state === "failed" && (app.peerPresent || app.peerAway)) {
    // Not the end of the call while the other seat is there: the path is lost.
    if (!app.lost) pathLost(call.everConnected ? app.media.at : Date.now());
    else if (app.lost.attempts > 0) app.lost.nextAt = Date.now() + backoffMs(app.lost.attempts); // this attempt failed
  }
  renderStatus();
}

function callFailed(err) {
  console.error("call:", err);
  view.notify("media.other", { name: err.name || "Error" });
}

function showRemote(stream) {
  if (app.lost && els.remoteVideo.srcObject) {
    app.pendingRemote = stream; // keep the last frame until the new call's media flows
    return;
  }
  if (els.remoteVideo.srcObject !== stream) els.remoteVideo.srcObject = stream;
  els.remoteVideo.play().catch(() => {}); // autoplay may wait for a gesture; the join was one
}

async function updateStats() {
  const call = app.call;
  if (!call) return;
  let report;
  try {
    report = await call.pc.getStats();
  } catch {
    return; // closed meanwhile
  }
  const base = app.statsOf === call ? app.statsBase : null;
  const summary = summarize(report, base);
  if (call !== app.call) return;
  if (!base || summary.time - base.time >= STATS_WINDOW_MS) app.statsBase = summary;
  app.stats = summary;
  app.statsOf = call;
  watchPath(call, summary.transportBytes);
  askKeyFrame(call, summary.inVideo.framesDecoded);
  if (app.awaitingFrame && Date.now() - app.awaitingFrame.at >= FRAME_WAIT_MS) {
    callLog(call, `no video frame shown ${FRAME_WAIT_MS} ms after media came back`);
    frameShown(app.awaitingFrame, false);
  }
  view.renderStats(summary);
  renderStatus();
}

// -- recovery: a lost media path while the other seat is there (issue 12) ----------

/** Each getStats(): did anything arrive on the call's transport? */
function watchPath(call, bytes) {
  const now = Date.now();
  const media = app.media;
  // This page was not sampled for a while (a stalled tab, a machine under load): the silence
  // is ours, not the path's; count from now.
  if (now - (media.sampledAt ?? now) > 3 * STATS_INTERVAL_MS) media.at = Math.max(media.at, now - STATS_INTERVAL_MS);
  media.sampledAt = now;
  if (bytes > media.bytes) {
    // After a gap this side, as a receiver, asks for a key frame (askKeyFrame). Forcing one
    // from the sending side (pausing and resuming its encoding) made it worse, and is not
    // needed: Chromium and the aiortc peers ask too (docs/benchmarks.md).
    if (now - media.at >= KEY_GAP_MS) media.keyWanted = { asks: 0, at: 0, silentMs: now - media.at };
    media.bytes = bytes;
    media.at = now;
    if (app.lost && call.connectionState === "connected") recovered(call, now);
    return;
  }
  const present = app.peerPresent || app.peerAway;
  const silent = now - media.at;
  if (call.everConnected && present && silent >= Math.min(PROBE_MS, app.callSettings.mediaTimeoutMs / 2)) {
    // A network change kills the relay connection too: noticed here in 1.5 heartbeats
    // instead of the heartbeat's 2.5, so the offer can go as soon as the path is called lost.
    if (app.signaling.probe("media and relay silent")) renderStatus();
  }
  if (!app.lost && call.everConnected && present && silent >= app.callSettings.mediaTimeoutMs) {
    pathLost(media.at);
  }
  if (app.lost) recover(now);
}

/**
 * Media came back after a silence (watchPath): until a video frame decodes, ask for a key frame
 * (Chromium's receiver would ask only 3 s after its last frame: see Call.requestKeyFrame).
 */
function askKeyFrame(call, framesDecoded) {
  const media = app.media;
  if (media.call !== call) return; // a recovery replaced the call meanwhile
  const wanted = media.keyWanted;
  const decoded = framesDecoded > (media.frames ?? 0);
  media.frames = framesDecoded;
  if (!wanted) return;
  // Nothing decoded before (no video from the other side): nothing to restart.
  if (decoded || framesDecoded === 0 || wanted.asks >= KEY_ASKS) {
    if (wanted.asks > 0) callLog(call, decoded ? `video decoded again after ${wanted.asks} key frame request(s)` : "no video decoded after the key frame requests");
    media.keyWanted = null;
    return;
  }
  const now = Date.now();
  if (now - wanted.at < KEY_RETRY_MS || !call.requestKeyFrame()) return;
  wanted.asks += 1;
  wanted.at = now;
  app.keyFramesAsked += 1;
  if (wanted.asks === 1) callLog(call, `key frame asked (media back after ${wanted.silentMs} ms without)`);
}

/** Nothing arrived since ``since`` (or ICE failed): recovering until media flows again. */
function pathLost(since, method = null) {
  const now = Date.now();
  app.lost = { call: app.call, since, detectedAt: now, attempts: 0, nextAt: 0, backAt: null, method };
  app.awaitingFrame = null;
  // The last frame stays until the video shows a new one (frameShown), whatever brings it
  // back: the old path, a new connection, an ICE restart.
  view.freezeRemote();
  callLog(app.call, `path lost (nothing received for ${now - since} ms)`);
  renderStatus();
}

/** The patient renegotiates once the signaling is back, with bounded, spaced attempts. */
function recover(now) {
  const lost = app.lost;
  if (now - lost.since >= app.callSettings.recoveryTimeoutMs) {
    giveUp(now - lost.since);
    return;
  }
  if (app.seat.role !== "patient") return;
  const call = app.call;
  const unanswered = lost.attempts > 0 && call && !call.closed && call.pc.signalingState === "have-local-offer";
  if (unanswered && now - lost.offeredAt >= ANSWER_MS) {
    lost.nextAt = Math.min(lost.nextAt, lost.offeredAt + ANSWER_MS + backoffMs(lost.attempts)); // no answer
  }
  if (now < lost.nextAt) return;
  // No offer while the network is gone: the relay must have answered since the path went
  // quiet (a rejoin, or a pong well after it), and the other seat's signaling must be there.
  const signaling = app.signaling;
  const heard = signaling.joinedAt > lost.since || signaling.lastHeard > lost.since + 1000;
  if (signaling.state !== "joined" || !heard) return;
  if (!app.peerPresent || app.peerAway) return;
  const failed = !call || call.closed || call.connectionState === "failed";
  if (lost.attempts === 0 && !failed) {
    lost.backAt ??= now;
    if (now - lost.backAt < SAME_PATH_GRACE_MS) return; // the old path may come back first
  }
  renegotiate(lost);
}

function renegotiate(lost) {
  lost.attempts += 1;
  lost.offeredAt = Date.now();
  lost.nextAt = lost.offeredAt + ATTEMPT_MS + backoffMs(lost.attempts);
  const call = app.call;
  if (app.iceRestart && call && !call.closed && call.remoteFingerprint && remoteIsBrowser(call)) {
    lost.method = "ice-restart";
    callLog(call, `path lost; restarting ICE (attempt ${lost.attempts})`);
    call.restartIce().catch(callFailed);
  } else {
    lost.method = "new-connection";
    const next = newCall({ recovering: true });
    callLog(next, `path lost; renegotiating (attempt ${lost.attempts})`);
    next.offer().catch(callFailed);
  }
}

/** The pause after failed attempt ``attempt`` (1, 2...) before the next: doubling, capped. */
function backoffMs(attempt) {
  return Math.min(BACKOFF_MS * 2 ** (attempt - 1), BACKOFF_CAP_MS);
}

/** aiortc has no ICE restart (aiortc issue 211); browsers announce extmap-allow-mixed. */
function remoteIsBrowser(call) {
  const sdp = call.pc.remoteDescription ? call.pc.remoteDescription.sdp : "";
  return /^a=extmap-allow-mixed/m.test(sdp);
}

function recovered(call, now) {
  const lost = app.lost;
  app.lost = null;
  const method = call !== lost.call ? "new-connection" : lost.method === "ice-restart" ? "ice-restart" : "same-path";
  const recovery = { at_s: (lost.since - app.seatStarted) / 1000, outage_ms: now - lost.since, method };
  app.recoveries.push(recovery);
  callLog(call, `media back after ${recovery.outage_ms} ms (${method})`);
  if (app.pendingRemote) showRemote(app.pendingRemote);
  app.pendingRemote = null;
  view.renderRecoveries(app.recoveries.length);
  if (view.remoteFrozen()) {
    // Media flows; the user sees it when the video shows a frame: "reconnecting" until then.
    const wait = { call, since: lost.since, at: now };
    app.awaitingFrame = wait;
    view.whenRemoteFrame(() => frameShown(wait));
  }
  if (els.notice.dataset.key === "call.gave-up") view.clearNotice();
}

/** The video shows a frame again after a recovery (shown), or FRAME_WAIT_MS passed: the last
 * frame goes, and the status says what the call does. */
function frameShown(wait, shown = true) {
  if (app.awaitingFrame !== wait) return; // lost again, or the call ended, meanwhile
  app.awaitingFrame = null;
  view.thawRemote();
  if (shown) callLog(wait.call, `video shown again ${Date.now() - wait.since} ms after the loss`);
  renderStatus();
}

/** recovery_timeout_s without media: say so; the seat stays (a reload or a new offer still works). */
function giveUp(elapsed) {
  const other = OTHER[app.seat.role];
  callLog(app.call, `gave up after ${elapsed} ms without media`);
  endCall();
  app.ended = "gave-up";
  view.notify("call.gave-up", { other, seconds: Math.round(app.callSettings.recoveryTimeoutMs / 1000) });
  renderStatus();
}

// -- status ------------------------------------------------------------------

function renderStatus() {
  if (!app.signaling) return;
  const other = OTHER[app.seat.role];
  const server = app.signaling.state;
  if (!app.joinedOnce) {
    view.renderStatus({ state: "signaling", key: "state.signaling" }, null);
    return;
  }
  view.renderStatus(callStatus(other), serverStatus(server, other));
}

function callStatus(other) {
  const call = app.call;
  // Lost (or back, until the video shows a frame again); or ICE says nothing arrives on the
  // path (disconnected) before the media timeout calls it lost: not "connecting" meanwhile.
  let since = app.lost ? app.lost.since : app.awaitingFrame ? app.awaitingFrame.since : null;
  if (since === null && call && call.everConnected && call.connectionState === "disconnected") {
    since = app.media.at;
  }
  if (since !== null) {
    const seconds = Math.floor((Date.now() - since) / 1000);
    return { state: "recovering", key: "state.recovering", params: { seconds } };
  }
  if (call && call.connectionState === "connected") {
    // Plain words here; the path's jargon (host/udp, TURN/tcp) is in the details.
    const path = app.statsOf === call ? app.stats.path : null;
    return { state: "connected", key: path && path.relayed ? "state.connected-relay" : "state.connected" };
  }
  if (call) return { state: "connecting", key: "state.connecting" };
  if (app.ended === "left") return { state: "left", key: "state.left", params: { other } };
  if (app.ended === "dropped") return { state: "waiting", key: "state.peer-dropped", params: { other } };
  if (app.ended === "gave-up") return { state: "gave-up", key: "state.gave-up", params: { other } };
  if (app.peerPresent) return { state: "connecting", key: "state.connecting" };
  return { state: "waiting", key: "state.waiting", params: { other } };
}

function serverStatus(server, other) {
  if (server === "reconnecting" || server === "connecting") {
    return { state: "reconnecting", key: "state.reconnecting" };
  }
  if (app.peerAway) return { state: "peer-away", key: "state.peer-away", params: { other } };
  return null;
}

// -- controls ------------------------------------------------------------------

function toggle(kind, button, keyOn, keyOff) {
  const tracks = app.local ? app.local.getTracks().filter((track) => track.kind === kind) : [];
  if (!tracks.length) return;
  const off = tracks[0].enabled; // enabled now: turning it off
  for (const track of tracks) track.enabled = !off;
  view.setToggle(button, off, keyOn, keyOff);
}

function hangUp() {
  if (app.signaling) app.signaling.hangUp();
  app.signaling = null;
  endCall();
  stopMedia(app.local);
  app.local = null;
  els.localVideo.srcObject = null;
  view.showStart();
  app.precheck.idle();
  view.notify("state.ended", {}, "info");
  els.join.focus();
}

function sendChat() {
  const text = els.chatInput.value;
  if (!text.trim() || !app.call || !app.call.sendChat(text)) return;
  view.addChatLine(text, true);
  els.chatInput.value = "";
  els.chatInput.focus();
}

init();
