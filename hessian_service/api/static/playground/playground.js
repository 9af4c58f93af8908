// The playground page: pick a model, draw (or type) an input, press Compute, look at
// the class probabilities, the Jacobian of the chosen class over the digit, and the
// Hessian as a heatmap with its rows as images. Every picture is coloured with the
// server's own colour map (/playground/colormap.json), one canvas pixel per value.

import { Colormap, derivativeBody, getJson, postDerivative, symmetricLimit } from "./service.js";

const $ = (id) => document.getElementById(id);
const SIDE = 28;
const IMAGE_SHAPE = "[1,28,28]";
const TABLE_MAX = 16; // larger matrices get the heatmap only
// The page fetches and draws the dense n x n Hessian: past this many inputs (digits: 784)
// a model is left out of the picker; /hvp, /hessian/diagonal, /trace and /eigen serve it.
const MAX_INPUTS = 4096;
const BRUSH = 2.5; // stroke width in input pixels

const state = {
  colormap: null,
  models: new Map(),
  model: null, // the chosen model's GET /models entry
  image: false, // its input is a 28 x 28 image
  samples: [],
  input: null, // Float32Array: exactly what the last Compute sent
  output: null, // the model's output (logits) for it
  jacobian: null, // [outputs, n], row-major
  predicted: null,
  chosen: null,
  hessian: null, // [n, n], row-major, for the chosen output
  limit: null, // its colour limit: max |H|
  n: 0,
  row: null, // the Hessian row shown, if any
  busy: false,
  runs: 0,
};

const count = (shape) => shape.reduce((a, b) => a * b, 1);
const fmt = (value) => (value === 0 ? "0" : String(Number(value.toPrecision(4))));
const ms = (value) => `${value.toFixed(1)} ms`;
const pixel = (k) => `pixel (${Math.floor(k / SIDE)}, ${k % SIDE})`;

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.kind = kind;
  document.body.dataset.state = kind;
}

// ---- pictures: one canvas pixel per value -------------------------------------------

function paint(canvas, width, height, colourOf) {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const image = context.createImageData(width, height);
  const { data } = image;
  for (let k = 0; k < width * height; k++) {
    const rgb = colourOf(k);
    data[k * 4] = rgb[0];
    data[k * 4 + 1] = rgb[1];
    data[k * 4 + 2] = rgb[2];
    data[k * 4 + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

function paintMatrix(canvas, values, width, height, limit) {
  paint(canvas, width, height, (k) => state.colormap.colour(values[k], limit));
}

// ---- the input: a 28 x 28 canvas, or typed numbers ----------------------------------

const digit = () => $("digit").getContext("2d", { willReadFrequently: true });

function clearDigit() {
  const context = digit();
  context.fillStyle = "#000";
  context.fillRect(0, 0, SIDE, SIDE);
}

function gridPoint(event) {
  const box = $("digit").getBoundingClientRect();
  return [((event.clientX - box.left) / box.width) * SIDE, ((event.clientY - box.top) / box.height) * SIDE];
}

function installDrawing() {
  const canvas = $("digit");
  let last = null;
  const stroke = (from, to) => {
    const context = digit();
    context.strokeStyle = "#fff";
    context.lineWidth = BRUSH;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.beginPath();
    context.moveTo(...from);
    context.lineTo(...to);
    context.stroke();
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = gridPoint(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const point = gridPoint(event);
    stroke(last, point);
    last = point;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => (last = null));
}

// The canvas's pixels as the model's input: red channel / 255 (the strokes are grey).
function readDigit() {
  const { data } = digit().getImageData(0, 0, SIDE, SIDE);
  const values = new Float32Array(SIDE * SIDE);
  for (let k = 0; k < values.length; k++) values[k] = data[k * 4] / 255;
  return values;
}

function loadSample() {
  const [sample] = state.samples;
  const image = digit().createImageData(SIDE, SIDE);
  sample.data.forEach((value, k) => {
    const grey = Math.round(Math.min(1, Math.max(0, value)) * 255);
    image.data.set([grey, grey, grey, 255], k * 4);
  });
  digit().putImageData(image, 0, 0);
  setStatus(`sample digit loaded (label ${sample.label}); press Compute`, "ready");
}

function readNumbers() {
  const n = count(state.model.input_shape);
  const parts = $("numbers").value.split(/[\s,]+/).filter((part) => part !== "");
  const values = parts.map(Number);
  if (values.length !== n || values.some((value) => !Number.isFinite(value))) {
    throw new Error(`input: expected ${n} finite numbers separated by commas, got "${$("numbers").value}"`);
  }
  return Float32Array.from(values);
}

// ---- results -------------------------------------------------------------------------

function softmax(logits) {
  const top = Math.max(...logits);
  const exp = Array.from(logits, (value) => Math.exp(value - top));
  const total = exp.reduce((a, b) => a + b, 0);
  return exp.map((value) => value / total);
}

function renderOutputs() {
  const values = Array.from(state.output);
  const shares = state.image ? softmax(values) : values.map((v) => Math.abs(v) / (symmetricLimit(values) || 1));
  const bars = $("bars");
  bars.replaceChildren();
  shares.forEach((share, k) => {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.index = String(k);
    bar.dataset.value = String(state.image ? share : values[k]);
    bar.classList.toggle("predicted", k === state.predicted);
    bar.classList.toggle("chosen", k === state.chosen);
    bar.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
    bar.querySelector(".label").textContent = state.image ? `class ${k}` : `out ${k}`;
    bar.querySelector(".fill").style.width = `${(share * 100).toFixed(2)}%`;
    bar.querySelector(".value").textContent = state.image ? `${(share * 100).toFixed(1)}%` : fmt(values[k]);
    bar.addEventListener("click", () => choose(k));
    bars.append(bar);
  });
  $("predicted").textContent = state.predicted === null ? "–" : String(state.predicted);
  $("outputs-hint").textContent = state.image
    ? "softmax of the logits; click a class to see its derivatives"
    : "the model's outputs; click one to see its Hessian";
}

// The Jacobian row of the chosen class over the digit: its colour (own limit), more
// opaque where |J| is larger, blended with the digit's grey.
function renderSaliency() {
  const n = state.n;
  const row = state.jacobian.subarray(state.chosen * n, (state.chosen + 1) * n);
  const limit = symmetricLimit(row);
  paint($("saliency"), SIDE, SIDE, (k) => {
    const grey = state.input[k] * 255;
    const alpha = limit > 0 ? (0.85 * Math.abs(row[k])) / limit : 0;
    return state.colormap.colour(row[k], limit).map((c) => Math.round((1 - alpha) * grey + alpha * c));
  });
  $("saliency-class").textContent = String(state.chosen);
  $("saliency-label").textContent =
    `∂ logit ${state.chosen} / ∂ pixel over the digit (grey), coloured with ±${fmt(limit)} ` +
    "(this row's max |J|). Click a pixel to see its Hessian row.";
}

function renderHessian() {
  const { n, hessian, limit } = state;
  const canvas = $("heatmap");
  paintMatrix(canvas, hessian, n, n, limit);
  const size = n >= 392 ? n : n * Math.ceil(392 / n);
  canvas.style.width = canvas.style.height = `${size}px`;
  paint($("scale-bar"), state.colormap.steps, 1, (k) => state.colormap.rgb[k]);
  $("scale-min").textContent = fmt(-limit);
  $("scale-max").textContent = fmt(limit);
  $("scale-label").textContent =
    `${n} × ${n}, one pixel per entry; colour limit = max |H| = ${fmt(limit)}, white = 0.`;
  const what = state.image ? `class ${state.chosen}` : `output ${state.chosen}`;
  $("hessian-title").textContent = `Hessian of ${what} with respect to the input`;
  renderTable();
  if (state.row !== null) showRow(state.row);
}

function renderTable() {
  const table = $("matrix-table");
  table.hidden = state.image || state.n > TABLE_MAX;
  table.replaceChildren();
  if (table.hidden) return;
  const head = table.insertRow();
  head.append(document.createElement("th"));
  for (let j = 0; j < state.n; j++) head.append(Object.assign(document.createElement("th"), { textContent: j }));
  for (let i = 0; i < state.n; i++) {
    const row = table.insertRow();
    row.append(Object.assign(document.createElement("th"), { textContent: i }));
    for (let j = 0; j < state.n; j++) {
      const value = state.hessian[i * state.n + j];
      const cell = row.insertCell();
      Object.assign(cell.dataset, { i, j, value: String(value) });
      cell.textContent = fmt(value);
    }
  }
}

// Hessian row i as a 28 x 28 image, coloured with the row's own symmetric limit.
function showRow(i) {
  if (!state.image || state.hessian === null) return;
  state.row = i;
  const values = state.hessian.subarray(i * state.n, (i + 1) * state.n);
  const limit = symmetricLimit(values);
  paintMatrix($("row"), values, SIDE, SIDE, limit);
  $("row-label").textContent = `Hessian row ${i}: ${pixel(i)}`;
  $("row-label").dataset.row = String(i);
  $("row-scale").dataset.limit = String(limit);
  $("row-scale").textContent =
    `H[${i}, j] for every pixel j, coloured with this row's own limit ±${fmt(limit)} ` +
    `(max |H[${i}, j]|; the heatmap uses ±${fmt(state.limit)}).`;
}

function entryAt(canvas, event, n) {
  const box = canvas.getBoundingClientRect();
  const at = (offset, length) => Math.min(n - 1, Math.max(0, Math.floor((offset / length) * n)));
  return [at(event.clientY - box.top, box.height), at(event.clientX - box.left, box.width)];
}

function installResultEvents() {
  const heatmap = $("heatmap");
  heatmap.addEventListener("pointermove", (event) => {
    if (state.hessian === null) return;
    const [i, j] = entryAt(heatmap, event, state.n);
    const value = state.hessian[i * state.n + j];
    const where = state.image ? ` (${pixel(i)}, ${pixel(j)})` : "";
    const readout = $("hover-readout");
    readout.textContent = `row ${i}, column ${j}${where}: H[${i}, ${j}] = ${value.toPrecision(6)}`;
    Object.assign(readout.dataset, { i, j, value: String(value) });
  });
  heatmap.addEventListener("click", (event) => {
    if (state.hessian !== null) showRow(entryAt(heatmap, event, state.n)[0]);
  });
  $("saliency").addEventListener("click", (event) => {
    if (state.hessian === null) return;
    const [r, c] = entryAt($("saliency"), event, SIDE);
    showRow(r * SIDE + c);
  });
}

function showTiming(kind, answer) {
  const { metadata } = answer.header;
  let dd = $(`time-${kind}`);
  if (dd === null) {
    $("timings").append(Object.assign(document.createElement("dt"), { textContent: `POST /${kind}` }));
    dd = Object.assign(document.createElement("dd"), { id: `time-${kind}` });
    $("timings").append(dd);
  }
  dd.textContent = `server ${ms(metadata.compute_ms)}, round trip ${ms(answer.roundTripMs)}, method ${metadata.method}`;
  Object.assign(dd.dataset, { computeMs: metadata.compute_ms, roundTripMs: answer.roundTripMs, method: metadata.method });
}

function showNotes(...answers) {
  const notes = new Set(answers.flatMap((answer) => answer.header.metadata.notes));
  $("notes").replaceChildren(...[...notes].map((note) => Object.assign(document.createElement("li"), { textContent: note })));
}

// ---- the two calls -------------------------------------------------------------------

async function run(what, work) {
  if (state.busy) return;
  state.busy = true;
  $("compute").disabled = true;
  setStatus(`${what}…`, "busy");
  try {
    await work();
    state.runs += 1;
    document.body.dataset.runs = String(state.runs);
    setStatus("done", "done");
  } catch (error) {
    setStatus(error.message, "error");
  } finally {
    state.busy = false;
    $("compute").disabled = false;
  }
}

async function hessianOfChosen() {
  const { name, input_shape: shape } = state.model;
  const answer = await postDerivative("/hessian", derivativeBody(name, shape, state.input, state.chosen));
  state.hessian = answer.arrays.hessian;
  state.limit = symmetricLimit(state.hessian);
  showTiming("hessian", answer);
  renderHessian();
  return answer;
}

function compute() {
  return run("computing", async () => {
    const values = state.image ? readDigit() : readNumbers();
    const { name, input_shape: shape } = state.model;
    const answer = await postDerivative("/jacobian", derivativeBody(name, shape, values));
    Object.assign(state, { input: values, n: values.length, hessian: null, limit: null });
    state.output = answer.arrays.output;
    state.jacobian = answer.arrays.jacobian;
    state.predicted = state.image ? state.output.indexOf(Math.max(...state.output)) : null;
    state.chosen = state.image || state.chosen === null || state.chosen >= state.output.length ? (state.predicted ?? 0) : state.chosen;
    showTiming("jacobian", answer);
    renderOutputs();
    if (state.image) renderSaliency();
    showNotes(answer, await hessianOfChosen());
  });
}

function choose(k) {
  if (state.input === null) return;
  return run(`the Hessian of ${k}`, async () => {
    state.chosen = k;
    renderOutputs();
    if (state.image) renderSaliency();
    await hessianOfChosen();
  });
}

// ---- models --------------------------------------------------------------------------

function selectModel(name) {
  const model = state.models.get(name);
  Object.assign(state, { model, image: JSON.stringify(model.input_shape) === IMAGE_SHAPE });
  Object.assign(state, { input: null, output: null, jacobian: null, hessian: null, predicted: null, chosen: null, row: null });
  for (const id of ["image-input", "saliency-panel", "row-panel"]) $(id).hidden = !state.image;
  $("vector-input").hidden = state.image;
  $("predicted").parentElement.hidden = !state.image;
  const n = count(model.input_shape);
  if (!state.image) {
    $("numbers").value = Array.from({ length: n }, (_, k) => k + 1).join(", ");
    $("numbers-hint").textContent = `${n} numbers: input shape [${model.input_shape}]`;
  }
  for (const id of ["bars", "timings", "notes", "matrix-table"]) $(id).replaceChildren();
  $("predicted").textContent = "–";
  $("hessian-title").textContent = `Hessian (${model.name}: ${model.description})`;
}

async function start() {
  const [colormap, listing, samples] = await Promise.all([
    Colormap.load(),
    getJson("/models"),
    getJson("/playground/samples.json"),
  ]);
  state.colormap = colormap;
  state.samples = samples.samples;
  const select = $("model");
  for (const model of listing.models) {
    if (!model.ready || model.latest === false || count(model.input_shape) > MAX_INPUTS) continue;
    state.models.set(model.name, model);
    select.append(new Option(`${model.name}  [${model.input_shape}]`, model.name));
  }
  if (state.models.size === 0) throw new Error("no model is ready yet; reload the page in a moment");
  select.value = state.models.has("digits_cnn") ? "digits_cnn" : [...state.models.keys()][0];
  select.addEventListener("change", () => selectModel(select.value));
  selectModel(select.value);
  clearDigit();
  installDrawing();
  installResultEvents();
  $("clear").addEventListener("click", clearDigit);
  $("sample").addEventListener("click", loadSample);
  $("sample").disabled = state.samples.length === 0;
  $("compute").addEventListener("click", compute);
  $("compute").disabled = false;
  setStatus("draw a digit (or load the sample), then press Compute", "ready");
}

// Read-only views for tests and the console: what was sent, and what came back.
window.playground = Object.freeze({
  get model() { return state.model?.name ?? null; },
  get input() { return state.input?.slice() ?? null; },
  get output() { return state.output?.slice() ?? null; },
  get hessian() { return state.hessian?.slice() ?? null; },
  get limit() { return state.limit; },
  get predicted() { return state.predicted; },
  get chosen() { return state.chosen; },
  get runs() { return state.runs; },
});

start().catch((error) => setStatus(error.message, "error"));
