// vae-dist browser demo: prior samples, a latent explorer and interpolation between test images,
// all decoded in the page by onnxruntime-web (WebAssembly backend). Facts come from site.json.

const SITE_FORMAT = 'vae-dist-web/1';
const GRID_COUNT = 64, GRID_COLS = 8; // prior samples, decoded as one batch
const MAX_SLIDERS = 32, SLIDER_LIMIT = 3; // sliders for the first 32 dimensions (all of the shipped models')
const STEPS = 10; // interpolation points from A to B, both ends included
const WARMUP_RUNS = 3;
const MIN_SAMPLE_MS = 5; // one latency sample spans at least this long

const $ = (id) => document.getElementById(id);

let ort; // the runtime module, imported only once WebAssembly is known to exist
let facts; // parsed site.json
let shape; // [C, H, W]
let latentDim;
let encoder, decoder; // {session, input, outputs, run}
let testImages; // Float32Array, count x C x H x W in [0, 1]
let point; // the explorer's latent point, Float32Array(latentDim)
const pair = { a: 0, b: 1, next: 'a' }; // interpolation ends and which one the next click sets
let failed = false;

// The API, filled in at the end of this module's (synchronous) first run, so tests can await
// window.vae.ready straight after navigation.
const api = { ready: null, facts: null, decode, encode, latency, redrawLatency };

/** A failure whose message is meant for the reader of the page. */
class PageError extends Error {}

async function start() {
  try {
    await loadRuntime();
    facts = await loadFacts();
    api.facts = facts;
    const [encBytes, decBytes, images] = await Promise.all([
      fetchModel(facts.files.encoder),
      fetchModel(facts.files.decoder),
      fetchTestImages(facts.test_images),
    ]);
    // The decoder goes first: if the runtime cannot start, this is where it shows.
    decoder = await createSession(facts.files.decoder, decBytes);
    encoder = await createSession(facts.files.encoder, encBytes);
    testImages = images;
    await showPage();
    return facts;
  } catch (err) {
    throw new Error(fail(err));
  }
}

/** Show one error on the page (the first one only), hide the demo, and return the message. */
function fail(err) {
  const message = err instanceof PageError ? err.message : `Unexpected error: ${err?.message ?? err}`;
  if (failed) return message;
  failed = true;
  $('app').hidden = true;
  $('status').hidden = true;
  const box = $('error');
  box.textContent = message;
  box.hidden = false;
  console.error(message);
  return message;
}

// ---- loading -------------------------------------------------------------------------------

async function loadRuntime() {
  if (typeof WebAssembly === 'undefined') {
    throw new PageError('WebAssembly could not start: this browser does not provide WebAssembly.');
  }
  try {
    ort = await import('./ort/ort.wasm.min.mjs');
  } catch (err) {
    throw new PageError(`WebAssembly could not start: onnxruntime-web failed to load (${err.message}).`);
  }
  // An absolute URL: a relative one would be taken relative to the runtime's own folder.
  ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which a static host may lack
  ort.env.wasm.proxy = false;
  ort.env.logLevel = 'error';
}

async function loadFacts() {
  const site = JSON.parse(new TextDecoder().decode(await fetchBytes('site.json', 'site.json')));
  if (site.format !== SITE_FORMAT) {
    throw new PageError(`site.json has format "${site.format}", expected "${SITE_FORMAT}".`);
  }
  if (site.status !== 'verified') {
    throw new PageError(
      `Refusing to run: model variant "${site.variant}" has status "${site.status}", not "verified".`,
    );
  }
  shape = site.model.image_shape;
  latentDim = site.model.latent_dim;
  document.title = `${site.run} · vae-dist`;
  $('run-name').textContent = site.run;
  return site;
}

async function fetchBytes(path, what) {
  let response;
  try {
    response = await fetch(path);
  } catch (err) {
    throw new PageError(`Could not fetch ${what} (${err.message}).`);
  }
  if (!response.ok) throw new PageError(`${what} is missing (HTTP ${response.status}).`);
  return new Uint8Array(await response.arrayBuffer());
}

/** Fetch a model file and check it byte for byte against site.json before the runtime sees it. */
async function fetchModel(file) {
  const bytes = await fetchBytes(file.path, `Model file ${file.path}`);
  if (bytes.byteLength !== file.size) {
    throw new PageError(
      `Model file ${file.path} is corrupt: ${bytes.byteLength} bytes, expected ${file.size}.`,
    );
  }
  if ((await sha256(bytes)) !== file.sha256) {
    throw new PageError(`Model file ${file.path} is corrupt: its sha256 does not match site.json.`);
  }
  return bytes;
}

async function fetchTestImages(info) {
  const bytes = await fetchBytes(info.path, `Test image file ${info.path}`);
  const expected = info.count * size(info.shape);
  if (bytes.byteLength !== expected || String(info.shape) !== String(shape)) {
    throw new PageError(`Test image file ${info.path} does not hold ${info.count} images of ${shape}.`);
  }
  if ((await sha256(bytes)) !== info.sha256) {
    throw new PageError(`Test image file ${info.path} is corrupt: its sha256 does not match site.json.`);
  }
  return Float32Array.from(bytes, (v) => v / 255);
}

async function createSession(file, bytes) {
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, {
      executionProviders: ['wasm'],
      logSeverityLevel: 3, // errors only: a healthy page logs nothing
    });
  } catch (err) {
    // The runtime starts on the first session; its failure names no backend left to use.
    if (/backend/i.test(err.message)) {
      throw new PageError(`WebAssembly could not start: ${err.message}`);
    }
    throw new PageError(`Model file ${file.path} could not be loaded: ${err.message}`);
  }
  return { session, input: file.input, outputs: file.outputs, run: serial(session) };
}

/** Runs fn(session) only after the previous call on the same session finished: sessions must not
 * run concurrently. */
function serial(session) {
  let tail = Promise.resolve();
  return (fn) => {
    const result = tail.then(() => fn(session));
    tail = result.catch(() => {});
    return result;
  };
}

// ---- hashing ---------------------------------------------------------------------------------

async function sha256(bytes) {
  // crypto.subtle exists only in secure contexts (https, localhost); plain http gets the JS one.
  const digest = globalThis.crypto?.subtle
    ? new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))
    : sha256Js(bytes);
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** SHA-256 (FIPS 180-4) in plain JavaScript. */
function sha256Js(bytes) {
  const primes = [];
  for (let n = 2; primes.length < 64; n++) if (primes.every((p) => n % p)) primes.push(n);
  const frac = (x) => ((x - Math.floor(x)) * 2 ** 32) >>> 0;
  const K = primes.map((p) => frac(Math.cbrt(p)));
  const H = primes.slice(0, 8).map((p) => frac(Math.sqrt(p)));
  // Pad: 0x80, zeros, then the length in bits as a 64-bit big-endian number.
  const padded = new Uint8Array(Math.ceil((bytes.length + 9) / 64) * 64);
  padded.set(bytes);
  padded[bytes.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bytes.length / 2 ** 29));
  view.setUint32(padded.length - 4, (bytes.length * 8) >>> 0);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, h] = H;
    for (let i = 0; i < 64; i++) {
      const t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
      const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      [h, g, f, e, d, c, b, a] = [g, f, e, (d + t1) | 0, c, b, a, (t1 + t2) | 0];
    }
    H.forEach((v, i, arr) => (arr[i] = (v + [a, b, c, d, e, f, g, h][i]) >>> 0));
  }
  const out = new DataView(new ArrayBuffer(32));
  H.forEach((v, i) => out.setUint32(4 * i, v));
  return new Uint8Array(out.buffer);
}

// ---- the model -------------------------------------------------------------------------------

const size = (dims) => dims.reduce((a, b) => a * b, 1);

function needModel() {
  if (!decoder || !encoder) throw new Error('The model is not loaded yet: await window.vae.ready first.');
}

/** Decode n latent points (n x latent, row-major) to x_mean (n x C x H x W). */
async function decode(z, n) {
  needModel();
  const data = z instanceof Float32Array ? z : Float32Array.from(z);
  if (data.length !== n * latentDim) throw new Error(`decode: expected ${n} x ${latentDim} values, got ${data.length}`);
  const feeds = { [decoder.input]: new ort.Tensor('float32', data, [n, latentDim]) };
  const out = await decoder.run((s) => s.run(feeds));
  return out[decoder.outputs[0]].data;
}

/** Encode n images (n x C x H x W in [0, 1]) to the posterior's mean and log-variance. */
async function encode(x, n) {
  needModel();
  const data = x instanceof Float32Array ? x : Float32Array.from(x);
  if (data.length !== n * size(shape)) throw new Error(`encode: expected ${n} x ${shape.join(' x ')} values, got ${data.length}`);
  const feeds = { [encoder.input]: new ort.Tensor('float32', data, [n, ...shape]) };
  const out = await encoder.run((s) => s.run(feeds));
  const [mu, logvar] = encoder.outputs;
  return { mu: out[mu].data, logvar: out[logvar].data };
}

/** Decoder latency in ms for one batch, on fixed latents, after warm-up runs. Chromium coarsens
 * performance.now() (to 0.1 ms without cross-origin isolation), so each sample times enough calls
 * in a row to span MIN_SAMPLE_MS and divides. */
async function latency(batch, repeats = 20) {
  needModel();
  const feeds = { [decoder.input]: new ort.Tensor('float32', normals(batch * latentDim, 12345), [batch, latentDim]) };
  const calls = async (count) => {
    const t0 = performance.now();
    for (let i = 0; i < count; i++) await decoder.run((s) => s.run(feeds));
    return performance.now() - t0;
  };
  await calls(WARMUP_RUNS);
  let inner = 1;
  while (inner < 1024 && (await calls(inner)) < MIN_SAMPLE_MS) inner *= 2;
  const times = [];
  for (let i = 0; i < repeats; i++) times.push((await calls(inner)) / inner);
  return {
    batch, repeats, calls_per_sample: inner, min_sample_ms: MIN_SAMPLE_MS,
    median_ms: median(times), min_ms: Math.min(...times),
  };
}

/** Median ms of one explorer redraw (decode one point and draw it), as a slider move causes. */
async function redrawLatency(repeats = 20) {
  needModel();
  const times = await timeRuns(repeats, async () => {
    const t0 = performance.now();
    await redrawExplorer();
    return performance.now() - t0;
  });
  return median(times);
}

/** Run measure() WARMUP_RUNS times unrecorded, then `repeats` times; return the times. */
async function timeRuns(repeats, measure) {
  for (let i = 0; i < WARMUP_RUNS; i++) await measure();
  const times = [];
  for (let i = 0; i < repeats; i++) times.push(await measure());
  return times;
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// ---- random numbers --------------------------------------------------------------------------

/** mulberry32: a small seeded PRNG, uniform in [0, 1), so a seed always gives the same samples. */
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `count` standard normal numbers from a seed (Box-Muller). */
function normals(count, seed) {
  const rand = mulberry32(seed);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - rand())); // 1 - u is in (0, 1], so the log is finite
    const theta = 2 * Math.PI * rand();
    out[i] = r * Math.cos(theta);
    if (i + 1 < count) out[i + 1] = r * Math.sin(theta);
  }
  return out;
}

// ---- drawing ---------------------------------------------------------------------------------

/** Draw `count` planar C x H x W images (values in [0, 1]) on a canvas as a grid, each pixel
 * scaled up to scale x scale screen pixels without smoothing. */
function drawGrid(canvas, data, count, cols, scale, gap = 2) {
  const [C, H, W] = shape;
  const rows = Math.ceil(count / cols);
  canvas.width = cols * W * scale + (cols - 1) * gap;
  canvas.height = rows * H * scale + (rows - 1) * gap;
  // Pixels get read back (by tests and tools); a CPU-backed canvas spares the browser's warning.
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false; // set after resizing: a resize resets the context state
  const tile = document.createElement('canvas');
  tile.width = W;
  tile.height = H;
  const tileCtx = tile.getContext('2d');
  for (let k = 0; k < count; k++) {
    tileCtx.putImageData(toImageData(data, k * C * H * W), 0, 0);
    const x = (k % cols) * (W * scale + gap);
    const y = Math.floor(k / cols) * (H * scale + gap);
    ctx.drawImage(tile, x, y, W * scale, H * scale);
  }
  canvas.dataset.draws = (Number(canvas.dataset.draws) || 0) + 1; // lets a script wait for a redraw
}

/** One planar image at `offset` as RGBA pixels; one channel is grey, three are RGB. */
function toImageData(data, offset) {
  const [C, H, W] = shape;
  const plane = H * W;
  const image = new ImageData(W, H);
  const px = image.data;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      const v = data[offset + Math.min(c, C - 1) * plane + p];
      px[4 * p + c] = Math.round(Math.min(1, Math.max(0, v)) * 255);
    }
    px[4 * p + 3] = 255;
  }
  return image;
}

/** A whole-number scale that brings an image's width near `target` screen pixels. */
const scaleFor = (target) => Math.max(1, Math.round(target / shape[2]));

// ---- the page --------------------------------------------------------------------------------

async function showPage() {
  $('grid-count').textContent = GRID_COUNT;
  $('steps').textContent = STEPS;
  showFacts();
  buildSliders();
  buildTestImages();
  $('status').hidden = true;
  $('app').hidden = false;
  await Promise.all([drawSamples(), redrawExplorer(), drawInterpolation()]);
}

function showFacts() {
  const m = facts.model;
  const mb = (file) => `${file.path} (${(file.size / 1e6).toFixed(2)} MB)`;
  let runtime = facts.runtime.version;
  const loaded = ort.env.versions?.web;
  if (loaded && loaded !== runtime) runtime += ` (loaded ${loaded})`;
  const rows = [
    ['run', 'Run', facts.run],
    ['kind', 'Model kind', m.kind],
    ['image_shape', 'Image shape', m.image_shape.join(' × ')],
    ['latent_dim', 'Latent size', m.latent_dim],
    ['dataset', 'Data set', m.dataset],
    ['status', 'Status', facts.status],
    ['test_neg_elbo', 'Test −ELBO (nats)', Number.isFinite(m.test_neg_elbo) ? m.test_neg_elbo.toFixed(2) : 'not recorded'],
    ['variant', 'Variant', facts.variant],
    ['encoder', 'Encoder file', mb(facts.files.encoder)],
    ['decoder', 'Decoder file', mb(facts.files.decoder)],
    ['runtime', 'onnxruntime-web', runtime],
  ];
  const change = facts.variant_quality?.neg_elbo_change;
  if (typeof change === 'number') {
    const after = rows.findIndex(([key]) => key === 'variant') + 1;
    rows.splice(after, 0, ['neg_elbo_change', '−ELBO change from fp32 (nats)', change.toFixed(2)]);
  }
  const list = $('facts');
  list.replaceChildren();
  for (const [key, label, value] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = label;
    const dd = document.createElement('dd');
    dd.textContent = value;
    dd.dataset.fact = key;
    list.append(dt, dd);
  }
}

// Prior samples.

async function drawSamples() {
  const seed = Math.trunc(Number($('seed').value)) || 0;
  const x = await decode(normals(GRID_COUNT * latentDim, seed), GRID_COUNT);
  drawGrid($('samples'), x, GRID_COUNT, GRID_COLS, scaleFor(64));
}

function wireSamples() {
  $('new-samples').addEventListener('click', () => {
    $('seed').value = (Math.trunc(Number($('seed').value)) || 0) + 1;
    drawSamples().catch(fail);
  });
  $('seed').addEventListener('change', () => drawSamples().catch(fail));
}

// Latent explorer.

function buildSliders() {
  point = new Float32Array(latentDim);
  const box = $('sliders');
  box.replaceChildren();
  for (let i = 0; i < Math.min(MAX_SLIDERS, latentDim); i++) {
    const label = document.createElement('label');
    const name = document.createElement('span');
    name.textContent = `z${i}`;
    const slider = Object.assign(document.createElement('input'), {
      type: 'range', id: `z${i}`, min: -SLIDER_LIMIT, max: SLIDER_LIMIT, step: 0.01, value: 0,
    });
    const value = document.createElement('output');
    value.textContent = '0.00';
    slider.addEventListener('input', () => {
      point[i] = Number(slider.value);
      value.textContent = point[i].toFixed(2);
      requestRedraw();
    });
    label.append(name, slider, value);
    box.append(label);
  }
}

/** Move the explorer to `z` (values for the sliders are clipped to their range). */
function setPoint(z) {
  point = z;
  for (let i = 0; i < Math.min(MAX_SLIDERS, latentDim); i++) {
    point[i] = Math.min(SLIDER_LIMIT, Math.max(-SLIDER_LIMIT, point[i]));
    const slider = $(`z${i}`);
    slider.value = point[i];
    slider.nextElementSibling.textContent = point[i].toFixed(2);
  }
  requestRedraw();
}

function wireExplorer() {
  let seed = 1000;
  $('reset').addEventListener('click', () => setPoint(new Float32Array(latentDim)));
  $('random-point').addEventListener('click', () => setPoint(normals(latentDim, seed++)));
}

async function redrawExplorer() {
  const x = await decode(point.slice(), 1); // a copy: sliders may move while it decodes
  drawGrid($('explorer'), x, 1, 1, scaleFor(256), 0);
}

// Slider events arrive faster than decodes finish; keep at most one decode going and always
// finish on the latest point.
let redrawWanted = false, redrawing = false;

function requestRedraw() {
  redrawWanted = true;
  if (!redrawing) redrawLoop().catch(fail);
}

async function redrawLoop() {
  redrawing = true;
  try {
    while (redrawWanted) {
      await new Promise(requestAnimationFrame);
      redrawWanted = false;
      await redrawExplorer();
    }
  } finally {
    redrawing = false;
  }
}

// Interpolation between two test images.

function buildTestImages() {
  const box = $('test-images');
  box.replaceChildren();
  const imageSize = size(shape);
  for (let i = 0; i < facts.test_images.count; i++) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'thumb';
    button.dataset.index = i;
    button.title = `Test image ${i}`;
    const canvas = document.createElement('canvas');
    drawGrid(canvas, testImages.subarray(i * imageSize, (i + 1) * imageSize), 1, 1, scaleFor(48), 0);
    button.append(canvas);
    button.addEventListener('click', () => pick(i));
    box.append(button);
  }
  markPair();
}

/** The first click sets A, the next sets B, and so on; each redraws the row. */
function pick(i) {
  pair[pair.next] = i;
  pair.next = pair.next === 'a' ? 'b' : 'a';
  markPair();
  drawInterpolation().catch(fail);
}

function markPair() {
  for (const button of $('test-images').children) {
    const i = Number(button.dataset.index);
    button.classList.toggle('a', i === pair.a);
    button.classList.toggle('b', i === pair.b);
  }
  $('pair').textContent = `A = image ${pair.a}, B = image ${pair.b}; the next click picks ${pair.next.toUpperCase()}.`;
}

async function drawInterpolation() {
  const { a, b } = pair;
  const n = size(shape);
  const x = new Float32Array(2 * n);
  x.set(testImages.subarray(a * n, (a + 1) * n), 0);
  x.set(testImages.subarray(b * n, (b + 1) * n), n);
  const { mu } = await encode(x, 2); // the posterior means stand for the two images
  const z = new Float32Array(STEPS * latentDim);
  for (let k = 0; k < STEPS; k++) {
    const t = k / (STEPS - 1);
    for (let j = 0; j < latentDim; j++) z[k * latentDim + j] = (1 - t) * mu[j] + t * mu[latentDim + j];
  }
  const canvas = $('interpolation');
  drawGrid(canvas, await decode(z, STEPS), STEPS, STEPS, scaleFor(64));
  Object.assign(canvas.dataset, { a, b });
}

wireSamples();
wireExplorer();
window.vae = api;
api.ready = start();
api.ready.catch(() => {}); // failures are shown on the page; an unobserved rejection would log again
