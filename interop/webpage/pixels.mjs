// The page's pixel arithmetic, written once and checked against the Python it mirrors
// (tests/interop/test_web_pixels.py runs these functions in node on vectors from the Python functions):
// data/io.py (8-bit <-> [0, 1], resize_max_side), models/styles.py (mix weights) and inference/color.py
// (preserve_colors, finish_colors). Images are planar float32 RGB, (3, H, W) flattened, values in [0, 1].

// Full-range YCbCr of ITU-R BT.601, the matrix of inference/color.py.
const RGB_TO_YCBCR = [
  [0.299, 0.587, 0.114],
  [-0.168736, -0.331264, 0.5],
  [0.5, -0.418688, -0.081312],
];

function invert3(m) {
  const [[a, b, c], [d, e, f], [g, h, i]] = m;
  const det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g);
  return [
    [(e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det],
    [(f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det],
    [(d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det],
  ];
}

const YCBCR_TO_RGB = invert3(RGB_TO_YCBCR);

/** Python's round(): halves go to the even neighbour (torch.round and round() both do), not up as Math.round. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** data/io.py's to_uint8 for one value: clamp to [0, 1], times 255 in float32, round half to even. */
export function toByte(v) {
  const clamped = v > 1 ? 1 : v >= 0 ? v : 0; // NaN -> 0
  return roundHalfEven(Math.fround(clamped * 255));
}

/** (w, h) after data/io.py's resize_max_side: the longer side at most maxSide, never upscaled. */
export function workingSize(width, height, maxSide) {
  const longest = Math.max(width, height);
  if (!(maxSide > 0) || longest <= maxSide) return [width, height];
  const scale = maxSide / longest;
  return [Math.max(1, roundHalfEven(width * scale)), Math.max(1, roundHalfEven(height * scale))];
}

/** models/styles.py's rule for a mix: weights >= 0, not all 0, divided by their sum; null when not a valid mix. */
export function mixWeights(raw) {
  let total = 0;
  for (const w of raw) {
    if (!Number.isFinite(w) || w < 0) return null;
    total += w;
  }
  if (!(total > 0) || !Number.isFinite(total)) return null;
  return raw.map((w) => w / total);
}

/** RGBA bytes (ImageData.data) -> planar float32 RGB in [0, 1] (data/io.py's pil_to_tensor: byte / 255). */
export function rgbaToPlanar(rgba, width, height) {
  const n = width * height;
  const out = new Float32Array(3 * n);
  for (let p = 0; p < n; p++) {
    out[p] = rgba[4 * p] / 255;
    out[n + p] = rgba[4 * p + 1] / 255;
    out[2 * n + p] = rgba[4 * p + 2] / 255;
  }
  return out;
}

/** Planar RGB in [0, 1] -> opaque RGBA bytes with the one rounding rule (toByte). */
export function planarToRgba(planar, width, height, rgba = new Uint8ClampedArray(4 * width * height)) {
  const n = width * height;
  for (let p = 0; p < n; p++) {
    rgba[4 * p] = toByte(planar[p]);
    rgba[4 * p + 1] = toByte(planar[n + p]);
    rgba[4 * p + 2] = toByte(planar[2 * n + p]);
    rgba[4 * p + 3] = 255;
  }
  return rgba;
}

function clamp01(v) {
  return v > 1 ? 1 : v >= 0 ? v : 0;
}

/**
 * inference/color.py's finish_colors: with preserveColor the stylized luminance and the content's chroma
 * (clamped to [0, 1]), then strength * stylized + (1 - strength) * content. Returns a new planar array.
 */
export function finishColors(stylized, content, preserveColor, strength) {
  const n = content.length / 3;
  const out = new Float32Array(3 * n);
  if (strength <= 0) {
    out.set(content);
    return out;
  }
  const [ry, [rcb0, rcb1, rcb2], [rcr0, rcr1, rcr2]] = [RGB_TO_YCBCR[0], RGB_TO_YCBCR[1], RGB_TO_YCBCR[2]];
  const inv = YCBCR_TO_RGB;
  for (let p = 0; p < n; p++) {
    let r = stylized[p];
    let g = stylized[n + p];
    let b = stylized[2 * n + p];
    const cr = content[p];
    const cg = content[n + p];
    const cb = content[2 * n + p];
    if (preserveColor) {
      const y = ry[0] * r + ry[1] * g + ry[2] * b;
      const u = rcb0 * cr + rcb1 * cg + rcb2 * cb;
      const v = rcr0 * cr + rcr1 * cg + rcr2 * cb;
      r = clamp01(inv[0][0] * y + inv[0][1] * u + inv[0][2] * v);
      g = clamp01(inv[1][0] * y + inv[1][1] * u + inv[1][2] * v);
      b = clamp01(inv[2][0] * y + inv[2][1] * u + inv[2][2] * v);
    }
    if (strength < 1) {
      r = cr + strength * (r - cr);
      g = cg + strength * (g - cg);
      b = cb + strength * (b - cb);
    }
    out[p] = r;
    out[n + p] = g;
    out[2 * n + p] = b;
  }
  return out;
}
