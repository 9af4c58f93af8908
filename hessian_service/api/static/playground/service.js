// Talking to hessian-service: request bodies, the Open Inference Protocol binary
// framing of the answers, and the server's colour map with its rule.

const HEADER_LENGTH = "Inference-Header-Content-Length";

// Little-endian bytes of float32 values, as base64: the compact form of an FP32 input.
export function float32Base64(values) {
  const bytes = new Uint8Array(values.length * 4);
  const view = new DataView(bytes.buffer);
  values.forEach((value, k) => view.setFloat32(k * 4, value, true));
  let text = "";
  for (let k = 0; k < bytes.length; k += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(k, k + 0x8000));
  }
  return btoa(text);
}

// The body of POST /jacobian or /hessian for one sample, answered in the binary framing.
export function derivativeBody(model, shape, values, outputIndex) {
  const body = {
    model,
    inputs: [{ name: "x", shape, datatype: "FP32", data: float32Base64(values) }],
    encoding: "binary",
  };
  if (outputIndex !== undefined) body.output_index = outputIndex;
  return body;
}

const READERS = {
  FP32: [4, Float32Array, (view, at) => view.getFloat32(at, true)],
  FP64: [8, Float64Array, (view, at) => view.getFloat64(at, true)],
};

function readTensor(buffer, offset, size, datatype) {
  const reader = READERS[datatype];
  if (!reader) throw new Error(`the page reads FP32 and FP64 tensors, not ${datatype}`);
  const [width, ArrayType, read] = reader;
  const view = new DataView(buffer, offset, size);
  const values = new ArrayType(size / width);
  for (let k = 0; k < values.length; k++) values[k] = read(view, k * width);
  return values;
}

// A binary-framed body: its first `headerLength` bytes are the JSON header; each output
// with parameters.binary_data_size has its raw little-endian bytes after it, in order.
export function decodeFramed(buffer, headerLength) {
  const text = new TextDecoder().decode(new Uint8Array(buffer, 0, headerLength));
  const header = JSON.parse(text);
  const arrays = {};
  let offset = headerLength;
  for (const output of header.outputs ?? []) {
    const size = output.parameters?.binary_data_size;
    if (size === undefined) throw new Error(`output ${output.name} has no binary_data_size`);
    if (offset + size > buffer.byteLength) throw new Error(`output ${output.name} is cut short`);
    arrays[output.name] = readTensor(buffer, offset, size, output.datatype);
    offset += size;
  }
  if (offset !== buffer.byteLength) {
    throw new Error(`${buffer.byteLength - offset} bytes left after the outputs`);
  }
  return { header, arrays };
}

async function failure(response) {
  const text = await response.text();
  try {
    const problem = JSON.parse(text);
    return new Error(`${response.status} ${problem.title ?? ""}: ${problem.detail ?? problem.error ?? text}`);
  } catch {
    return new Error(`${response.status}: ${text.slice(0, 300)}`);
  }
}

export async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST a derivative request; its JSON header, its outputs by name, and the round trip.
export async function postDerivative(path, body) {
  const started = performance.now();
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const buffer = await response.arrayBuffer();
  const roundTripMs = performance.now() - started;
  const length = response.headers.get(HEADER_LENGTH);
  if (length === null) throw new Error(`${path}: the answer has no ${HEADER_LENGTH} header`);
  return { ...decodeFramed(buffer, Number(length)), roundTripMs };
}

// The server's diverging colour map (/playground/colormap.json) and its rule:
// index = floor((value / limit + 1) * centre + 0.5), clipped to [0, steps - 1].
export class Colormap {
  constructor(table) {
    this.steps = table.steps;
    this.centre = table.centre;
    this.rgb = table.rgb;
  }

  static async load() {
    return new Colormap(await getJson("/playground/colormap.json"));
  }

  index(value, limit) {
    if (!(limit > 0) || !Number.isFinite(limit)) return this.centre;
    const scaled = Math.floor((value / limit + 1) * this.centre + 0.5);
    return Math.min(this.steps - 1, Math.max(0, scaled));
  }

  colour(value, limit) {
    return this.rgb[this.index(value, limit)];
  }
}

// The largest |value| (0 for none): the symmetric range of a matrix's colours.
export function symmetricLimit(values) {
  let limit = 0;
  for (const value of values) limit = Math.max(limit, Math.abs(value));
  return limit;
}
