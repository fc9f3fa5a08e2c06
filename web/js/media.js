// The local camera and microphone. A refusal stops the join with a message; a
// missing device is not fatal: the call goes on with what there is.

export const CONSTRAINTS = {
  audio: true,
  video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
};

/** A media failure that the page explains; key names its message in i18n.js. */
export class MediaError extends Error {
  constructor(key, cause) {
    super(`${key}: ${cause ? cause.name : "unavailable"}`);
    this.key = key;
    this.params = { name: cause ? cause.name : "" };
    this.fatal = key !== "media.none";
  }
}

/**
 * Open the camera and microphone.
 * Returns {stream, notice}: stream may be null (nothing found), and notice is the
 * i18n key of a message to show (missing device), or null.
 * Throws MediaError when the person refused or the device cannot start.
 */
export async function openLocalMedia(constraints = CONSTRAINTS) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new MediaError("media.insecure");
  }
  try {
    return { stream: await navigator.mediaDevices.getUserMedia(constraints), notice: null };
  } catch (err) {
    if (!isMissing(err)) throw explain(err);
  }
  // One of the two is missing: try each alone.
  for (const [kind, notice] of [["audio", "media.no-camera"], ["video", "media.no-mic"]]) {
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ [kind]: constraints[kind] });
      return { stream, notice };
    } catch (err) {
      if (!isMissing(err)) throw explain(err);
    }
  }
  return { stream: null, notice: "media.none" };
}

function isMissing(err) {
  return err && (err.name === "NotFoundError" || err.name === "OverconstrainedError");
}

function explain(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError") return new MediaError("media.denied", err);
  if (name === "NotReadableError" || name === "AbortError") return new MediaError("media.busy", err);
  return new MediaError("media.other", err || { name: "Error" });
}

export function stopMedia(stream) {
  if (stream) for (const track of stream.getTracks()) track.stop();
}
