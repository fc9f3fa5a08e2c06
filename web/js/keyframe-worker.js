// A video receiver's encoded frames, passed through unchanged (an RTCRtpScriptTransform set
// by call.js), so that the page can ask the sender for a key frame when it wants one:
// RTCRtpScriptTransformer.sendKeyFrameRequest() (a PLI or a FIR), the only way a page has.
// Each message from the page asks once; the answer is posted back: {sent, error}.
onrtctransform = ({ transformer }) => {
  const { port } = transformer.options;
  transformer.readable.pipeTo(transformer.writable).catch(() => {}); // ends with its connection
  port.onmessage = () => {
    transformer.sendKeyFrameRequest().then(
      () => port.postMessage({ sent: true }),
      (err) => port.postMessage({ sent: false, error: `${err.name}: ${err.message}` }),
    );
  };
};
