// End-to-end test of the playground page (served at `/`) in headless Chromium against a
// running `sdxl serve`. run.sh starts the server; this reads:
//   SDXL_URL     the server's base URL (http://127.0.0.1:PORT)
//   SDXL_TOKEN   an API key it accepts
//   ARTIFACTS    where screenshots go (default target/browser-artifacts)
//   CHROMIUM     the browser binary (default /usr/bin/chromium)
// Prints one PASS/FAIL line per check and a summary; exits 1 on any failure.
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.SDXL_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const TOKEN = process.env.SDXL_TOKEN || '';
const ARTIFACTS = process.env.ARTIFACTS || 'target/browser-artifacts';
// a debug build of the tiny model on a slow CPU: one run may take a while
const RUN_TIMEOUT = Number(process.env.RUN_TIMEOUT_MS || 300_000);
const STEPS = 8;
const CLASSIC_ROUTE = '/ai/run/@cf/bytedance/stable-diffusion-xl-lightning';
const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

const results = [];

async function check(name, fn) {
  const started = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`PASS ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  } catch (error) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name}: ${error.stack || error}`);
  }
}

// Installs observers that record what the page renders: every distinct progress value, and
// whether Generate was ever disabled (a fast failure can re-enable it before a poll sees it).
function instrument(page) {
  return page.evaluate(() => {
    window.testProgressValues = [];
    window.testGenerateDisabled = false;
    const progress = document.getElementById('progress');
    const generate = document.getElementById('generate');
    new MutationObserver(() => {
      const values = window.testProgressValues;
      if (values[values.length - 1] !== progress.value) values.push(progress.value);
    }).observe(progress, { attributes: true, attributeFilter: ['value'] });
    new MutationObserver(() => {
      if (generate.disabled) window.testGenerateDisabled = true;
    }).observe(generate, { attributes: true, attributeFilter: ['disabled'] });
  });
}

// Clicks Generate and waits for the run to end; returns how it ended.
async function generate(page) {
  await page.evaluate(() => {
    window.testGenerateDisabled = false;
    document.getElementById('progress-text').textContent = '';
  });
  await page.click('#generate');
  await page.waitForFunction(
    () =>
      /^(Done|Failed|Cancelled)/.test(document.getElementById('progress-text').textContent) &&
      !document.getElementById('generate').disabled,
    null,
    { timeout: RUN_TIMEOUT, polling: 100 },
  );
  return page.evaluate(() => ({
    status: document.getElementById('progress-text').textContent,
    error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
    generateWasDisabled: window.testGenerateDisabled,
  }));
}

// The result image as the page shows it.
const resultImage = (page) =>
  page.evaluate(() => {
    const img = document.getElementById('result');
    return { hidden: img.hidden, src: img.src, width: img.naturalWidth, height: img.naturalHeight };
  });

function pngSize(bytes) {
  assert.deepEqual([...bytes.subarray(0, 8)], PNG_SIGNATURE, 'not a PNG');
  const view = Buffer.from(bytes);
  return { width: view.readUInt32BE(16), height: view.readUInt32BE(20) };
}

async function main() {
  await fs.mkdir(ARTIFACTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sdxl-playground-'));
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    page.setDefaultTimeout(30_000);
    const pageErrors = [];
    const foreignRequests = [];
    const streamRequests = [];
    page.on('pageerror', (error) => pageErrors.push(String(error)));
    page.on('request', (request) => {
      const url = request.url();
      if (!/^(data|blob):/.test(url) && new URL(url).origin !== new URL(BASE).origin) foreignRequests.push(url);
      if (url.endsWith('/v1/run/stream')) streamRequests.push(request);
    });
    const lastStreamBody = () => streamRequests[streamRequests.length - 1].postDataJSON();
    let firstResult = null;

    await check('page loads without auth', async () => {
      const response = await page.goto(`${BASE}/`);
      assert.equal(response.status(), 200);
      assert.match(response.headers()['content-type'] || '', /^text\/html/);
      await page.waitForSelector('#generate');
      await instrument(page);
    });

    await check('text to image: progress, preview, result, download, curl', async () => {
      await page.fill('#token', TOKEN);
      await page.fill('#prompt', 'a red fox in the snow');
      await page.selectOption('#size', '256x256');
      await page.fill('#steps', String(STEPS));
      await page.uncheck('#seed-random');
      await page.fill('#seed', '42');

      const run = await generate(page);
      assert.equal(run.error, null, `the page shows an error: ${run.error}`);
      assert.ok(run.generateWasDisabled, 'Generate was not disabled while running');

      const body = lastStreamBody();
      assert.equal(body.prompt, 'a red fox in the snow');
      assert.deepEqual([body.width, body.height, body.num_steps, body.seed], [256, 256, STEPS, 42]);

      const { log, values, preview } = await page.evaluate(() => ({
        log: window.sdxlProgressLog,
        values: window.testProgressValues,
        preview: document.getElementById('preview').getAttribute('src') || '',
      }));
      const expected = Array.from({ length: STEPS }, (_, i) => ({ step: i + 1, total: STEPS }));
      assert.deepEqual(log, expected, 'the steps rendered');
      assert.ok(new Set(values).size > 2, `the progress bar went through too few values: ${values}`);
      assert.ok(values.every((v, i) => i === 0 || v >= values[i - 1]), `progress went back: ${values}`);
      assert.match(preview, /^data:image\/png;base64,./, 'no preview image');

      const result = await resultImage(page);
      assert.equal(result.hidden, false, 'the result is hidden');
      assert.deepEqual([result.width, result.height], [256, 256]);

      const download = await page.$eval('#download', (a) => ({ href: a.href, name: a.getAttribute('download') }));
      assert.ok(download.href, 'the download link has no href');
      assert.equal(download.name, 'sdxl-42.png');
      // the link's target is the PNG itself; keep it as the inpainting input
      const bytes = await page.evaluate(async (href) => [...new Uint8Array(await (await fetch(href)).arrayBuffer())], download.href);
      assert.deepEqual(pngSize(Uint8Array.from(bytes)), { width: 256, height: 256 });
      firstResult = path.join(tmp, 'fox.png');
      await fs.writeFile(firstResult, Uint8Array.from(bytes));

      const curl = await page.textContent('#curl');
      assert.ok(curl.includes(`${BASE}${CLASSIC_ROUTE}`), `curl lacks the route:\n${curl}`);
      assert.ok(curl.includes('"seed": 42'), `curl lacks the seed:\n${curl}`);
      assert.ok(curl.includes('Authorization: Bearer'), `curl lacks the token header:\n${curl}`);
      if (TOKEN) assert.ok(!curl.includes(TOKEN), 'curl shows the token itself');

      await page.screenshot({ path: path.join(ARTIFACTS, 'playground.png'), fullPage: true });
    });

    await check('seeds above 2^53 survive the round trip; reuse', async () => {
      const big = '18446744073709551615'; // 2^64 - 1: a JavaScript number would round it
      await page.fill('#seed', big);
      await page.fill('#steps', '1');
      const run = await generate(page);
      await page.fill('#steps', String(STEPS));
      assert.equal(run.error, null, `the page shows an error: ${run.error}`);
      assert.equal(await page.getAttribute('#download', 'download'), `sdxl-${big}.png`);
      assert.ok((await page.textContent('#curl')).includes(`"seed": ${big}`), 'the curl seed');
      await page.check('#seed-random');
      await page.click('#seed-reuse');
      assert.equal(await page.isChecked('#seed-random'), false);
      assert.equal(await page.inputValue('#seed'), big);
      await page.fill('#seed', '42');
    });

    await check('queue position while another job runs', async () => {
      // a job from outside the page holds the worker until it is aborted
      const blocker = new AbortController();
      const response = await fetch(`${BASE}/v1/run/stream`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: 'blocker', width: 256, height: 256, num_steps: 20, seed: 1 }),
        signal: blocker.signal,
      });
      assert.equal(response.status, 200);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let text = '';
      while (!text.includes('event: step')) {
        const { value, done } = await reader.read();
        assert.ok(!done, 'the blocking job ended before its first step');
        text += value;
      }
      try {
        await page.evaluate(() => (document.getElementById('progress-text').textContent = ''));
        await page.click('#generate');
        await page.waitForFunction(() => !document.getElementById('queue-text').hidden, null, { timeout: RUN_TIMEOUT });
        assert.match(await page.textContent('#queue-text'), /^Queued: (next up|\d+ ahead)$/);
      } finally {
        blocker.abort(); // closing the stream cancels the job on the server
      }
      await page.waitForFunction(() => /^(Done|Failed)/.test(document.getElementById('progress-text').textContent), null, {
        timeout: RUN_TIMEOUT,
      });
      assert.equal(await page.isHidden('#error'), true, await page.textContent('#error'));
      assert.equal(await page.isHidden('#queue-text'), true, 'the queue text stays after the run');
    });

    await check('cancel stops a run', async () => {
      await page.evaluate(() => (document.getElementById('progress-text').textContent = ''));
      await page.click('#generate');
      // cancel once the job is running (or queued), not before the request left
      await page.waitForFunction(() => window.sdxlProgressLog.length > 0 || !document.getElementById('queue-text').hidden, null, {
        timeout: RUN_TIMEOUT,
        polling: 50,
      });
      await page.click('#cancel');
      await page.waitForFunction(() => !document.getElementById('generate').disabled, null, { timeout: 10_000 });
      assert.equal(await page.textContent('#progress-text'), 'Cancelled');
      assert.equal(await page.isHidden('#error'), true, 'cancelling showed an error');
    });

    await check('inpainting: upload, paint a mask, generate', async () => {
      assert.ok(firstResult, 'no image from the first run to start from');
      const before = await resultImage(page);
      await page.setInputFiles('#image-file', firstResult);
      await page.waitForFunction(() => document.getElementById('mask-canvas').width === 256);
      assert.equal(await page.inputValue('#size'), 'image', 'the size does not follow the image');
      await page.fill('#strength', '0.75');

      const mask = page.locator('#mask-canvas');
      await mask.scrollIntoViewIfNeeded(); // the mouse only reaches what is in the viewport
      const box = await mask.boundingBox();
      await page.mouse.move(box.x + box.width * 0.25, box.y + box.height * 0.3);
      await page.mouse.down();
      await page.mouse.move(box.x + box.width * 0.75, box.y + box.height * 0.6, { steps: 12 });
      await page.mouse.up();
      const painted = await page.evaluate(() => {
        const canvas = document.getElementById('mask-canvas');
        const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
        let white = 0;
        for (let i = 0; i < data.length; i += 4) if (data[i] === 255) white++;
        return white / (data.length / 4);
      });
      assert.ok(painted > 0.01 && painted < 0.9, `the stroke painted ${painted} of the mask`);

      const run = await generate(page);
      assert.equal(run.error, null, `the page shows an error: ${run.error}`);

      const body = lastStreamBody();
      assert.ok(typeof body.image_b64 === 'string' && body.image_b64.length > 100, 'no image_b64 sent');
      assert.ok(Array.isArray(body.mask) && body.mask.length > 0, 'no mask sent');
      assert.ok(body.mask.every((b) => Number.isInteger(b) && b >= 0 && b <= 255), 'the mask is not bytes');
      assert.deepEqual(pngSize(Uint8Array.from(body.mask)), { width: 256, height: 256 }, 'the mask size');
      assert.equal(body.strength, 0.75);
      assert.equal(body.width, undefined, 'width sent although the image gives the size');

      const after = await resultImage(page);
      assert.equal(after.hidden, false);
      assert.notEqual(after.src, before.src, 'the result did not change');
      assert.deepEqual([after.width, after.height], [256, 256]);
      const log = await page.evaluate(() => window.sdxlProgressLog);
      assert.ok(log.length > 0 && log[log.length - 1].step === log[log.length - 1].total, 'steps incomplete');

      const curl = await page.textContent('#curl');
      assert.ok(curl.includes('base64 -w0') && curl.includes('mask.png'), `curl does not read the files:\n${curl}`);

      await page.screenshot({ path: path.join(ARTIFACTS, 'inpaint.png'), fullPage: true });
    });

    await check('a wrong token shows the 401 message', async () => {
      // the message the server gives, so the check does not hard-code its wording
      const response = await fetch(`${BASE}/v1/run/stream`, {
        method: 'POST',
        headers: { Authorization: 'Bearer wrong-token', 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: 'x' }),
      });
      assert.equal(response.status, 401);
      const message = (await response.json()).errors[0].message;

      await page.fill('#token', 'wrong-token');
      const run = await generate(page);
      assert.ok(run.error, 'no error shown');
      assert.ok(run.error.includes('401') && run.error.includes(message), `the error shown: ${run.error}`);
      assert.equal(await page.isVisible('#error'), true);
      await page.screenshot({ path: path.join(ARTIFACTS, 'auth-error.png'), fullPage: true });
    });

    await check('no script errors, no requests off the origin', async () => {
      assert.deepEqual(pageErrors, []);
      assert.deepEqual(foreignRequests, []);
    });
  } finally {
    await browser.close();
    await fs.rm(tmp, { recursive: true, force: true });
  }
}

try {
  await main();
} catch (error) {
  results.push({ name: 'setup', ok: false });
  console.log(`FAIL setup: ${error.stack || error}`);
}
const failed = results.filter((r) => !r.ok);
console.log(`\n${failed.length ? 'FAIL' : 'PASS'}: ${results.length - failed.length}/${results.length} checks passed` +
  (failed.length ? ` (failed: ${failed.map((r) => r.name).join('; ')})` : ''));
process.exitCode = failed.length ? 1 : 0;
