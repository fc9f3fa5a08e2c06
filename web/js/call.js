// One RTCPeerConnection's life: offer or answer, trickled candidates, the chat
// data channel, close. W3C names are kept as they are at this boundary.
//
// Events (CustomEvent):
//   signal      detail: a frame to send to the other seat (offer, answer, candidate)
//   remote      detail: the remote MediaStream (once its first track arrives)
//   state       detail: the RTCPeerConnection's connectionState
//   chat        detail: {text}: a chat message arrived
//   chatstate   detail: true when the chat channel is open, false when closed
//   keyframe    detail: {sent, error, why}: a key frame request went (or not); why: "page"
//               (requestKeyFrame()) or "stale" (the receiver dropped stale frames)
//   stale       detail: {dropped, worstMs}: stale video frames dropped after an outage
//               (keyframe-worker.js), told once frames pass again
//   framecount  detail: {passed, dropped}: the video frames the worker saw, when
//               keyFramePort was sent "count" (tests)

export const CHAT_LABEL = "chat"; // one UTF-8 text message per chat line

/** The DTLS fingerprint of an SDP ("sha-256 AB:CD..."), or null: tells a new connection's
 * offer (new certificate) from an ICE restart of the same connection. */
export function fingerprint(sdp) {
  const match = /^a=fingerprint:(.+)$/m.exec(sdp || "");
  return match ? match[1].trim().toLowerCase() : null;
}

// The video sender's floor, in kbit/s. After an outage, Chromium's congestion controller
// reads the outage's losses in the first feedback and drops its target to 30 kbit/s within
// 0.2 s (its pushback floor): the key frame the receiver asks for then takes about a second
// to crawl out. WebRTC's API has no minimum bitrate, but Chromium takes the non-standard
// fmtp parameter x-google-min-bitrate from the REMOTE description's video codecs as its
// bandwidth estimate's floor. 200: under issue 13's 300 kbit/s link with the audio
// (measured in docs/benchmarks.md). The page's own SDP is sent as it is.
export const MIN_VIDEO_KBPS = 200;
const FLOOR_PARAM = "x-google-min-bitrate";
const NOT_A_VIDEO_CODEC = /^(rtx|red|ulpfec|flexfec-03)$/i;

/** ``sdp`` with ``x-google-min-bitrate=kbps`` on each video codec (its fmtp line's value
 * replaced or added, a line added where the codec has none); kbps 0: unchanged. */
export function withMinBitrate(sdp, kbps) {
  if (!(kbps > 0)) return sdp;
  const eol = sdp.includes("\r\n") ? "\r\n" : "\n";
  // Split into sections at each m= line; only the video sections change.
  const sections = [[]];
  for (const line of sdp.split(eol)) {
    if (line.startsWith("m=")) sections.push([]);
    sections[sections.length - 1].push(line);
  }
  const floor = `${FLOOR_PARAM}=${kbps}`;
  const out = sections.flatMap((lines) => {
    if (!(lines[0] || "").startsWith("m=video ")) return lines;
    const codecs = new Set(); // the payload types of the video codecs (not rtx, red, fec)
    for (const line of lines) {
      const m = /^a=rtpmap:(\d+) ([^/\s]+)/.exec(line);
      if (m && !NOT_A_VIDEO_CODEC.test(m[2])) codecs.add(m[1]);
    }
    const withFmtp = new Set();
    const changed = lines.map((line) => {
      const m = /^a=fmtp:(\d+) (.*)$/.exec(line);
      if (!m || !codecs.has(m[1])) return line;
      withFmtp.add(m[1]);
      const kept = m[2].split(";").filter((p) => p.trim() && !p.trim().startsWith(`${FLOOR_PARAM}=`));
      return `a=fmtp:${m[1]} ${[...kept, floor].join(";")}`;
    });
    return changed.flatMap((line) => {
      const m = /^a=rtpmap:(\d+) /.exec(line);
      return m && codecs.has(m[1]) && !withFmtp.has(m[1]) ? [line, `a=fmtp:${m[1]} ${floor}`] : [line];
    });
  });
  return out.join(eol);
}

// One worker for the page's video receivers (keyframe-worker.js), made at the first; none
// where the browser has no RTCRtpScriptTransform (requestKeyFrame() is then false).
let keyFrameWorker = null;

export class Call extends EventTarget {
  /**
   * @param {RTCConfiguration} rtcConfig
   * @param {MediaStream | null} localStream  null: receive only
   * @param {number} minVideoKbps  the video sender's floor (withMinBitrate); 0: none
   * @param {boolean} dropStale  drop the stale video frames that follow an outage
   *   (keyframe-worker.js); false only to measure what that changes
   */
  constructor(rtcConfig, localStream, minVideoKbps = MIN_VIDEO_KBPS, dropStale = true) {
    super();
    this.localStream = localStream;
    this.minVideoKbps = minVideoKbps;
    this.dropStale = dropStale;
    this.pc = new RTCPeerConnection(rtcConfig);
    this.remoteStream = new MediaStream();
    this.pendingCandidates = []; // remote candidates that came before the remote description
    this.channel = null;
    this.closed = false;
    this.remoteFingerprint = null;
    this.everConnected = false; // reached "connected" once: its path can be lost

    this.pc.onicecandidate = ({ candidate }) => this.onLocalCandidate(candidate);
    this.keyFramePort = null; // from the video receiver's transform (keyframe-worker.js)
    this.pc.ontrack = ({ track, receiver }) => {
      if (track.kind === "video") this.watchKeyFrames(receiver);
      this.remoteStream.addTrack(track);
      this.emit("remote", this.remoteStream);
    };
    this.pc.onconnectionstatechange = () => {
      if (this.pc.connectionState === "connected") this.everConnected = true;
      this.emit("state", this.pc.connectionState);
    };
    this.pc.ondatachannel = ({ channel }) => {
      if (channel.label === CHAT_LABEL) this.useChannel(channel);
    };
  }

  get connectionState() {
    return this.pc.connectionState;
  }

  /** Is this call worth keeping across a signaling reconnect? */
  get alive() {
    return !this.closed && ["new", "connecting", "connected", "disconnected"].includes(this.connectionState)
      && this.pc.remoteDescription !== null;
  }

  /** The offerer's side: media, the chat channel, then the offer. */
  async offer() {
    this.addLocalMedia(["audio", "video"]);
    // The offerer's receivers exist now: a transform set later, in ontrack, would get no
    // frames at all in Chromium (only its key frame requests would work).
    for (const { receiver } of this.pc.getTransceivers()) {
      if (receiver.track.kind === "video") this.watchKeyFrames(receiver);
    }
    this.useChannel(this.pc.createDataChannel(CHAT_LABEL));
    await this.pc.setLocalDescription(await this.pc.createOffer());
    this.emit("signal", { type: "offer", sdp: this.pc.localDescription.sdp });
  }

  /** The answerer's side: take the offer (complete or trickled), add media, answer. */
  async answer(sdp) {
    this.remoteFingerprint = fingerprint(sdp);
    await this.pc.setRemoteDescription({ type: "offer", sdp: this.floored(sdp) });
    this.addLocalMedia([]);
    await this.addPendingCandidates();
    await this.pc.setLocalDescription(await this.pc.createAnswer());
    this.emit("signal", { type: "answer", sdp: this.pc.localDescription.sdp });
  }

  async accept(sdp) {
    this.remoteFingerprint = fingerprint(sdp);
    await this.pc.setRemoteDescription({ type: "answer", sdp: this.floored(sdp) });
    await this.addPendingCandidates();
  }

  /** Recovery between two browsers: the same connection, new ICE credentials, a new offer. */
  async restartIce() {
    await this.pc.setLocalDescription(await this.pc.createOffer({ iceRestart: true }));
    this.emit("signal", { type: "offer", sdp: this.pc.localDescription.sdp });
  }

  /** The answerer's side of an ICE restart (the offer keeps this connection's fingerprint). */
  async reanswer(sdp) {
    await this.pc.setRemoteDescription({ type: "offer", sdp: this.floored(sdp) });
    await this.pc.setLocalDescription(await this.pc.createAnswer());
    this.emit("signal", { type: "answer", sdp: this.pc.localDescription.sdp });
  }

  /** A remote candidate (RTCIceCandidateInit), or null for end-of-candidates. */
  async addCandidate(init) {
    if (this.pc.remoteDescription === null) {
      this.pendingCandidates.push(init);
      return;
    }
    try {
      await (init === null ? this.pc.addIceCandidate() : this.pc.addIceCandidate(init));
    } catch (err) {
      console.warn("call: remote candidate refused:", err.message);
    }
  }

  /**
   * Ask the video sender for a key frame now (a PLI, through keyframe-worker.js). After an
   * outage Chromium's receiver asks once it has decoded nothing for 3 s, in a PLI that the
   * outage itself may swallow, and then 3 s later: the page asks as soon as media flows
   * again (app.js). False: not possible here.
   */
  requestKeyFrame() {
    if (!this.keyFramePort || this.closed) return false;
    this.keyFramePort.postMessage("key");
    return true;
  }

  sendChat(text) {
    if (!this.channel || this.channel.readyState !== "open") return false;
    this.channel.send(text);
    return true;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.channel) this.channel.close();
    if (this.keyFramePort) this.keyFramePort.close();
    this.pc.close();
    this.emit("state", "closed");
    this.emit("chatstate", false);
  }

  // -- internals --

  /** The video receiver's frames through keyframe-worker.js. */
  watchKeyFrames(receiver) {
    if (typeof RTCRtpScriptTransform === "undefined" || this.keyFramePort) return;
    try {
      keyFrameWorker ??= new Worker(new URL("./keyframe-worker.js", import.meta.url), { type: "module" });
      const { port1, port2 } = new MessageChannel();
      const options = { port: port2, dropStale: this.dropStale };
      receiver.transform = new RTCRtpScriptTransform(keyFrameWorker, options, [port2]);
      port1.onmessage = ({ data }) => {
        if (data.stale) this.emit("stale", data.stale);
        else if (data.count) this.emit("framecount", data.count);
        else this.emit("keyframe", data);
      };
      this.keyFramePort = port1;
    } catch (err) {
      console.warn("call: no key-frame requests:", err.message);
    }
  }

  /** A remote description with this page's video floor (withMinBitrate). */
  floored(sdp) {
    return withMinBitrate(sdp, this.minVideoKbps);
  }

  /** Send our tracks; for kinds we lack, still receive (wantKinds: offerer only). */
  addLocalMedia(wantKinds) {
    const tracks = this.localStream ? this.localStream.getTracks() : [];
    for (const track of tracks) this.pc.addTrack(track, this.localStream);
    for (const kind of wantKinds) {
      if (!tracks.some((track) => track.kind === kind)) {
        this.pc.addTransceiver(kind, { direction: "recvonly" });
      }
    }
  }

  async addPendingCandidates() {
    const pending = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const init of pending) await this.addCandidate(init);
  }

  onLocalCandidate(candidate) {
    if (this.closed) return;
    if (candidate === null) {
      this.emit("signal", { type: "candidate", candidate: null }); // end-of-candidates
    } else if (candidate.candidate) {
      // An empty candidate string marks the end of one generation: null covers it.
      const { sdpMid, sdpMLineIndex } = candidate;
      this.emit("signal", { type: "candidate", candidate: { candidate: candidate.candidate, sdpMid, sdpMLineIndex } });
    }
  }

  useChannel(channel) {
    this.channel = channel;
    channel.onopen = () => this.emit("chatstate", true);
    channel.onclose = () => this.emit("chatstate", false);
    channel.binaryType = "arraybuffer";
    channel.onmessage = ({ data }) => {
      // Text messages are the format; a peer that sends UTF-8 bytes is read the same way.
      const text = typeof data === "string" ? data : new TextDecoder().decode(data);
      this.emit("chat", { text });
    };
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
