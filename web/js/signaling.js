// The relay client: join, send, receive, heartbeat, reconnect with backoff and
// rejoin with the resume key. A dropped connection never touches the call: the
// page's call goes on while this reconnects.
//
// Events (CustomEvent, detail is the frame unless said otherwise):
//   joined            the relay accepted the join (first time or rejoin)
//   frame             any other frame from the relay (peer-joined, peer-left, offer, ...)
//   refused           an error frame (the connection stays open)
//   state             detail: "connecting" | "joined" | "reconnecting" | "stopped"
//   retry             detail: {delay, reason, code, attempt}: a reconnection is scheduled (code: the
//                     close code; attempt: failed attempts in a row, 1 for the first)
//   fatal             detail: {code, message}: stopped for good (join refused, replaced)

const CLOSE_REPLACED = 4001;
// Join refusals that retrying cannot fix: the person must change something.
const FATAL_JOIN_CODES = new Set([
  "bad-session", "bad-role", "role-taken", "bad-token", "token-expired", "token-not-yet-valid",
  "missing-field", "bad-field", "already-joined",
]);
const FORWARDED = new Set(["offer", "answer", "candidate"]);

export const DEFAULTS = {
  // Application heartbeat (browsers send no WebSocket pings): a ping each second,
  // dead after 2.5 s without hearing anything, so a dead network is noticed in
  // about 3 s (the relay's call.heartbeat_s sets the interval; see heartbeatOptions).
  pingIntervalMs: 1_000,
  deadAfterMs: 2_500, // nothing heard for this long: the connection is dead
  openTimeoutMs: 2_500, // a connection still not open after this: try again
  joinTimeoutMs: 10_000, // no answer to join: reconnect
  backoffBaseMs: 500,
  backoffCapMs: 10_000,
  // The first reconnection after the relay itself went away (close 1001 or
  // 1012) waits a random moment in this window: every page of that relay
  // comes back at once, and a few thousand in the same 100 ms would queue
  // their handshakes past the relay's timeout (peers/errors.py RESTART_SPREAD_S).
  restartSpreadMs: 2_000,
};

const RELAY_AWAY_CODES = new Set([1001, 1012]);

// A relay that stops gives each page its moment to come back in the close
// reason, "relay shutting down; reconnect in 3.25 s" (relay.py RECONNECT_REASON,
// peers/errors.py RESTART_DELAY_RE); past restartDelayMaxMs it waits that.
const RESTART_DELAY_RE = /reconnect in ([0-9]{1,6}(?:\.[0-9]{1,3})?) s/;
const restartDelayMaxMs = 300_000;

/** The first delay after a relay restart: the one its close reason gives, else anywhere in the spread. */
export function restartDelay({ restartSpreadMs } = DEFAULTS, reason = "") {
  const found = RESTART_DELAY_RE.exec(reason);
  if (found) return Math.min(Math.round(Number(found[1]) * 1000), restartDelayMaxMs);
  return Math.round(Math.random() * restartSpreadMs);
}

/** The heartbeat's options for call.heartbeat_s seconds. */
export function heartbeatOptions(heartbeatS) {
  const ms = Math.max(100, heartbeatS * 1000);
  return { pingIntervalMs: ms, deadAfterMs: 2.5 * ms, openTimeoutMs: 2.5 * ms };
}

/** Jittered, capped exponential backoff: attempt 0, 1, 2... */
export function backoffDelay(attempt, { backoffBaseMs, backoffCapMs } = DEFAULTS) {
  const ceiling = Math.min(backoffCapMs, backoffBaseMs * 2 ** attempt);
  return Math.round(ceiling * (0.5 + Math.random() * 0.5));
}

export function relayUrl(loc = location) {
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

export class Signaling extends EventTarget {
  constructor(url, { session, role, token }, options = {}) {
    super();
    this.url = url;
    this.seat = { session, role, token: token || undefined };
    this.options = { ...DEFAULTS, ...options };
    this.resume = undefined; // the relay's key for this seat, once joined
    this.state = "stopped";
    this.attempt = 0;
    this.outbox = []; // offer/answer/candidate frames waiting for a rejoin
    this.ws = null;
    this.timers = {};
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  /** Send a frame. Call frames sent while away wait for the rejoin. */
  send(frame) {
    if (this.state === "joined") {
      this.ws.send(JSON.stringify(frame));
    } else if (FORWARDED.has(frame.type)) {
      this.outbox.push(frame);
    }
  }

  /** Forget call frames not sent yet (the call they belong to is over). */
  clearOutbox() {
    this.outbox = [];
  }

  /**
   * The network changed (online, offline, navigator.connection change): the
   * connection may be dead without knowing it. Open a new one now and rejoin
   * with the resume key (the relay gives the seat to the resumed connection).
   */
  reconnectNow(reason) {
    if (this.stopped) return;
    if (this.timers.retry !== undefined) {
      clearTimeout(this.timers.retry); // a retry was waiting: try at once
      this.timers.retry = undefined;
      this.attempt = 0;
      this.connect();
      return;
    }
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return; // connecting already
    this.attempt = 0;
    this.drop(reason, 0);
  }

  /**
   * The media path went silent: if the relay went silent too (a pong missed: nothing heard
   * for 1.5 heartbeats), the network under this connection is probably gone (a network
   * change): reconnect now rather than after deadAfterMs. Nothing happens while pongs come.
   */
  probe(reason) {
    if (this.stopped || this.state !== "joined" || !this.ws) return false;
    if (Date.now() - this.lastHeard <= 1.5 * this.options.pingIntervalMs) return false;
    this.attempt = 0;
    this.drop(reason, 0);
    return true;
  }

  /** Hang up on purpose: bye, then close for good. */
  hangUp(reason = "hangup") {
    if (this.state === "joined") this.ws.send(JSON.stringify({ type: "bye", reason }));
    this.stop();
  }

  stop() {
    this.stopped = true;
    this.clearTimers();
    if (this.ws) {
      this.detach();
      this.ws.close(1000, "bye");
      this.ws = null;
    }
    this.setState("stopped");
  }

  // -- internals --

  connect() {
    this.setState(this.resume ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.scheduleRetry(String(err));
      return;
    }
    this.ws = ws;
    ws.onopen = () => this.onOpen();
    ws.onmessage = (event) => this.onMessage(event.data);
    ws.onclose = (event) => this.onClose(event.code, event.reason);
    ws.onerror = () => {}; // onclose follows with the code
    this.timers.open = setTimeout(() => this.drop("not open in time"), this.options.openTimeoutMs);
  }

  onOpen() {
    clearTimeout(this.timers.open);
    this.heard();
    const join = { type: "join", ...this.seat };
    if (this.resume) join.resume = this.resume;
    this.ws.send(JSON.stringify(join));
    this.timers.join = setTimeout(() => this.drop("no answer to join"), this.options.joinTimeoutMs);
    this.timers.ping = setInterval(() => this.ping(), this.options.pingIntervalMs);
  }

  onMessage(text) {
    this.heard();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // the relay sends JSON only; ignore anything else
    }
    if (frame.type === "pong") return;
    if (frame.type === "joined") {
      clearTimeout(this.timers.join);
      this.joinedAt = Date.now();
      this.resume = frame.resume;
      this.attempt = 0; // the backoff resets after a successful join
      this.setState("joined");
      this.flush();
      this.emit("joined", frame);
    } else if (frame.type === "error") {
      this.onRefused(frame);
    } else {
      this.emit("frame", frame);
    }
  }

  onRefused(frame) {
    if (this.state !== "joined" && FATAL_JOIN_CODES.has(frame.code)) {
      this.fail(frame.code, frame.message);
      return;
    }
    this.emit("refused", frame); // server-full and join-timeout: the close that follows retries
  }

  onClose(code, reason) {
    this.detach();
    this.ws = null;
    this.clearTimers();
    if (this.stopped) return;
    if (code === CLOSE_REPLACED) {
      this.fail("replaced", reason || "replaced");
      return;
    }
    const away = RELAY_AWAY_CODES.has(code) && this.attempt === 0;
    const delay = away ? restartDelay(this.options, reason) : undefined;
    this.scheduleRetry(`closed ${code}${reason ? ` ${reason}` : ""}`, code, delay);
  }

  ping() {
    if (Date.now() - this.lastHeard > this.options.deadAfterMs) {
      this.drop("no answer to the heartbeat");
    } else if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send('{"type":"ping"}');
    }
  }

  /** Give up on a connection that does not answer, and reconnect (first time: at once). */
  drop(reason, delay = undefined) {
    if (!this.ws) return;
    this.detach();
    this.ws.close(4000, "dead");
    this.ws = null;
    this.clearTimers();
    this.scheduleRetry(reason, undefined, delay ?? (this.attempt === 0 ? 0 : undefined));
  }

  scheduleRetry(reason, code = undefined, delayMs = undefined) {
    const delay = delayMs ?? backoffDelay(this.attempt, this.options);
    this.attempt++;
    this.setState(this.resume ? "reconnecting" : "connecting");
    console.info(`signaling: reconnecting in ${delay} ms (${reason})`);
    this.emit("retry", { delay, reason, code, attempt: this.attempt });
    this.timers.retry = setTimeout(() => this.connect(), delay);
  }

  fail(code, message) {
    this.stop();
    this.emit("fatal", { code, message });
  }

  flush() {
    const waiting = this.outbox;
    this.outbox = [];
    for (const frame of waiting) this.send(frame);
  }

  heard() {
    this.lastHeard = Date.now();
  }

  detach() {
    this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
  }

  clearTimers() {
    clearTimeout(this.timers.open);
    clearTimeout(this.timers.join);
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.retry);
    this.timers = {};
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.emit("state", state);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
