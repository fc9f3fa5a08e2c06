// Call statistics from getStats(): bitrate, frames per second, round-trip time,
// packets lost, and the ICE path actually chosen.

/** One summary of a report; previous (an earlier summary) gives the bitrates. */
export function summarize(report, previous = null, now = performance.now()) {
  const summary = {
    time: now,
    inVideo: { bytes: 0, bitrate: null, fps: null, framesDecoded: 0, width: null, height: null, packetsLost: 0, packetsReceived: 0 },
    inAudio: { bytes: 0, bitrate: null, packetsLost: 0, packetsReceived: 0 },
    outVideo: { bytes: 0, bitrate: null, fps: null, width: null, height: null },
    rtt: null,
    path: null,
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
    } else if (stat.type === "transport" && stat.selectedCandidatePairId) {
      pairId = stat.selectedCandidatePairId;
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
  }
  return summary;
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

export function formatFps(fps) {
  return fps === null || fps === undefined ? "–" : String(Math.round(fps));
}
