// Load generator for bench/relay.py: the same frames for the relay and the bare forwarder.
//
//   node loadgen.mjs throughput N SECONDS SLICE_MS MODE:URL...
//   node loadgen.mjs MODE rtt|idle|cycles URL [N]
//
// MODE: relay (joins each pair to a session first) or bare (the forwarder pairs
// connections in the order they open). Every line printed is one JSON object;
// bench/relay.py reads them and samples the server processes at each "mark".
//
//   throughput            N pairs on each server ping-pong signaling frames
//                         (mostly ICE candidates, an SDP-sized offer every
//                         tenth), the servers taking turns of SLICE_MS (one
//                         server: one turn); prints {mark:"warm"} after a
//                         second of warm-up, waits for a line on stdin, then
//                         prints {mark:"end", targets:[{frames, seconds}]}:
//                         each server's frames and the seconds of its turns,
//                         in argument order
//   rtt N                 one pair, N sequential round trips; {rtt_us:[...]}
//   idle N                N/2 pairs joined and idle; {mark:"open"}, then waits
//                         for a line on stdin and closes them
//   cycles N              N join/leave cycles (connect, join, close), 50 at a
//                         time; {mark:"warm"} after the first 2000, {mark:"done"}

import { createInterface } from "node:readline";
import WebSocket from "ws";

const TURNS = process.argv[2] === "throughput";
const [mode, phase, url, nArg = "100"] = TURNS
  ? ["-", "throughput", "-", process.argv[3]]
  : process.argv.slice(2);
const N = Number(nArg);
const [SECONDS, SLICE_MS] = TURNS ? [Number(process.argv[4]), Number(process.argv[5])] : [0, 0];
const TARGETS = TURNS ? process.argv.slice(6) : [];

const SDP = "v=0\r\no=- 4611731400430051336 2 IN IP4 198.18.0.2\r\n" + "a=candidate:1 1 udp 2130706431 198.18.0.2 40000 typ host\r\n".repeat(48);
const CANDIDATE = { candidate: "candidate:1 1 udp 2130706431 198.18.0.2 40000 typ host generation 0", sdpMid: "0", sdpMLineIndex: 0 };
const FRAMES = Array.from({ length: 10 }, (_, k) =>
  JSON.stringify(k === 0 ? { type: "offer", sdp: SDP } : { type: "candidate", candidate: CANDIDATE }),
);

const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** The next line on stdin: the caller's go-ahead. */
async function nextLine() {
  await stdin.next();
}

function emit(object) {
  process.stdout.write(JSON.stringify(object) + "\n");
}

function open(target = url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(target, { perMessageDeflate: false });
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

function next(ws) {
  return new Promise((resolve, reject) => {
    const onClose = () => reject(new Error("closed"));
    ws.once("message", (data) => {
      ws.off("close", onClose);
      resolve(data.toString());
    });
    ws.once("close", onClose);
  });
}

/** Two connected seats; in relay mode joined to `session`, both told of each other. */
async function openPair(session, pairMode = mode, target = url) {
  const a = await open(target);
  if (pairMode === "relay") {
    a.send(JSON.stringify({ type: "join", session, role: "patient" }));
    await next(a); // joined
  }
  const b = await open(target);
  if (pairMode === "relay") {
    const peerJoined = next(a);
    b.send(JSON.stringify({ type: "join", session, role: "practitioner" }));
    await next(b); // joined
    await peerJoined;
  }
  return [a, b];
}

async function openPairs(n, prefix, pairMode = mode, target = url) {
  const pairs = [];
  // One after the other: the bare forwarder pairs connections by order.
  for (let i = 0; i < n; i += 1) pairs.push(await openPair(`${prefix}-${i}`, pairMode, target));
  return pairs;
}

/**
 * Ping-pong on every server, the servers taking turns of SLICE_MS: only one
 * has traffic at a time, and a turn ends once its frames in flight have
 * arrived. Each seat answers what it receives with the next frame of the mix.
 * Drifts of the machine's speed, which last seconds, fall on every server alike.
 */
async function throughput() {
  const targets = [];
  for (const spec of TARGETS) {
    const [pairMode, target] = [spec.slice(0, spec.indexOf(":")), spec.slice(spec.indexOf(":") + 1)];
    const state = { frames: 0, activeNs: 0n, inFlight: 0, live: false, drained: null };
    state.pairs = await openPairs(N, `tp-${targets.length}`, pairMode, target);
    state.pairs.forEach(([a, b], p) => {
      let k = p;
      const onMessage = (ws) => () => {
        state.inFlight -= 1;
        state.frames += 1;
        if (state.live) {
          state.inFlight += 1;
          ws.send(FRAMES[k++ % FRAMES.length]);
        } else if (state.inFlight === 0 && state.drained) {
          state.drained();
        }
      };
      a.on("message", onMessage(a));
      b.on("message", onMessage(b));
    });
    targets.push(state);
  }
  async function turn(state, ms) {
    const t0 = process.hrtime.bigint();
    state.live = true;
    for (const [a] of state.pairs) {
      state.inFlight += 1;
      a.send(FRAMES[0]);
    }
    await new Promise((r) => setTimeout(r, ms));
    const drained = new Promise((r) => (state.drained = r));
    state.live = false;
    if (state.inFlight > 0) await drained;
    state.drained = null;
    state.activeNs += process.hrtime.bigint() - t0;
  }
  async function run(seconds) {
    const end = Date.now() + seconds * 1000;
    for (let i = 0; Date.now() < end; i += 1) {
      await turn(targets[i % targets.length], Math.min(SLICE_MS, end - Date.now()));
    }
  }
  await run(1); // warm-up
  for (const state of targets) [state.frames, state.activeNs] = [0, 0n];
  // Nothing moves until the caller has sampled the servers.
  emit({ mark: "warm" });
  await nextLine();
  await run(SECONDS);
  emit({
    mark: "end",
    targets: targets.map((t) => ({ frames: t.frames, seconds: Number(t.activeNs) / 1e9 })),
  });
  for (const state of targets) {
    for (const [a, b] of state.pairs) {
      a.terminate();
      b.terminate();
    }
  }
}

async function rtt() {
  const [[a, b]] = await openPairs(1, "rtt");
  b.on("message", (data) => b.send(data.toString()));
  const samples = [];
  for (let i = 0; i < N + 200; i += 1) {
    const frame = FRAMES[i % FRAMES.length];
    const t0 = process.hrtime.bigint();
    const reply = next(a);
    a.send(frame);
    await reply;
    if (i >= 200) samples.push(Number(process.hrtime.bigint() - t0) / 1000); // after warm-up
  }
  emit({ rtt_us: samples });
  a.terminate();
  b.terminate();
}

async function idle() {
  const pairs = await openPairs(N / 2, "idle");
  emit({ mark: "open", connections: pairs.length * 2 });
  await nextLine();
  for (const [a, b] of pairs) {
    a.terminate();
    b.terminate();
  }
}

async function cycles() {
  let done = 0;
  let marked = false;
  async function worker(w) {
    while (done < N) {
      done += 1;
      const ws = await open();
      if (mode === "relay") {
        ws.send(JSON.stringify({ type: "join", session: `cycle-${w}-${done}`, role: "patient" }));
        await next(ws);
      }
      await new Promise((resolve) => {
        ws.once("close", resolve);
        ws.close();
      });
      if (!marked && done >= 2000) {
        marked = true;
        emit({ mark: "warm" });
      }
    }
  }
  await Promise.all(Array.from({ length: 50 }, (_, w) => worker(w)));
  emit({ mark: "done", cycles: done });
}

const phases = { throughput, rtt, idle, cycles };
const badTargets = TARGETS.length < 1 || TARGETS.some((t) => !/^(relay|bare):wss?:/.test(t));
if (TURNS ? badTargets || !(N > 0 && SECONDS > 0 && SLICE_MS > 0) : !["relay", "bare"].includes(mode) || !(phase in phases)) {
  console.error("usage: node loadgen.mjs throughput N SECONDS SLICE_MS relay|bare:URL...");
  console.error("       node loadgen.mjs relay|bare rtt|idle|cycles URL [N]");
  process.exit(2);
}
phases[phase]().then(
  () => process.exit(0),
  (error) => {
    console.error(`loadgen: ${error.message}`);
    process.exit(1);
  },
);
