// Call statistics from getStats(): bitrate, frames per second, round-trip time,
// packets lost, the ICE path actually chosen, and a call-quality level.

/** One summary of a report; previous (an earlier summary) gives the bitrates. */
export function summarize(report, previous = null, now = performance.now()) {
  const summary = {
    time: now,
    inVideo: { bytes: 0, bitrate: null, fps: null, framesDecoded: 0, width: null, height: null, packetsLost: 0, packetsReceived: 0 },
    inAudio: { bytes: 0, bitrate: null, packetsLost: 0, packetsReceived: 0 },
    outVideo: { bytes: 0, bitrate: null, fps: null, width: null, height: null },
    rtt: null,
    path: null,
    transportBytes: 0, // everything received on the transport (RTP, RTCP, STUN): the path is alive

    loss: null, // fraction of the packets lost since the previous summary (audio and video)
    quality: "none", // "good" | "fair" | "poor" | "none" (not known yet): see callQuality()
  };
  let pairId = null;
  for (const stat of report.values()) {
    if (stat.type === "inbound-rtp" && stat.kind === "video") {
      Object.assign(summary.inVideo, {
        bytes: stat.bytesReceived || 0,
        fps: stat.framesPerSecond ?? null,
        framesDecoded: stat.framesDecoded || 0,
        width: stat.frameWidth ?? null,
        height: stat.frameHeight ?? null,
        packetsLost: stat.packetsLost || 0,
        packetsReceived: stat.packetsReceived || 0,
      });
    } else if (stat.type === "inbound-rtp" && stat.kind === "audio") {
      Object.assign(summary.inAudio, {
        bytes: stat.bytesReceived || 0,
        packetsLost: stat.packetsLost || 0,
        packetsReceived: stat.packetsReceived || 0,
      });
    } else if (stat.type === "outbound-rtp" && stat.kind === "video") {
      summary.outVideo.bytes += stat.bytesSent || 0; // simulcast layers add up
      summary.outVideo.fps = stat.framesPerSecond ?? summary.outVideo.fps;
      summary.outVideo.width = stat.frameWidth ?? summary.outVideo.width;
      summary.outVideo.height = stat.frameHeight ?? summary.outVideo.height;
    } else if (stat.type === "transport") {
      summary.transportBytes += stat.bytesReceived || 0;
      if (stat.selectedCandidatePairId) pairId = stat.selectedCandidatePairId;
    }
  }
  const pair = pairId ? report.get(pairId) : findNominated(report);
  if (pair) {
    if (pair.currentRoundTripTime !== undefined) summary.rtt = pair.currentRoundTripTime;
    const local = report.get(pair.localCandidateId);
    const remote = report.get(pair.remoteCandidateId);
    if (local) summary.path = describePath(local, remote);
  }
  if (previous) {
    const seconds = (now - previous.time) / 1000;
    for (const name of ["inVideo", "inAudio", "outVideo"]) {
      const bytes = summary[name].bytes - previous[name].bytes;
      if (seconds > 0 && bytes >= 0) summary[name].bitrate = (8 * bytes) / seconds;
    }
    const lost = summary.inVideo.packetsLost + summary.inAudio.packetsLost
      - previous.inVideo.packetsLost - previous.inAudio.packetsLost;
    const received = summary.inVideo.packetsReceived + summary.inAudio.packetsReceived
      - previous.inVideo.packetsReceived - previous.inAudio.packetsReceived;
    if (received + lost > 0) summary.loss = Math.max(0, lost) / (received + Math.max(0, lost));
  }
  summary.quality = callQuality(summary.loss, summary.rtt);
  return summary;
}

/**
 * The call's quality from the packets lost (fraction, over the last interval)
 * and the round-trip time (seconds): "good", "fair", "poor", or "none" when
 * nothing was measured yet. Three levels, drawn as three bars.
 *
 * The references, read from their sources:
 * - LiveKit (livekit/livekit, pkg/sfu/connectionquality/scorer.go and
 *   connectionstats.go): score = 100 - delayEffect - lossPercent * weight,
 *   where the one-way delay d = rtt / 2 gives delayEffect = d / 40 up to
 *   160 ms and (d - 120) / 10 above; the weight is 10 for video (2 % loss
 *   falls to GOOD, 6 % to POOR) and 8 for Opus; EXCELLENT above 80, GOOD
 *   above 40, POOR below.
 * - Jitsi (jitsi/lib-jitsi-meet, modules/connectivity/ConnectionQuality.ts,
 *   the packet-loss branch): at most 2 % loss is full bars, 4 % four of five,
 *   6 % three, 8 % two, 12 % one; 10 % loss or more caps the quality at 30 %.
 * We take LiveKit's score and levels with the video weight (10), and Jitsi's
 * cap: 10 % loss or more is "poor" whatever the score.
 */
export function callQuality(loss, rtt) {
  if (loss === null && rtt === null) return "none";
  const oneWayMs = ((rtt ?? 0) * 1000) / 2;
  const delayEffect = oneWayMs <= 160 ? oneWayMs / 40 : (oneWayMs - 120) / 10;
  const lossPercent = (loss ?? 0) * 100;
  const score = 100 - delayEffect - lossPercent * 10;
  if (lossPercent >= 10 || score <= 40) return "poor";
  return score > 80 ? "good" : "fair";
}

function findNominated(report) {
  for (const stat of report.values()) {
    if (stat.type === "candidate-pair" && stat.nominated && stat.state === "succeeded") return stat;
  }
  return null;
}

/** {relayed, text}: e.g. {relayed: true, text: "TURN/udp"} or {relayed: false, text: "host/udp"}. */
export function describePath(local, remote) {
  if (local.candidateType === "relay") {
    return { relayed: true, text: `TURN/${local.relayProtocol || local.protocol}` };
  }
  const remoteRelayed = remote && remote.candidateType === "relay";
  const type = remoteRelayed ? "relay" : local.candidateType;
  return { relayed: remoteRelayed, text: `${remoteRelayed ? "TURN" : type}/${local.protocol}` };
}

export function formatBitrate(bps) {
  if (bps === null) return "–";
  return bps >= 1e6 ? `${(bps / 1e6).toFixed(2)} Mbit/s` : `${Math.round(bps / 1e3)} kbit/s`;
}

export function formatRtt(seconds) {
  return seconds === null ? "–" : `${Math.round(seconds * 1000)} ms`;
}

export function formatSize(width, height) {
  return width && height ? `${width}×${height}` : "–";
}

export function formatLoss(loss) {
  return loss === null ? "–" : `${(loss * 100).toFixed(1)} %`;
}

export function formatFps(fps) {
  return fps === null || fps === undefined ? "–" : String(Math.round(fps));
}
