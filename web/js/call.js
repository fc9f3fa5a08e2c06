// One RTCPeerConnection's life: offer or answer, trickled candidates, the chat
// data channel, close. W3C names are kept as they are at this boundary.
//
// Events (CustomEvent):
//   signal      detail: a frame to send to the other seat (offer, answer, candidate)
//   remote      detail: the remote MediaStream (once its first track arrives)
//   state       detail: the RTCPeerConnection's connectionState
//   chat        detail: {text}: a chat message arrived
//   chatstate   detail: true when the chat channel is open, false when closed

export const CHAT_LABEL = "chat"; // one UTF-8 text message per chat line

/** The DTLS fingerprint of an SDP ("sha-256 AB:CD..."), or null: tells a new connection's
 * offer (new certificate) from an ICE restart of the same connection. */
export function fingerprint(sdp) {
  const match = /^a=fingerprint:(.+)$/m.exec(sdp || "");
  return match ? match[1].trim().toLowerCase() : null;
}

export class Call extends EventTarget {
  /**
   * @param {RTCConfiguration} rtcConfig
   * @param {MediaStream | null} localStream  null: receive only
   */
  constructor(rtcConfig, localStream) {
    super();
    this.localStream = localStream;
    this.pc = new RTCPeerConnection(rtcConfig);
    this.remoteStream = new MediaStream();
    this.pendingCandidates = []; // remote candidates that came before the remote description
    this.channel = null;
    this.closed = false;
    this.remoteFingerprint = null;
    this.everConnected = false; // reached "connected" once: its path can be lost

    this.pc.onicecandidate = ({ candidate }) => this.onLocalCandidate(candidate);
    this.pc.ontrack = ({ track }) => {
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
    this.useChannel(this.pc.createDataChannel(CHAT_LABEL));
    await this.pc.setLocalDescription(await this.pc.createOffer());
    this.emit("signal", { type: "offer", sdp: this.pc.localDescription.sdp });
  }

  /** The answerer's side: take the offer (complete or trickled), add media, answer. */
  async answer(sdp) {
    this.remoteFingerprint = fingerprint(sdp);
    await this.pc.setRemoteDescription({ type: "offer", sdp });
    this.addLocalMedia([]);
    await this.addPendingCandidates();
    await this.pc.setLocalDescription(await this.pc.createAnswer());
    this.emit("signal", { type: "answer", sdp: this.pc.localDescription.sdp });
  }

  async accept(sdp) {
    this.remoteFingerprint = fingerprint(sdp);
    await this.pc.setRemoteDescription({ type: "answer", sdp });
    await this.addPendingCandidates();
  }

  /** Recovery between two browsers: the same connection, new ICE credentials, a new offer. */
  async restartIce() {
    await this.pc.setLocalDescription(await this.pc.createOffer({ iceRestart: true }));
    this.emit("signal", { type: "offer", sdp: this.pc.localDescription.sdp });
  }

  /** The answerer's side of an ICE restart (the offer keeps this connection's fingerprint). */
  async reanswer(sdp) {
    await this.pc.setRemoteDescription({ type: "offer", sdp });
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

  sendChat(text) {
    if (!this.channel || this.channel.readyState !== "open") return false;
    this.channel.send(text);
    return true;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.channel) this.channel.close();
    this.pc.close();
    this.emit("state", "closed");
    this.emit("chatstate", false);
  }

  // -- internals --

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
