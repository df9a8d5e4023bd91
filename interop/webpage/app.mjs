// The page of a faststyle web export (python -m scripts.export MODEL --format web): loads model.json and the
// ONNX network from its own folder, runs it with onnxruntime-web (WebGPU where the browser has it, else
// WebAssembly) and finishes the pixels exactly as stylize.py does (pixels.mjs). ?backend=wasm|webgpu forces one.
import { finishColors, mixWeights, planarToRgba, rgbaToPlanar, workingSize } from "./pixels.mjs";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  ort: null,
  session: null,
  backend: "",
  source: null, // the photo (ImageBitmap) being shown, or null while the camera runs
  content: null, // {planar, width, height}: the network's input at the working size
  stylized: null, // {data, content}: the network's raw output and the input it came from
  running: false,
  pending: false,
  renders: 0,
  camera: null, // the MediaStream while the camera runs
};

function setStatus(text) {
  $("status").textContent = text;
}

function errorLine(err) {
  return String((err && err.message) || err).split("\n")[0];
}

// One line instead of a frozen or blank page: an allocation failure is by far the likeliest reason a run fails.
function tooLargeLine(err, width, height) {
  return (
    `Stylizing ${width}×${height} px failed on this device (${errorLine(err)}): ` +
    "the model is probably too large for its memory; choose a smaller working size."
  );
}

// WebAssembly memory is 32-bit: the runtime's heap stops at 4 GiB whatever the device has.
const WASM_HEAP_BYTES = 4 * 1024 ** 3;

async function webgpuAdapter() {
  try {
    return navigator.gpu ? await navigator.gpu.requestAdapter() : null;
  } catch {
    return null;
  }
}

// The network's largest activations, in bytes, at width x height: the last upsampling convolution reads 2w
// channels at full size (w = base_width), held with its padded copy and its w-channel output.
function activationBytes(width, height) {
  const w = state.info.model_config.base_width || 32;
  return { peak: 4 * 5 * w * width * height, largest: 4 * 2 * w * width * height };
}

// Null when the run fits the device, else the one line that says it does not; ?max_memory_mb= lowers the budget.
function tooLargeBefore(width, height) {
  const { peak, largest } = activationBytes(width, height);
  const asked = Number(new URLSearchParams(location.search).get("max_memory_mb"));
  let budget = state.backend === "webgpu" ? state.gpuBufferLimit : WASM_HEAP_BYTES - state.info.model_bytes;
  let need = state.backend === "webgpu" ? largest : peak;
  if (asked > 0) [budget, need] = [Math.min(budget, asked * 1024 ** 2), peak];
  if (need <= budget) return null;
  const mb = (bytes) => `${Math.ceil(bytes / 1024 ** 2)} MB`;
  return (
    `The model is too large for this device at ${width}×${height} px (about ${mb(need)} of ${mb(budget)}): ` +
    "choose a smaller working size."
  );
}

async function createSession(ort, bytes) {
  const forced = new URLSearchParams(location.search).get("backend");
  const adapter = forced === "wasm" ? null : await webgpuAdapter();
  const order = forced === "webgpu" || adapter ? ["webgpu", "wasm"] : ["wasm"];
  state.gpuBufferLimit = adapter ? adapter.limits.maxStorageBufferBindingSize : 0;
  let lastError = null;
  for (const backend of order) {
    try {
      // A copy per try: the runtime may take ownership of the buffer it is given.
      const session = await ort.InferenceSession.create(bytes.slice(), { executionProviders: [backend] });
      return [session, backend];
    } catch (err) {
      lastError = err;
    }
  }
  throw lastError;
}

function buildSliders(styles) {
  const box = $("sliders");
  styles.forEach((name, i) => {
    const row = document.createElement("div");
    row.className = "slider";
    const label = document.createElement("label");
    label.htmlFor = `style-${i}`;
    label.textContent = readable(name);
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id: `style-${i}`, min: "0", max: "100", step: "1" });
    input.value = i === 0 ? "100" : "0";
    const out = document.createElement("output");
    out.htmlFor = input.id;
    input.addEventListener("input", () => {
      showMix();
      if (!state.camera) stylize();
    });
    row.append(label, input, out);
    box.append(row);
  });
  $("mix").hidden = false;
  showMix();
}

function rawWeights() {
  return state.info.styles.map((_, i) => Number($(`style-${i}`).value));
}

// The normalised mix (null when every weight is 0), shown beside each slider as a percentage.
function showMix() {
  const weights = mixWeights(rawWeights());
  state.info.styles.forEach((_, i) => {
    $(`style-${i}`).nextElementSibling.textContent = weights ? `${(100 * weights[i]).toFixed(0)}%` : "-";
  });
  return weights;
}

// A style's name as people read it (file stems use underscores: van_gogh_village_street_auvers).
function readable(name) {
  return name.replaceAll("_", " ");
}

function currentWeights() {
  return state.info.style_input ? mixWeights(rawWeights()) : [];
}

// The network's input at the working size: the source drawn once onto a canvas of that size and read back.
function captureContent(source, sourceWidth, sourceHeight) {
  const [width, height] = workingSize(sourceWidth, sourceHeight, Number($("size").value));
  const minSide = state.info.min_side;
  if (Math.min(width, height) < minSide) {
    setStatus(`The photo is ${width}×${height} px at this working size: the network needs ${minSide} px a side.`);
    return null;
  }
  const canvas = document.createElement("canvas");
  Object.assign(canvas, { width, height });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(source, 0, 0, width, height);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  return { planar: rgbaToPlanar(rgba, width, height), width, height };
}

// Runs the network on state.content with the current mix; a request while it runs is kept and run after it.
async function stylize() {
  if (!state.session || !state.content) return;
  if (state.running) {
    state.pending = true;
    return;
  }
  state.running = true;
  document.body.dataset.state = "busy";
  try {
    do {
      state.pending = false;
      await runNetwork(state.content);
    } while (state.pending && !state.camera);
  } finally {
    state.running = false;
    document.body.dataset.state = "ready";
  }
}

async function runNetwork(content) {
  const weights = currentWeights();
  if (weights === null) {
    setStatus("Give at least one style a weight above 0.");
    return false;
  }
  const { ort, info } = state;
  const { planar, width, height } = content;
  const refusal = tooLargeBefore(width, height);
  if (refusal) {
    setStatus(refusal);
    return false;
  }
  const feeds = { [info.input]: new ort.Tensor("float32", planar.slice(), [1, 3, height, width]) };
  if (info.style_input) feeds[info.style_input] = new ort.Tensor("float32", Float32Array.from(weights), [weights.length]);
  const start = performance.now();
  let result;
  try {
    result = await state.session.run(feeds);
  } catch (err) {
    setStatus(tooLargeLine(err, width, height));
    return false;
  }
  const output = result[info.output];
  const data = output.location && output.location !== "cpu" ? await output.getData() : output.data;
  const ms = performance.now() - start;
  state.stylized = { data, content };
  finish();
  $("timing").textContent = `${width}×${height} px: ${ms.toFixed(0)} ms per frame`;
  if (!state.camera) setStatus("");
  return true;
}

// Colours, strength and 8-bit rounding on the last raw output (no network run): as inference/color.py.
function finish() {
  if (!state.stylized) return;
  const { data, content } = state.stylized;
  const strength = Number($("strength").value) / 100;
  const rgb = finishColors(data, content.planar, $("preserve").checked, strength);
  const canvas = $("output");
  if (canvas.width !== content.width || canvas.height !== content.height) {
    Object.assign(canvas, { width: content.width, height: content.height });
  }
  const image = new ImageData(planarToRgba(rgb, content.width, content.height), content.width, content.height);
  canvas.getContext("2d").putImageData(image, 0, 0);
  state.renders += 1;
  document.body.dataset.renders = String(state.renders);
  $("download").disabled = false;
}

async function openPhoto(file) {
  if (!file) return;
  stopCamera();
  let bitmap;
  try {
    // No colour-space conversion or premultiplication: the bytes of the file, as stylize.py reads them.
    bitmap = await createImageBitmap(file, {
      imageOrientation: "from-image",
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
  } catch (err) {
    setStatus(`Cannot read ${file.name} as an image (${errorLine(err)}).`);
    return;
  }
  state.source = bitmap;
  state.photoName = file.name.replace(/\.[^.]*$/, "") || "photo";
  useSource();
}

function useSource() {
  if (!state.source) return;
  state.content = captureContent(state.source, state.source.width, state.source.height);
  if (state.content) stylize();
}

async function startCamera() {
  const video = $("video");
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    setStatus(`No camera (${errorLine(err)}).`);
    state.camera = null;
    return;
  }
  video.srcObject = state.camera;
  await video.play();
  $("camera").textContent = "Stop the camera";
  $("camera").setAttribute("aria-pressed", "true");
  state.photoName = "camera";
  setStatus("");
  let last = performance.now();
  let fps = 0;
  let frames = 0;
  const step = async () => {
    if (!state.camera) return;
    if (video.readyState >= 2 && !state.running) {
      const content = captureContent(video, video.videoWidth, video.videoHeight);
      if (content) {
        state.running = true;
        const ok = await runNetwork(content).finally(() => {
          state.running = false;
        });
        if (!ok) return stopCamera();
        const now = performance.now();
        fps = frames === 0 ? 1000 / (now - last) : 0.8 * fps + 200 / (now - last);
        frames += 1;
        last = now;
        $("fps").textContent = `${fps.toFixed(1)} frames/s`;
        document.body.dataset.cameraFrames = String(frames);
      }
    }
    requestAnimationFrame(step);
  };
  requestAnimationFrame(step);
}

function stopCamera() {
  if (!state.camera) return;
  for (const track of state.camera.getTracks()) track.stop();
  state.camera = null;
  $("video").srcObject = null;
  $("camera").textContent = "Use the camera";
  $("camera").setAttribute("aria-pressed", "false");
  $("fps").textContent = "";
}

function download() {
  $("output").toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `${state.photoName || "photo"}_stylized.png`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, "image/png");
}

function wireControls() {
  $("file").addEventListener("change", (e) => {
    const [file] = e.target.files;
    e.target.value = ""; // choosing the same file again is a change too (it runs the network again)
    if (file) openPhoto(file);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    openPhoto(e.dataTransfer.files[0]);
  });
  $("strength").addEventListener("input", () => {
    $("strength-value").textContent = `${$("strength").value}%`;
    finish();
  });
  $("preserve").addEventListener("change", finish);
  $("size").addEventListener("change", useSource);
  $("camera").addEventListener("click", () => (state.camera ? stopCamera() : startCamera()));
  $("download").addEventListener("click", download);
}

async function main() {
  wireControls();
  let info;
  try {
    info = await (await fetch("model.json")).json();
  } catch (err) {
    setStatus(`Cannot read model.json (${errorLine(err)}): serve this folder over HTTP, e.g. python -m http.server.`);
    return;
  }
  state.info = info;
  const styles = info.styles.length === 1 ? readable(info.styles[0]) : `${info.styles.length} styles`;
  $("title").textContent = `faststyle: ${styles}`;
  document.title = $("title").textContent;
  $("size").value = String(info.default_max_side_px);
  if (info.style_input) buildSliders(info.styles);
  try {
    state.ort = await import(`./${info.runtime.module}`);
    state.ort.env.wasm.wasmPaths = new URL("ort/", document.baseURI).href;
    // ?threads=N: WebAssembly threads (they need a cross-origin isolated page); the runtime's default otherwise.
    const threads = Number(new URLSearchParams(location.search).get("threads"));
    if (threads > 0) state.ort.env.wasm.numThreads = threads;
    const response = await fetch(info.model);
    if (!response.ok) throw new Error(`${info.model}: HTTP ${response.status}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    [state.session, state.backend] = await createSession(state.ort, bytes);
  } catch (err) {
    setStatus(`The style network cannot run in this browser (${errorLine(err)}): too large, or no WebAssembly.`);
    document.body.dataset.state = "failed";
    return;
  }
  const threads = state.backend === "wasm" ? `, ${state.ort.env.wasm.numThreads || 1} thread(s)` : "";
  $("backend").textContent = `${state.backend === "webgpu" ? "WebGPU" : "WebAssembly"}${threads}`;
  setStatus("Open or drop a photo, or use the camera.");
  document.body.dataset.state = "ready";
  document.body.dataset.backend = state.backend;
}

main();
