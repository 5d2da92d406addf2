"""`sdxl bench`'s measurements through diffusers / PyTorch, on the same machine, for a ratio
taken in one sitting.

Builds the full-size SDXL base architecture from the configs `sdxl` embeds
(crates/sdxl-engine/assets/sdxl-base) with PyTorch's default random initialisation and times
the same work as `sdxl bench`: `--warmup` untimed runs, then the median of `--runs` runs.
GFLOP/s come from torch's own FLOP counter (matrix products and convolutions), so both
columns count the same operations. Peak RSS is the process maximum so far (it cannot be
reset), so run one component per process for a clean memory figure.

On a GPU (`--device cuda --dtype float16`) the pipeline runs as diffusers users run it in
fp16: the VAE decodes in float32 (SDXL's VAE config asks for the upcast), and the vae_decode
and vae_encode components time a float32 VAE, as `sdxl` runs it. Each timed run ends when the
GPU is idle.

    python tools/bench/torch_reference.py --threads 2 --component unet_step --resolution 512 --json
    python tools/bench/torch_reference.py --device cuda --dtype float16 --component image_4step
"""

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "crates" / "sdxl-engine" / "assets" / "sdxl-base"
PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, 35mm"
COMPONENTS = ["text_encoders", "unet_step", "unet_step_cfg", "vae_decode", "vae_encode", "image_4step"]


def config(folder):
    return json.loads((BASE / folder / "config.json").read_text())


def tokenizer(folder):
    # The embedded description keeps one copy of the vocabulary; tokenizer_2 differs only in
    # its special tokens.
    return CLIPTokenizer(
        vocab_file=str(BASE / "tokenizer" / "vocab.json"),
        merges_file=str(BASE / "tokenizer" / "merges.txt"),
        pad_token="<|endoftext|>" if folder == "tokenizer" else "!",
        model_max_length=77,
    )


def build_pipeline(device, dtype):
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))),
        tokenizer=tokenizer("tokenizer"),
        tokenizer_2=tokenizer("tokenizer_2"),
        unet=UNet2DConditionModel.from_config(config("unet")),
        scheduler=EulerDiscreteScheduler.from_config(
            json.loads((BASE / "scheduler" / "scheduler_config.json").read_text())
        ),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # the VAE as it decodes: in float32 (for narrower pipelines a copy, so the pipeline's own
    # upcast logic is untouched)
    vae32 = pipe.vae if dtype == torch.float32 else copy.deepcopy(pipe.vae).to(torch.float32)
    vae32.to(device)
    return pipe.to(device, dtype), vae32


def workload(pipe, vae32, component, resolution):
    device, dtype = pipe.device, pipe.unet.dtype
    latent_side = resolution // 8
    if component == "text_encoders":
        return lambda: pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    if component in ("unet_step", "unet_step_cfg"):
        batch = 2 if component == "unet_step_cfg" else 1
        context, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        context, pooled = context.repeat(batch, 1, 1), pooled.repeat(batch, 1)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=dtype,
                                device=device)
        sample = torch.randn(batch, 4, latent_side, latent_side, device=device, dtype=dtype)
        return lambda: pipe.unet(
            sample, 999, encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        )
    if component == "vae_decode":
        latents = torch.randn(1, 4, latent_side, latent_side, device=device)
        return lambda: vae32.decode(latents)
    if component == "vae_encode":
        image = torch.rand(1, 3, resolution, resolution, device=device) * 2 - 1
        return lambda: vae32.encode(image).latent_dist.mean
    if component == "image_4step":
        return lambda: pipe(
            PROMPT, width=resolution, height=resolution, num_inference_steps=4, guidance_scale=0.0,
            output_type="pil",
        )
    raise ValueError(component)


def measure(pipe, vae32, component, resolution, runs, warmup):
    work = workload(pipe, vae32, component, resolution)
    cuda = pipe.device.type == "cuda"

    def run():
        work()
        if cuda:
            torch.cuda.synchronize()

    counter = FlopCounterMode(display=False)
    with torch.inference_mode():
        with counter:
            run()  # counting FLOPs (and warming up)
        for _ in range(warmup - 1):
            run()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = counter.get_total_flops()
    return {
        "component": component,
        "device": str(pipe.device),
        "resolution": resolution if component != "text_encoders" else None,
        "median_s": round(median, 4),
        "gflops": round(flops / median / 1e9, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
        "runs": runs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--component", action="append", choices=COMPONENTS)
    parser.add_argument("--resolution", action="append", type=int)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (at least 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    components = args.component or COMPONENTS
    resolutions = args.resolution or [512, 1024]
    pipe, vae32 = build_pipeline(torch.device(args.device), getattr(torch, args.dtype))
    if not args.json:
        print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, {args.dtype}, "
              f"{args.runs} timed run(s) after {max(args.warmup, 1)} warm-up run(s)")
    for component in components:
        sizes = resolutions[:1] if component == "text_encoders" else resolutions
        if component == "image_4step" and not args.resolution:
            sizes = [1024]
        for resolution in sizes:
            result = measure(pipe, vae32, component, resolution, args.runs, max(args.warmup, 1))
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{component:<15} {str(resolution):>10} {result['median_s']:>10.2f} "
                      f"{result['gflops']:>9.1f} {result['peak_rss_mb']:>13}", flush=True)


if __name__ == "__main__":
    main()
