"""The clients people run against image servers, unmodified and pinned (requirements.txt),
against `sdxl serve` on the tiny model with an API key: the OpenAI SDK, webuiapi, the
Cloudflare SDK, and the request sequences of Open WebUI, SillyTavern and LibreChat (read from
their source, docs/clients.md) replayed over HTTP with Basic auth.

The tiny model is loaded with its UNet under ByteDance's 4-step Lightning file name, so the
defaults must be 4 steps at guidance 0.

Usage: test_clients.py SDXL_BINARY; prints one PASS/FAIL line per check, exits 1 on a failure."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cloudflare
import openai
import webuiapi
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "crates/sdxl-models/tests/fixtures/tiny-sdxl"
KEY = "client-key-0123456789"
MODEL_ID = "@cf/bytedance/stable-diffusion-xl-lightning"
LIGHTNING_UNET = "sdxl_lightning_4step_unet"
SMALL = {"width": 256, "height": 256}

failures = []


def check(what, passed, **detail):
    mark = "PASS" if passed else "FAIL"
    extra = ", ".join(f"{k}={v!r:.200}" for k, v in detail.items())
    print(f"[{mark}] clients: {what}" + (f" ({extra})" if extra else ""), flush=True)
    if not passed:
        failures.append(what)


def attempt(what, function):
    """Runs one check function; an exception is a failure of that check, not of the run."""
    try:
        function()
    except Exception as e:  # noqa: BLE001 - any client error fails the check and is shown
        check(what, False, error=f"{type(e).__name__}: {e}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, work):
        unet = work / f"{LIGHTNING_UNET}.safetensors"
        unet.symlink_to(TINY / "unet" / "diffusion_pytorch_model.safetensors")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "serve", "--model", TINY, "--unet", unet, "--api-key", KEY, "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", work / "data"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text()}")
            try:
                if urllib.request.urlopen(f"{self.url}/ready", timeout=5).status == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server was not ready within 120 s")
            time.sleep(0.2)

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


def basic(password=KEY, user="webui"):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def call(server, method, path, body=None, auth=None, raw=None, content_type="application/json"):
    """(status, parsed JSON or bytes) of one request, as the replayed clients send it."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"{server.url}{path}", data=data, method=method)
    request.add_header("Authorization", auth or basic())
    if data is not None and content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status, payload, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(payload) if "json" in kind else payload)


def parameters_of(png):
    """The generation parameters in a PNG's text chunk."""
    return Image.open(io.BytesIO(png)).info.get("parameters", "")


def png_file(width=256, height=256, color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def alpha_mask(width=256, height=256):
    """Transparent (edit) left half, opaque right half."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


# --- defaults that follow the model -------------------------------------------------------

def lightning_defaults(server, client):
    status, png = call(server, "POST", f"/ai/run/{MODEL_ID}", {"prompt": "cyberpunk cat"}, auth=f"Bearer {KEY}")
    text = parameters_of(png) if status == 200 else ""
    check("run route without steps or guidance: 4 steps at guidance 0 (Lightning UNet)",
          status == 200 and "Steps: 4," in text and "CFG scale: 0," in text, status=status, parameters=text)
    result = client.images.generate(prompt="cyberpunk cat")
    text = parameters_of(base64.b64decode(result.data[0].b64_json))
    check("OpenAI images.generate without extras: 4 steps at guidance 0, the native 1024²",
          "Steps: 4," in text and "CFG scale: 0," in text and "Size: 1024x1024" in text, parameters=text)
    schema = json.loads(urllib.request.urlopen(f"{server.url}/openapi.json").read())
    steps = schema["components"]["schemas"]["RunRequest"]["properties"]["num_steps"]["default"]
    guidance = schema["components"]["schemas"]["RunRequest"]["properties"]["guidance"]["default"]
    check("/openapi.json shows the defaults in force", (steps, guidance) == (4, 0.0), steps=steps, guidance=guidance)


# --- the OpenAI SDK ----------------------------------------------------------------------

def openai_sdk(server, client):
    result = client.images.generate(prompt="a lighthouse", size="256x256", n=2, extra_body={"seed": 5})
    sizes = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in result.data]
    check("images.generate n=2 at 256x256", sizes == [(256, 256)] * 2, sizes=sizes)
    seeds = [parameters_of(base64.b64decode(d.b64_json)).split("Seed: ")[1].split(",")[0] for d in result.data]
    check("image i uses seed + i", seeds == ["5", "6"], seeds=seeds)

    result = client.images.generate(prompt="a lighthouse", size="auto", response_format="url")
    url = result.data[0].url
    with urllib.request.urlopen(url) as response:  # no key: the link is the credential
        fetched, kind = response.read(), response.headers["content-type"]
    check("response_format url: a link on this server that serves the PNG without a key",
          url.startswith(server.url + "/v1/images/files/") and kind == "image/png" and fetched[:4] == b"\x89PNG",
          url=url, kind=kind)
    try:
        urllib.request.urlopen(url.replace("img_", "img_0"))
        check("a wrong link is a 404", False)
    except urllib.error.HTTPError as e:
        check("a wrong link is a 404", e.code == 404, status=e.code)

    result = client.images.generate(prompt="a lighthouse", size="256x256", output_format="jpeg",
                                    output_compression=80)
    jpeg = base64.b64decode(result.data[0].b64_json)
    check("output_format jpeg", jpeg[:3] == b"\xff\xd8\xff" and result.output_format == "jpeg",
          head=jpeg[:4], output_format=result.output_format)
    result = client.images.generate(prompt="a lighthouse", size="256x256", output_format="webp")
    webp = base64.b64decode(result.data[0].b64_json)
    check("output_format webp", webp[:4] == b"RIFF" and webp[8:12] == b"WEBP", head=webp[:12])

    image = png_file()
    result = client.images.edit(image=("in.png", image, "image/png"), prompt="a blue square")
    edited = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    text = edited.info.get("parameters", "")
    check("images.edit without a mask: img2img at the input's size", edited.size == (256, 256)
          and "Denoising strength: 0.75" in text, size=edited.size, parameters=text)
    result = client.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", alpha_mask(), "image/png"),
                                prompt="a blue square", size="256x256", n=1)
    text = parameters_of(base64.b64decode(result.data[0].b64_json))
    check("images.edit with an alpha mask: inpainting (strength 1)", "Denoising strength: 1" in text, parameters=text)
    try:
        client.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", alpha_mask(128, 128), "image/png"),
                           prompt="x")
        check("a mask of another size is a 400", False)
    except openai.BadRequestError as e:
        check("a mask of another size is a 400", e.status_code == 400 and "mask" in str(e), error=str(e))
    try:
        client.images.generate(prompt="x", size="4096x4096")
        check("out of bounds: 400 in OpenAI's shape naming the field", False)
    except openai.BadRequestError as e:
        check("out of bounds: 400 in OpenAI's shape naming the field",
              e.status_code == 400 and e.param == "width" and "2048" in str(e.body), error=str(e.body))

    models = client.models.list()
    ids = [m.id for m in models.data]
    model = client.models.retrieve(ids[0]) if ids else None
    check("models.list and models.retrieve", ids == [LIGHTNING_UNET] and model.id == LIGHTNING_UNET, ids=ids)
    try:
        client.models.retrieve("dall-e-3")
        check("an unknown model is a 404", False)
    except openai.NotFoundError:
        check("an unknown model is a 404", True)


# --- webuiapi ------------------------------------------------------------------------------

def webui(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="webui", password=KEY)
    first = api.txt2img(prompt="a red fox", seed=42, steps=3, cfg_scale=2, **SMALL)
    second = api.txt2img(prompt="a red fox", seed=42, steps=3, cfg_scale=2, **SMALL)
    same = first.image.tobytes() == second.image.tobytes()
    check("webuiapi txt2img seeded: reproducible, info parsed with the seed",
          same and first.info["seed"] == 42 and first.info["all_seeds"] == [42] and first.image.size == (256, 256),
          info_seed=first.info.get("seed"))
    check("the sampler it asks for by default (Euler a) runs, with nothing falling back",
          first.info["sampler_name"] == "Euler a" and "Sampler" not in first.info["extra_generation_params"],
          info=first.info.get("sampler_name"), extra=first.info["extra_generation_params"])
    check("the PNG carries the parameters text", "Seed: 42" in first.image.info.get("parameters", ""))
    random = api.txt2img(prompt="a red fox", steps=1, batch_size=2, **SMALL)
    seeds = random.info["all_seeds"]
    check("seed -1: random, batch seeds consecutive", len(random.images) == 2 and seeds[1] == seeds[0] + 1,
          seeds=seeds)

    source = Image.new("RGB", (256, 256), (20, 120, 220))
    result = api.img2img(images=[source], prompt="a wave", denoising_strength=0.5, steps=4, seed=3, **SMALL)
    check("webuiapi img2img", result.image.size == (256, 256) and result.info["denoising_strength"] == 0.5,
          info=result.info.get("denoising_strength"))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    result = api.img2img(images=[source], mask_image=mask, prompt="a wave", denoising_strength=1.0, steps=2,
                         seed=3, **SMALL)
    inverted = api.img2img(images=[source], mask_image=mask, inpainting_mask_invert=1, prompt="a wave",
                           denoising_strength=1.0, steps=2, seed=3, **SMALL)
    check("webuiapi img2img with a mask (and inverted)",
          result.image.size == (256, 256) and result.image.tobytes() != inverted.image.tobytes())

    samplers = api.util_get_sampler_names()
    # webuiapi sorts the names; the server's own order (Euler first) is checked on the raw list.
    check("samplers: every one listed",
          samplers == sorted(["Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"]),
          samplers=samplers)
    schedulers = api.util_get_scheduler_names()
    check("schedulers: automatic first, then karras and sgm_uniform",
          schedulers == ["automatic", "karras", "sgm_uniform"], schedulers=schedulers)
    karras = api.txt2img(prompt="a red fox", seed=42, steps=3, cfg_scale=2, sampler_name="DPM++ 2M SDE",
                         scheduler="Karras", **SMALL)
    check("sampler_name and scheduler run and are in the infotext",
          karras.info["sampler_name"] == "DPM++ 2M SDE"
          and "Sampler: DPM++ 2M SDE, Schedule type: Karras" in karras.image.info.get("parameters", ""),
          info=karras.info.get("sampler_name"))
    names = api.util_get_model_names()
    check("sd-models: the loaded model", names == [LIGHTNING_UNET], names=names)
    api.util_set_model(LIGHTNING_UNET)
    check("util_set_model to the loaded model; util_get_current_model",
          api.util_get_current_model() == LIGHTNING_UNET)
    # webuiapi answers the body whatever the status; the status is read by hand
    answer = api.set_options({"sd_model_checkpoint": "sd_xl_refiner_1.0"})
    status, _ = call(server, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "sd_xl_refiner_1.0"})
    check("set_options naming an unknown model is a 422 naming the option",
          status == 422 and "sd_model_checkpoint" in answer["errors"], status=status, answer=answer)
    idle = api.get_progress()
    check("progress when idle: 0 and no job", idle["progress"] == 0 and idle["state"]["job_count"] == 0, progress=idle)

    # a long request in a thread; progress shows it, interrupt stops it
    answer = {}

    def long_job():
        try:
            answer["result"] = api.txt2img(prompt="a long one", steps=150, seed=9, width=512, height=512)
        except Exception as e:  # noqa: BLE001
            answer["error"] = e

    thread = threading.Thread(target=long_job)
    started = time.monotonic()
    thread.start()
    seen = None
    while time.monotonic() - started < 60 and thread.is_alive():
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2:
            seen = progress
            break
        time.sleep(0.05)
    check("progress while it runs: steps, a fraction, the preview",
          seen is not None and 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150
          and seen["state"]["job_count"] == 1 and seen["current_image"] is not None,
          progress={k: v for k, v in (seen or {}).items() if k != "current_image"})
    api.interrupt()
    thread.join(30)
    result = answer.get("result")
    check("interrupt stops it: the request answers at once with what it had",
          not thread.is_alive() and result is not None and result.info["extra_generation_params"].get("Interrupted")
          and result.image.size == (512, 512), error=answer.get("error"))
    check("and progress is idle again", api.get_progress()["state"]["job_count"] == 0)

    wrong = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="webui", password="not-the-key")
    try:
        wrong.txt2img(prompt="x", steps=1, **SMALL)
        check("a wrong Basic password is a 401", False)
    except RuntimeError as e:
        check("a wrong Basic password is a 401", e.args[0] == 401, status=e.args[0])


def cloudflare_sdk(server):
    client = cloudflare.Cloudflare(api_token=KEY, base_url=f"{server.url}/client/v4")
    response = client.ai.with_raw_response.run(MODEL_ID, account_id="abc", prompt="a bridge", num_steps=2,
                                                **SMALL)
    png = response.http_response.content
    check("Cloudflare SDK ai.with_raw_response.run: the PNG", response.http_response.status_code == 200
          and png[:4] == b"\x89PNG" and "Steps: 2," in parameters_of(png))


# --- replayed request sequences ------------------------------------------------------------

def open_webui(server):
    """backend/open_webui/routers/images.py: settings verify, then one image (A1111 engine);
    the OpenAI engine's generation."""
    status, models = call(server, "GET", "/sdapi/v1/sd-models")
    title = models[0]["title"] if status == 200 else None
    status, options = call(server, "GET", "/sdapi/v1/options")
    posted, _ = call(server, "POST", "/sdapi/v1/options", {**options, "sd_model_checkpoint": title})
    empty, _ = call(server, "POST", "/sdapi/v1/options", {**options, "sd_model_checkpoint": ""})
    verify, _ = call(server, "GET", "/sdapi/v1/options")
    check("Open WebUI settings: sd-models, options round trip, verify",
          (status, posted, empty, verify) == (200, 200, 200, 200) and options["sd_model_checkpoint"] == title,
          statuses=(status, posted, empty, verify))
    call(server, "GET", "/sdapi/v1/options")
    status, answer = call(server, "POST", "/sdapi/v1/txt2img",
                          {"prompt": "a castle", "batch_size": 1, "width": 512, "height": 512, "steps": 50})
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) if status == 200 else None
    check("Open WebUI txt2img (50 steps, 512²)", status == 200 and image.size == (512, 512)
          and isinstance(answer["info"], str), status=status)
    status, answer = call(server, "POST", "/v1/images/generations",
                          {"model": "dall-e-2", "prompt": "a castle", "n": 1, "size": "512x512",
                           "response_format": "b64_json"}, auth=f"Bearer {KEY}")
    check("Open WebUI's OpenAI engine: generations", status == 200 and len(answer["data"][0]["b64_json"]) > 100,
          status=status)


def sillytavern(server):
    """src/endpoints/stable-diffusion.js and the extension's index.js: connect, then one image,
    then an interrupt as on abort."""
    statuses = {}
    lists = {}
    for path in ["samplers", "options", "sd-models", "upscalers", "latent-upscale-modes", "schedulers", "sd-vae",
                 "sd-modules"]:
        statuses[path], lists[path] = call(server, "GET", f"/sdapi/v1/{path}")
    check("SillyTavern connect: every list answers", set(statuses.values()) == {200}, statuses=statuses)
    check("its defaults: the first sampler, scheduler and upscaler",
          lists["samplers"][0]["name"] == "Euler" and lists["schedulers"][0]["name"] == "automatic"
          and lists["upscalers"][0]["name"] == "None")
    status, _ = call(server, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": lists["sd-models"][0]["title"]})
    _, progress = call(server, "GET", "/sdapi/v1/progress")
    check("set-model, then progress idle", status == 200 and progress["progress"] == 0
          and progress["state"]["job_count"] == 0, status=status)
    body = {
        "url": server.url, "auth": f"webui:{KEY}", "prompt": "best quality, absurdres, a knight",
        "negative_prompt": "lowres, bad anatomy", "sampler_name": lists["samplers"][0]["name"],
        "scheduler": lists["schedulers"][0]["name"], "steps": 20, "cfg_scale": 7, "width": 512, "height": 512,
        "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
        "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }
    status, answer = call(server, "POST", "/sdapi/v1/txt2img", body)
    info = json.loads(answer["info"]) if status == 200 else {}
    png = base64.b64decode(answer["images"][0]) if status == 200 else b""
    check("SillyTavern txt2img", status == 200 and png[:4] == b"\x89PNG" and info["steps"] == 20
          and info["extra_generation_params"] == {}, status=status, info=info)
    status, answer = call(server, "POST", "/sdapi/v1/interrupt", raw=b"", content_type=None)
    check("its interrupt (no body) answers {}", status == 200 and answer == {}, status=status)


def librechat(server):
    """api/app/clients/tools/structured/StableDiffusion.js: parses info with JSON.parse."""
    status, answer = call(server, "POST", "/sdapi/v1/txt2img",
                          {"prompt": "a tower", "negative_prompt": "blurry", "cfg_scale": 4.5, "steps": 22,
                           "width": 256, "height": 256, "sampler_index": "DPM++ 2M Karras"})
    info = json.loads(answer["info"]) if status == 200 else {}
    check("LibreChat txt2img: info has seed, size and the infotext",
          status == 200 and info["width"] == 256 and isinstance(info["seed"], int)
          and "Steps: 22" in info["infotexts"][0].splitlines()[-1], status=status)
    status, answer = call(server, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 500})
    check("validation errors: 422 in AUTOMATIC1111's shape, naming the field and bound",
          status == 422 and answer["detail"][0]["loc"] == ["body", "steps"] and "150" in answer["errors"],
          status=status, answer=answer)


def main():
    binary = sys.argv[1]
    work = Path(tempfile.mkdtemp(prefix="sdxl-clients-"))
    server = Server(binary, work)
    client = openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1")
    try:
        for name, test in [
            ("Lightning defaults", lambda: lightning_defaults(server, client)),
            ("OpenAI SDK", lambda: openai_sdk(server, client)),
            ("webuiapi", lambda: webui(server)),
            ("Cloudflare SDK", lambda: cloudflare_sdk(server)),
            ("Open WebUI", lambda: open_webui(server)),
            ("SillyTavern", lambda: sillytavern(server)),
            ("LibreChat", lambda: librechat(server)),
        ]:
            started = time.monotonic()
            attempt(name, test)
            print(f"-- {name}: {time.monotonic() - started:.1f} s", flush=True)
    finally:
        server.stop()
        if failures:
            print(server.log_path.read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"clients: {len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
