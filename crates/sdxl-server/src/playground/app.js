// sdxl playground: turns the form into a Workers AI run request, streams it through
// POST /v1/run/stream and shows the queue position, per-step previews and the result.
'use strict';

const STREAM_ROUTE = '/v1/run/stream';
const CLASSIC_ROUTE = '/ai/run/@cf/bytedance/stable-diffusion-xl-lightning';
const TOKEN_KEY = 'sdxl.token';
const MAX_SEED = (1n << 64n) - 1n;

const $ = (id) => document.getElementById(id);
const form = $('form');
const canvas = $('mask-canvas');
const ctx = canvas.getContext('2d');

const state = {
  controller: null, // AbortController of the run in flight; aborting cancels the job
  lastSeed: null, // the last image's seed, a decimal string (may exceed 2^53)
  image: null, // { name, base64, width, height, url } of the uploaded input image
  maskPainted: false, // an unpainted (all black) mask would keep everything: not sent
  maskUrl: null,
  resultUrl: null,
};

// Every step the page has rendered, in order; the browser test reads it.
window.sdxlProgressLog = [];

// ---- token ----------------------------------------------------------------------------

// localStorage can throw (storage disabled); the token then lasts for the page's life only.
function loadToken() {
  try {
    $('token').value = localStorage.getItem(TOKEN_KEY) || '';
  } catch {}
}

function saveToken() {
  try {
    const token = $('token').value;
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {}
  updateCurl();
}

// ---- the request --------------------------------------------------------------------

const clampSide = (side) => Math.min(Math.max(side, 256), 2048);

// null: leave width and height out, so the server uses the input image's size.
function requestedSize() {
  const value = $('size').value;
  if (value === 'image') return null;
  if (value === 'custom') return { width: Number($('width').value), height: Number($('height').value) };
  const [width, height] = value.split('x').map(Number);
  return { width, height };
}

// The body as an object; `seed`, `image_b64` and `mask` are spliced in as raw JSON by
// toJson (seeds may exceed 2^53, and the curl command reads the files instead).
function buildBody(withSeed) {
  const body = { prompt: $('prompt').value };
  if ($('negative-prompt').value.trim()) body.negative_prompt = $('negative-prompt').value;
  Object.assign(body, requestedSize());
  if ($('steps').value !== '') body.num_steps = Number($('steps').value);
  if ($('guidance').value !== '') body.guidance = Number($('guidance').value);
  if (withSeed) body.seed = null;
  if (state.image) {
    body.image_b64 = null;
    body.strength = Number($('strength').value);
    if (state.maskPainted) body.mask = null;
  }
  return body;
}

// A flat object as JSON, with the values of `raw`'s keys inserted verbatim and every other
// value passed through `escape` (for the shell's single quotes).
function toJson(body, raw, pretty = false, escape = (s) => s) {
  const parts = Object.entries(body).map(
    ([key, value]) => `"${key}":${pretty ? ' ' : ''}${key in raw ? raw[key] : escape(JSON.stringify(value))}`,
  );
  return pretty ? `{\n  ${parts.join(',\n  ')}\n}` : `{${parts.join(',')}}`;
}

// A seed as a JSON number: digits pass as they are, anything else as a string the server
// will refuse with a message.
const seedJson = (seed) => (/^\d{1,20}$/.test(seed) ? seed : JSON.stringify(seed));

// A random seed below 2^53, so that any client's JSON parser keeps it exact.
function randomSeed() {
  const [high, low] = crypto.getRandomValues(new Uint32Array(2));
  return ((BigInt(high & 0x1fffff) << 32n) | BigInt(low)).toString();
}

// ---- curl ---------------------------------------------------------------------------

const shellQuote = (s) => `'${s.replace(/'/g, `'\\''`)}'`;

function renderCurl(body, seed) {
  const raw = {};
  if (seed != null) raw.seed = seedJson(seed);
  if (state.image) raw.image_b64 = `"'"$(base64 -w0 ${shellQuote(state.image.name)})"'"`;
  // od prints the bytes as decimals; tr and sed turn them into a comma-separated list
  if (state.maskPainted) raw.mask = `['"$(od -An -v -tu1 mask.png | tr -s ' \\n' ',' | sed 's/^,//;s/,$//')"']`;
  const json = toJson(body, raw, true, (s) => s.replace(/'/g, `'\\''`));
  const lines = [`curl -sS ${shellQuote(location.origin + CLASSIC_ROUTE)}`];
  // the token stays out of the page's text (and screenshots): the command reads it from the shell
  if ($('token').value) lines.push(`-H "Authorization: Bearer $SDXL_TOKEN"`);
  lines.push(`-H 'Content-Type: application/json'`, `-d '${json}'`, '-o out.png');
  $('curl').textContent = lines.join(' \\\n  ');

  const notes = [];
  if ($('token').value) notes.push('Set SDXL_TOKEN to your token first.');
  if (state.image) {
    notes.push(
      `The input image${state.maskPainted ? ' and mask are' : ' is'} read from files next to the command ` +
        `(${state.image.name}${state.maskPainted ? ', and mask.png: save it with the link under the mask' : ''}) ` +
        'rather than inlined; base64 -w0 is GNU coreutils.',
    );
  }
  $('curl-note').textContent = notes.join(' ');
  $('curl-note').hidden = notes.length === 0;
}

// The form's request as it stands: with "random" on, the seed is left to the server.
function updateCurl() {
  const random = $('seed-random').checked;
  renderCurl(buildBody(!random), random ? null : $('seed').value);
}

// ---- form controls ------------------------------------------------------------------

function onSizeChange() {
  const custom = $('size').value === 'custom';
  for (const label of document.querySelectorAll('.custom-size')) label.hidden = !custom;
  // disabled inputs skip validation, so hidden out-of-range values cannot block Generate
  $('width').disabled = $('height').disabled = !custom;
}

function onSeedRandomChange() {
  const random = $('seed-random').checked;
  $('seed').disabled = random;
  $('seed').required = !random;
}

function checkSeed() {
  const seed = $('seed');
  const tooLarge = /^\d+$/.test(seed.value) && BigInt(seed.value) > MAX_SEED;
  seed.setCustomValidity(tooLarge ? 'The seed must be at most 18446744073709551615.' : '');
}

function reuseSeed() {
  if (state.lastSeed == null) return;
  $('seed-random').checked = false;
  onSeedRandomChange();
  $('seed').value = state.lastSeed;
  checkSeed();
  updateCurl();
}

// ---- input image and mask ----------------------------------------------------------

async function loadImage(file) {
  clearImage();
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = $('source-image');
  img.src = url;
  try {
    await img.decode();
  } catch {
    URL.revokeObjectURL(url);
    showError(`Cannot read ${file.name} as an image.`);
    $('image-file').value = '';
    return;
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  const { naturalWidth: width, naturalHeight: height } = img;
  state.image = { name: file.name, base64: bytesToBase64(bytes), width, height, url };

  // the mask is drawn at the image's natural size, whatever size the canvas is shown at
  canvas.width = width;
  canvas.height = height;
  clearMask();

  // the server sizes the output from the image when width and height are absent, clamped
  // into the accepted range
  const option = new Option(`image (${clampSide(width)} × ${clampSide(height)})`, 'image');
  $('size').add(option, 0);
  $('size').value = 'image';
  onSizeChange();
  $('image-tools').hidden = false;
  $('image-clear').hidden = false;
  updateCurl();
}

function clearImage() {
  if (state.image) URL.revokeObjectURL(state.image.url);
  state.image = null;
  state.maskPainted = false;
  $('source-image').removeAttribute('src');
  $('image-tools').hidden = true;
  $('image-clear').hidden = true;
  const option = $('size').querySelector('option[value="image"]');
  if (option) {
    option.remove();
    if (!$('size').value || $('size').selectedIndex < 0) $('size').value = '1024x1024';
  }
  onSizeChange();
  updateCurl();
}

function clearMask() {
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  state.maskPainted = false;
  $('mask-download').hidden = true;
  updateCurl();
}

// Pointer position in the canvas's own pixels; `scale` converts the brush's on-screen size.
function canvasPoint(event) {
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * (canvas.height / rect.height), scale };
}

let lastPoint = null;

function paint(from, to) {
  const width = Number($('brush-size').value) * to.scale;
  ctx.fillStyle = ctx.strokeStyle = '#fff';
  ctx.lineWidth = width;
  ctx.lineCap = ctx.lineJoin = 'round';
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
  // a click without movement still leaves a dot
  ctx.beginPath();
  ctx.arc(to.x, to.y, width / 2, 0, 2 * Math.PI);
  ctx.fill();
}

function onPointerDown(event) {
  if (event.button !== 0) return;
  canvas.setPointerCapture(event.pointerId);
  lastPoint = canvasPoint(event);
  paint(lastPoint, lastPoint);
}

function onPointerMove(event) {
  if (!lastPoint) return;
  const point = canvasPoint(event);
  paint(lastPoint, point);
  lastPoint = point;
}

async function onPointerUp() {
  if (!lastPoint) return;
  lastPoint = null;
  state.maskPainted = true;
  updateCurl();
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = URL.createObjectURL(await maskBlob());
  $('mask-download').href = state.maskUrl;
  $('mask-download').hidden = false;
}

const maskBlob = () => new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));

function bytesToBase64(bytes) {
  let binary = '';
  // in chunks: spreading megabytes into one call overflows the argument stack
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function base64ToBlob(base64, type) {
  return new Blob([Uint8Array.from(atob(base64), (c) => c.charCodeAt(0))], { type });
}

// ---- running ------------------------------------------------------------------------

// Server-Sent Events from a fetch() body (EventSource cannot POST). Yields { event, data }
// per event; lines may end in LF or CRLF.
async function* readEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = '';
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      // search only the new text for line ends: an image line arrives in many chunks
      let from = buffer.length;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n', from)) >= 0) {
        const line = buffer.slice(0, buffer[end - 1] === '\r' ? end - 1 : end);
        buffer = buffer.slice(end + 1);
        from = 0;
        if (line === '') {
          if (data.length) yield { event: event || 'message', data: data.join('\n') };
          event = '';
          data = [];
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') event = text;
          else if (field === 'data') data.push(text);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// The message of the Workers AI error envelope, or the best the response allows.
function envelopeMessage(envelope) {
  const errors = envelope && Array.isArray(envelope.errors) ? envelope.errors : [];
  return errors.map((e) => e.message).filter(Boolean).join('; ') || 'unknown error';
}

async function responseError(response) {
  const text = await response.text();
  let message;
  try {
    message = envelopeMessage(JSON.parse(text));
  } catch {
    message = text.trim() || 'no details';
  }
  return `${response.status}${response.statusText ? ` ${response.statusText}` : ''}: ${message}`;
}

const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = false;
}

function setRunning(running) {
  $('generate').disabled = running;
  $('cancel').disabled = !running;
  form.classList.toggle('running', running);
}

function onQueued({ position }) {
  $('queue-text').textContent = position === 0 ? 'Queued: next up' : `Queued: ${position} ahead`;
  $('queue-text').hidden = false;
  $('progress-text').textContent = 'Waiting in the queue…';
}

function onStep({ step, total, elapsed_ms, eta_ms, preview }) {
  $('queue-text').hidden = true;
  $('progress').max = total;
  $('progress').value = step;
  $('progress-text').textContent = `step ${step}/${total} · ${seconds(elapsed_ms)} elapsed · ETA ${seconds(eta_ms)}`;
  if (preview) {
    $('preview').src = `data:image/png;base64,${preview}`;
    $('preview').hidden = false;
    $('result').hidden = true;
  }
  window.sdxlProgressLog.push({ step, total });
}

async function onImage({ image, seed, queue_time_ms, inference_time_ms }) {
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(base64ToBlob(image, 'image/png'));
  const result = $('result');
  result.src = state.resultUrl;
  await result.decode().catch(() => {});
  result.hidden = false;
  $('preview').hidden = true;
  $('download').href = state.resultUrl;
  $('download').download = `sdxl-${seed}.png`;
  $('result-meta').textContent =
    `seed ${seed} · queued ${seconds(queue_time_ms)} · generated in ${seconds(inference_time_ms)}`;
  $('result-info').hidden = false;
  $('progress').value = $('progress').max;
  $('progress-text').textContent = `Done in ${seconds(queue_time_ms + inference_time_ms)}`;
  state.lastSeed = String(seed);
  $('seed-reuse').disabled = false;
}

async function generate(event) {
  event.preventDefault();
  if (state.controller || !form.reportValidity()) return;
  $('error').hidden = true;

  // a random seed is picked here and sent, so the result can be reproduced
  if ($('seed-random').checked) $('seed').value = randomSeed();
  const seed = $('seed').value;
  const body = buildBody(true);
  const raw = { seed: seedJson(seed) };
  if (state.image) raw.image_b64 = JSON.stringify(state.image.base64);
  if (state.maskPainted) raw.mask = `[${new Uint8Array(await (await maskBlob()).arrayBuffer()).join(',')}]`;
  renderCurl(body, seed);

  // the preview is 1/8 of the image: show it at the size the image will have
  const size = requestedSize();
  const width = size ? size.width : clampSide(state.image.width);
  $('preview').style.width = `${width}px`;

  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  window.sdxlProgressLog = [];
  $('progress').value = 0;
  $('progress-text').textContent = 'Sending…';
  $('queue-text').hidden = true;

  const headers = { 'Content-Type': 'application/json' };
  if ($('token').value) headers.Authorization = `Bearer ${$('token').value}`;
  try {
    const response = await fetch(STREAM_ROUTE, {
      method: 'POST',
      headers,
      body: toJson(body, raw),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await responseError(response));
    let done = false;
    for await (const { event: name, data } of readEvents(response.body)) {
      if (name === 'queued') onQueued(JSON.parse(data));
      else if (name === 'step') onStep(JSON.parse(data));
      else if (name === 'error') throw new Error(envelopeMessage(JSON.parse(data)));
      else if (name === 'image') {
        await onImage(JSON.parse(data));
        done = true;
        break;
      }
    }
    if (!done) throw new Error('The stream ended before the image arrived.');
  } catch (error) {
    if (controller.signal.aborted) {
      $('progress-text').textContent = 'Cancelled';
    } else {
      $('progress-text').textContent = 'Failed';
      // fetch's own network failure says just "Failed to fetch"
      showError(error instanceof TypeError ? `Request failed: ${error.message}` : error.message);
    }
  } finally {
    $('queue-text').hidden = true;
    state.controller = null;
    setRunning(false);
  }
}

// ---- wiring -------------------------------------------------------------------------

form.addEventListener('submit', generate);
form.addEventListener('input', updateCurl);
form.addEventListener('change', updateCurl);
$('token').addEventListener('input', saveToken);
$('size').addEventListener('change', onSizeChange);
$('seed-random').addEventListener('change', onSeedRandomChange);
$('seed').addEventListener('input', checkSeed);
$('seed-reuse').addEventListener('click', reuseSeed);
$('cancel').addEventListener('click', () => state.controller && state.controller.abort());
$('image-file').addEventListener('change', (e) => loadImage(e.target.files[0]));
$('image-clear').addEventListener('click', () => {
  $('image-file').value = '';
  clearImage();
});
$('mask-clear').addEventListener('click', clearMask);
$('strength').addEventListener('input', () => ($('strength-value').value = $('strength').value));
$('brush-size').addEventListener('input', () => ($('brush-value').value = $('brush-size').value));
canvas.addEventListener('pointerdown', onPointerDown);
canvas.addEventListener('pointermove', onPointerMove);
canvas.addEventListener('pointerup', onPointerUp);
canvas.addEventListener('pointercancel', onPointerUp);

loadToken();
onSizeChange();
onSeedRandomChange();
updateCurl();
