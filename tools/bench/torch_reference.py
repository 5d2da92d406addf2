"""`sdxl bench`'s measurements through diffusers / PyTorch, on the same machine, for a ratio
taken in one sitting.

Builds the full-size SDXL base architecture from the configs `sdxl` embeds
(crates/sdxl-engine/assets/sdxl-base) with PyTorch's default random initialisation, float32,
and times the same work as `sdxl bench`: one warm-up run, then the median of `--runs` runs.
GFLOP/s come from torch's own FLOP counter (matrix products and convolutions), so both
columns count the same operations. Peak RSS is the process maximum so far (it cannot be
reset), so run one component per process for a clean memory figure.

    python tools/bench/torch_reference.py --threads 2 --component unet_step --resolution 512 --json
"""

import argparse
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


def build_pipeline():
    torch.manual_seed(0)
    return StableDiffusionXLPipeline(
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
    ).to(torch.float32)


def workload(pipe, component, resolution):
    latent_side = resolution // 8
    if component == "text_encoders":
        return lambda: pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    if component in ("unet_step", "unet_step_cfg"):
        batch = 2 if component == "unet_step_cfg" else 1
        context, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        context, pooled = context.repeat(batch, 1, 1), pooled.repeat(batch, 1)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
        sample = torch.randn(batch, 4, latent_side, latent_side)
        return lambda: pipe.unet(
            sample, 999, encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        )
    if component == "vae_decode":
        latents = torch.randn(1, 4, latent_side, latent_side)
        return lambda: pipe.vae.decode(latents)
    if component == "vae_encode":
        image = torch.rand(1, 3, resolution, resolution) * 2 - 1
        return lambda: pipe.vae.encode(image).latent_dist.mean
    if component == "image_4step":
        return lambda: pipe(
            PROMPT, width=resolution, height=resolution, num_inference_steps=4, guidance_scale=0.0,
            output_type="pil",
        )
    raise ValueError(component)


def measure(pipe, component, resolution, runs):
    work = workload(pipe, component, resolution)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode():
        with counter:
            work()  # warm-up, counting FLOPs
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = counter.get_total_flops()
    return {
        "component": component,
        "resolution": resolution if component != "text_encoders" else None,
        "median_s": round(median, 3),
        "gflops": round(flops / median / 1e9, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
        "runs": runs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--component", action="append", choices=COMPONENTS)
    parser.add_argument("--resolution", action="append", type=int)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    components = args.component or COMPONENTS
    resolutions = args.resolution or [512, 1024]
    pipe = build_pipeline()
    if not args.json:
        print(f"torch {torch.__version__}, {args.threads} threads, float32, {args.runs} timed run(s) after one warm-up")
    for component in components:
        sizes = resolutions[:1] if component == "text_encoders" else resolutions
        if component == "image_4step" and not args.resolution:
            sizes = [1024]
        for resolution in sizes:
            result = measure(pipe, component, resolution, args.runs)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{component:<15} {str(resolution):>10} {result['median_s']:>10.2f} "
                      f"{result['gflops']:>9.1f} {result['peak_rss_mb']:>13}", flush=True)


if __name__ == "__main__":
    main()
