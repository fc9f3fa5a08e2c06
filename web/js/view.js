// What the page shows: views, the notice, the status line, statistics, chat.
// No call logic here; app.js decides, this module draws.

import { setLabel, setText, t } from "./i18n.js";
import { formatBitrate, formatFps, formatLoss, formatRtt, formatSize } from "./stats.js";

const $ = (id) => document.getElementById(id);

export const els = {
  startView: $("start-view"),
  callView: $("call-view"),
  form: $("join-form"),
  session: $("session"),
  token: $("token"),
  tokenBox: $("token-box"),
  join: $("join"),
  notice: $("notice"),
  status: $("status"),
  remoteVideo: $("remote-video"),
  remoteFrozen: $("remote-frozen"),
  localVideo: $("local-video"),
  mic: $("mic"),
  camera: $("camera"),
  hangup: $("hangup"),
  invite: $("invite"),
  inviteLink: $("invite-link"),
  inviteCopy: $("invite-copy"),
  stats: $("stats"),
  chatLog: $("chat-log"),
  chatClosed: $("chat-closed"),
  chatForm: $("chat-form"),
  chatInput: $("chat-input"),
  chatSend: $("chat-send"),
  langSwitch: $("lang-switch"),
  quality: $("quality"),
  chatToggle: $("chat-toggle"),
  chatUnread: $("chat-unread"),
  chatPanel: $("chat-panel"),
  detailsToggle: $("details-toggle"),
  detailsPanel: $("details-panel"),
  precheck: $("precheck"),
  precheckVideo: $("precheck-video"),
  precheckVerdict: $("precheck-verdict"),
  precheckAgain: $("precheck-again"),
  micLevel: $("mic-level"),
};

// The sheets opened from the controls: name -> [toggle button, panel].
const SHEETS = { chat: [els.chatToggle, els.chatPanel], details: [els.detailsToggle, els.detailsPanel] };

/**
 * Keep the remote video's last frame on screen: drawn into a canvas over the video, which
 * turns black once its tracks end (a recovery closing the old connection). Once only: a
 * second call while frozen keeps the first drawing.
 */
export function freezeRemote() {
  const video = els.remoteVideo;
  const canvas = els.remoteFrozen;
  if (!canvas.hidden || !video.srcObject || !video.videoWidth) return;
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.hidden = false;
}

/** Is the last frame drawn over the remote video (freezeRemote)? */
export function remoteFrozen() {
  return !els.remoteFrozen.hidden;
}

/** The drawn last frame goes: the video shows what it has. */
export function thawRemote() {
  els.remoteFrozen.hidden = true;
}

/** ``callback()`` when the remote video next presents a frame (at once where it cannot say). */
export function whenRemoteFrame(callback) {
  const video = els.remoteVideo;
  if (video.srcObject && video.requestVideoFrameCallback) video.requestVideoFrameCallback(() => callback());
  else callback();
}

export function showStart() {
  els.callView.hidden = true;
  els.startView.hidden = false;
  els.join.disabled = false;
  document.body.classList.remove("in-call");
}

export function showCall(session, other) {
  els.startView.hidden = true;
  els.callView.hidden = false;
  document.body.classList.add("in-call");
  for (const name of Object.keys(SHEETS)) setSheet(name, false);
  els.chatLog.replaceChildren();
  els.chatUnread.hidden = true;
  setText($("call-title"), "call.title", { session });
  setLabel(els.remoteVideo, "call.remote", { other });
  document.title = `e-PediCare Call · ${session}`;
}

/** A message in the page: kind "error" (alert) or "info". key is an i18n key. */
export function notify(key, params = {}, kind = "error") {
  els.notice.hidden = false;
  els.notice.className = `notice ${kind}`;
  els.notice.dataset.key = key;
  setText(els.notice, key, params);
}

export function clearNotice() {
  els.notice.hidden = true;
  els.notice.textContent = "";
  delete els.notice.dataset.key;
}

// What the status line said, in order: {n, at, state, server, text} (text: the call's words),
// the last STATUS_LOG_MAX; n counts from 1. For the tests and for debugging: a state that
// lasts less than a poll is still seen (epedicare.statusLog).
export const statusLog = [];
const STATUS_LOG_MAX = 1000;
let statusCount = 0;

/**
 * The status line: what the call is doing, then the server's state when it matters.
 * call: {state, key, params}; server: {state, key, params} or null.
 */
export function renderStatus(call, server) {
  // Called several times a second: touch the live region only when its words change
  // (a screen reader reads each change; the elapsed seconds change once a second).
  const signature = JSON.stringify([call, server, document.documentElement.lang]);
  if (els.status.dataset.signature === signature) return;
  els.status.dataset.signature = signature;
  els.status.dataset.state = call.state;
  els.callView.dataset.state = call.state;
  els.status.dataset.server = server ? server.state : "ok";
  els.status.replaceChildren();
  for (const part of [call, server]) {
    if (!part) continue;
    const span = document.createElement("span");
    span.className = `status-${part === call ? "call" : "server"}`;
    setText(span, part.key, part.params || {});
    els.status.append(span);
  }
  const text = els.status.querySelector(".status-call").textContent;
  statusLog.push({ n: ++statusCount, at: Date.now(), state: call.state, server: els.status.dataset.server, text });
  if (statusLog.length > STATUS_LOG_MAX) statusLog.shift();
}

/** The statistics sheet; summary null: nothing measured (no call, or it ended). */
export function renderStats(summary) {
  const path = summary && summary.path;
  const cells = {
    path: path ? t(path.relayed ? "stats.path.relay" : "stats.path.direct", { path: path.text }) : "–",
    quality: summary
      ? `${t(`quality.text.${summary.quality}`)} (${formatLoss(summary.loss)}, ${formatRtt(summary.rtt)})`
      : "–",
    "in-bitrate": formatBitrate(summary ? summary.inVideo.bitrate + (summary.inAudio.bitrate || 0) : null),
    "out-bitrate": formatBitrate(summary ? summary.outVideo.bitrate : null),
    "in-fps": formatFps(summary && summary.inVideo.fps),
    "out-fps": formatFps(summary && summary.outVideo.fps),
    "in-size": summary ? formatSize(summary.inVideo.width, summary.inVideo.height) : "–",
    "out-size": summary ? formatSize(summary.outVideo.width, summary.outVideo.height) : "–",
    rtt: formatRtt(summary ? summary.rtt : null),
    lost: summary ? String(summary.inVideo.packetsLost + summary.inAudio.packetsLost) : "–",
  };
  for (const [name, text] of Object.entries(cells)) {
    els.stats.querySelector(`[data-stat="${name}"]`).textContent = text;
  }
  renderQuality(summary ? summary.quality : "none");
}

/** The bars: "good" (three), "fair" (two), "poor" (one), "none" (none lit). */
export function renderQuality(level) {
  els.quality.dataset.level = level;
  setLabel(els.quality, `quality.${level}`);
  els.quality.title = els.quality.getAttribute("aria-label");
}

/** How many times the call came back after losing its path (this seat). */
export function renderRecoveries(count) {
  els.stats.querySelector('[data-stat="recoveries"]').textContent = String(count);
}

/** Open or close a sheet (chat or details); on a phone they cover part of the video. */
export function setSheet(name, open) {
  const [button, panel] = SHEETS[name];
  button.setAttribute("aria-expanded", String(open));
  panel.hidden = !open;
  if (name === "chat" && open) {
    els.chatUnread.hidden = true;
    els.chatUnread.textContent = "";
  }
}

export function toggleSheet(name) {
  const open = SHEETS[name][1].hidden;
  // One sheet at a time on a phone: they share the space above the controls.
  if (open && matchMedia("(max-width: 55.99rem)").matches) {
    for (const other of Object.keys(SHEETS)) if (other !== name) setSheet(other, false);
  }
  setSheet(name, open);
  return open;
}

/** The chat's input; closed, its line says why: not connected yet, or (withoutChat: the other
 * role) the other side's app opened no chat channel in this call. */
export function setChatOpen(open, withoutChat = null) {
  els.chatInput.disabled = !open;
  els.chatSend.disabled = !open;
  els.chatClosed.hidden = open;
  if (withoutChat) setText(els.chatClosed, "chat.unavailable", { other: withoutChat });
  else setText(els.chatClosed, "chat.closed");
}

/** One chat line; mine: sent by this page. Text only, never HTML. */
export function addChatLine(text, mine, otherRole) {
  const item = document.createElement("li");
  item.className = mine ? "mine" : "theirs";
  const who = document.createElement("span");
  who.className = "who";
  setText(who, mine ? "chat.me" : `other.${otherRole}`);
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  els.chatLog.append(item);
  els.chatLog.scrollTop = els.chatLog.scrollHeight;
  if (!mine && els.chatPanel.hidden) {
    els.chatUnread.hidden = false;
    els.chatUnread.textContent = String(Number(els.chatUnread.textContent || 0) + 1);
  }
}

/** A toggle button: pressed means "off" (muted, camera off). */
export function setToggle(button, off, keyOn, keyOff) {
  button.setAttribute("aria-pressed", String(off));
  setText(button.querySelector(".label"), off ? keyOn : keyOff);
}

// -- the pre-call check ------------------------------------------------------------

/** One line of the check: name camera|mic|relay, state running|ok|warn|fail, key its text. */
export function renderCheck(name, state, key, params = {}) {
  const line = $(`check-${name}`);
  line.dataset.state = state;
  setText(line.querySelector(".check-text"), key, params);
}

/** Show or hide a check's line (the TURN check: only when the page has a TURN server). */
export function showCheck(name, shown) {
  $(`check-${name}`).hidden = !shown;
}

/** The verdict: running, ok, media (joinable, a device missing), relay-down, ws-blocked,
 * turn-refused, turn-unreachable. */
export function renderVerdict(verdict) {
  els.precheck.dataset.verdict = verdict;
  setText(els.precheckVerdict, `check.verdict.${verdict}`);
}

export function showInvite(url) {
  els.invite.hidden = !url;
  els.inviteLink.value = url || "";
  setText(els.inviteCopy, els.inviteCopy.dataset.action);
}

/** The invitation's button: "share" where the browser has a share sheet, else "copy". */
export function setInviteAction(share) {
  els.inviteCopy.dataset.action = share ? "call.invite.share" : "call.invite.copy";
  setText(els.inviteCopy, els.inviteCopy.dataset.action);
}

export function inviteCopied() {
  setText(els.inviteCopy, "call.invite.copied");
  clearTimeout(inviteCopied.timer);
  inviteCopied.timer = setTimeout(() => setText(els.inviteCopy, els.inviteCopy.dataset.action), 2000);
}
