"""Tiny-decoder goldens: a TAESD-XL-shaped diffusers `AutoencoderTiny` with random weights, and
what diffusers decodes with it.

The real model is the Hub repository `madebyollin/taesdxl`, files `config.json` and
`diffusion_pytorch_model.safetensors` (diffusers layout: `encoder.layers.*` and
`decoder.layers.*`, float32, 9.8 MB). The same repository also ships `taesdxl_decoder.safetensors`
and `taesdxl_encoder.safetensors` in the original TAESD layout (bare `nn.Sequential` indices, the
decoder's shifted by one: `decoder.layers.{i}` is `{i+1}`). Its config (revision 6b32ebd, "TAESD 1.3")
is diffusers' `AutoencoderTiny` defaults: act_fn relu, upsample_fn nearest, upsampling_scaling_factor 2,
latent_channels 4, decoder_block_out_channels (64, 64, 64, 64), num_decoder_blocks (3, 3, 3, 1),
encoder_block_out_channels (64, 64, 64, 64), num_encoder_blocks (1, 3, 3, 3), latent_magnitude 3,
latent_shift 0.5, scaling_factor 1.0, shift_factor 0.0, force_upcast false.

Writes, under crates/sdxl-models/tests/fixtures/:
  tiny-taesd/            `config.json` + `diffusion_pytorch_model.safetensors`: that structure with the
                         widths shrunk (decoder 8 channels, encoder 4), random float32 weights
  golden/tiny-taesd/     `decode.safetensors`, `pipeline.safetensors` + its PNG, `cases.json`

Weights: every convolution is drawn as make_fixtures.perturb_ draws it (N(0, 1/fan_in), biases
N(0, 0.1²)); then the last convolution is rescaled so that a calibration latent decodes to mean 0.5
and standard deviation 0.22 per channel before `mul(2).sub(1)`: without that the picture is mostly
clamped to black or white and a wrong pixel could hide in the saturation.

Goldens are computed from the reloaded directory (`AutoencoderTiny.from_pretrained(dir,
dtype=torch.float32)`) exactly as `StableDiffusionXLPipeline` decodes: `vae.decode(latents /
vae.config.scaling_factor)`, then the pipeline's own `VaeImageProcessor.postprocess(…,
output_type="pil")`. The pipeline case runs tiny-sdxl with `pipe.vae` replaced by the tiny decoder.

    /path/to/venv/bin/python tools/parity/make_tiny_decoder_fixtures.py   # from the repository root

Needs the venv of tools/parity/requirements.txt and tiny-sdxl (run make_fixtures.py first: it
deletes golden/). Rewrites tiny-taesd/ and golden/tiny-taesd/ only; ~9 s on a CPU. Deterministic
on the same library versions (fixed seeds, one CPU thread, AVX2 kernels)."""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets ATEN_CPU_CAPABILITY before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderTiny, StableDiffusionXLPipeline  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

MODEL_DIR = mf.FIXTURES / "tiny-taesd"
OUT = mf.GOLDEN / "tiny-taesd"

# madebyollin/taesdxl's config with the widths shrunk (64 -> 8 in the decoder, 64 -> 4 in the encoder,
# which no golden uses); every other value is the real one.
CONFIG = dict(
    in_channels=3, out_channels=3,
    encoder_block_out_channels=(4, 4, 4, 4), decoder_block_out_channels=(8, 8, 8, 8),
    act_fn="relu", upsample_fn="nearest", latent_channels=4, upsampling_scaling_factor=2,
    num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3, latent_shift=0.5, force_upcast=False, scaling_factor=1.0, shift_factor=0.0,
)
WEIGHT_SEED = 2027
CALIBRATION = dict(shape=[1, 4, 12, 12], seed=99, magnitude=3.0, mean=0.5, std=0.22)

# Latents as the pipeline holds them before decoding (UNet space): randn · magnitude. SDXL latents
# reach ±4 and beyond, so magnitude 3 drives the decoder's tanh(x/3)·3 clamp well into its bend.
# `decoded` (the float32 decoder output) is stored for the smallest case only, to keep the files small.
CASES = [
    dict(name="square_16x16", shape=[1, 4, 16, 16], seed=1, magnitude=3.0, decoded=False),
    dict(name="wide_8x24", shape=[1, 4, 8, 24], seed=2, magnitude=3.0, decoded=False),
    dict(name="batch2_odd_5x7", shape=[2, 4, 5, 7], seed=3, magnitude=1.5, decoded=True),
]
# A whole tiny-sdxl text-to-image run whose VAE is the tiny decoder (what `--decoder tiny` gives).
PIPELINE_CASE = dict(name="pipeline_g0_64x64_4steps", prompt=mf.CAT, width=64, height=64, steps=4, guidance=0.0,
                     seed=0)


@torch.no_grad()
def build_model():
    vae = AutoencoderTiny(**CONFIG)
    mf.perturb_(vae, WEIGHT_SEED)
    # Rescale the last convolution (the only one with out_channels outputs) so the calibration latent
    # decodes to CALIBRATION's per-channel mean and std: an image, not mostly saturated pixels.
    last = vae.decoder.layers[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.out_channels == CONFIG["out_channels"]
    c = CALIBRATION
    latents = mf.randn(c["shape"], c["seed"]) * c["magnitude"]
    raw = vae.decoder.layers(torch.tanh(latents / 3) * 3)  # DecoderTiny.forward before mul(2).sub(1)
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
    gain = c["std"] / std
    last.weight.mul_(gain.view(-1, 1, 1, 1))
    last.bias.copy_((last.bias - mean) * gain + c["mean"])
    return vae


def to_u8(images):
    """PIL images -> uint8 [B, H, W, 3]."""
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images]))


@torch.no_grad()
def golden_decodes(vae, processor):
    tensors, records = {}, []
    for case in CASES:
        name = case["name"]
        latents = mf.randn(case["shape"], case["seed"]) * case["magnitude"]
        # StableDiffusionXLPipeline.__call__: latents / scaling_factor, vae.decode, image_processor.postprocess
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        pils = processor.postprocess(decoded, output_type="pil")
        image = to_u8(pils)
        b, _, h, w = case["shape"]
        assert decoded.shape == (b, 3, 8 * h, 8 * w) and image.shape == (b, 8 * h, 8 * w, 3)
        stats = [mf.check_image(pil, f"{name}[{i}]") for i, pil in enumerate(pils)]
        tensors.update({f"{name}_latents": latents, f"{name}_image": image})
        if case["decoded"]:
            tensors[f"{name}_decoded"] = decoded
        records.append({**case, "stats": stats})
    # An input change must show: one latent cell of the first case nudged by 0.5.
    first = CASES[0]
    nudged = tensors[f"{first['name']}_latents"].clone()
    nudged[0, 0, 5, 7] += 0.5
    nudged_image = vae.decode(nudged / vae.config.scaling_factor, return_dict=False)[0]
    changed = to_u8(processor.postprocess(nudged_image, output_type="pil"))
    moved = int((changed != tensors[f"{first['name']}_image"]).sum())
    assert moved > 100, f"nudging one latent changed only {moved} pixel values"
    mf.save_tensors(tensors, OUT / "decode.safetensors")
    return records


@torch.no_grad()
def golden_pipeline(vae):
    c = PIPELINE_CASE
    pipe = StableDiffusionXLPipeline.from_pretrained(mf.FIXTURES / "tiny-sdxl", dtype=torch.float32,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 == 2 ** (len(vae.config.block_out_channels) - 1)
    pipe.vae = vae
    shape = [1, pipe.unet.config.in_channels, c["height"] // 8, c["width"] // 8]
    noise = mf.randn(shape, c["seed"])
    final = {}

    def record(_pipe, i, _t, kwargs):
        if i == c["steps"] - 1:
            final["latents"] = kwargs["latents"].clone()
        return {}

    image = pipe(prompt=c["prompt"], width=c["width"], height=c["height"], num_inference_steps=c["steps"],
                 guidance_scale=c["guidance"], latents=noise, output_type="pil", callback_on_step_end=record).images[0]
    assert image.size == (c["width"], c["height"])
    image.save(OUT / f"{c['name']}.png")
    mf.save_tensors({"noise": noise, "final_latents": final["latents"], "image": to_u8([image])},
                    OUT / "pipeline.safetensors")
    return {**c, "negative_prompt": None, "noise_from": "latents", "png": f"{c['name']}.png",
            "timesteps": mf.floats(pipe.scheduler.timesteps), **mf.check_image(image, c["name"])}


def main():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", "ATEN_CPU_CAPABILITY=avx2 did not take effect"
    torch.set_num_threads(1)
    for generated in (MODEL_DIR, OUT):
        shutil.rmtree(generated, ignore_errors=True)
    OUT.mkdir(parents=True)

    build_model().save_pretrained(MODEL_DIR, safe_serialization=True)
    assert sorted(p.name for p in MODEL_DIR.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = AutoencoderTiny.from_pretrained(MODEL_DIR, dtype=torch.float32)
    # What StableDiffusionXLPipeline builds: VaeImageProcessor(vae_scale_factor=2 ** (len(block_out_channels) - 1))
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))

    records = golden_decodes(vae, processor)
    pipeline = golden_pipeline(vae)
    summary = {"versions": mf.library_versions(), "config": {k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in CONFIG.items()},
               "weight_seed": WEIGHT_SEED, "calibration": CALIBRATION, "cases": records, "pipeline": pipeline}
    (OUT / "cases.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(records)} decode cases and 1 pipeline case in {OUT.relative_to(mf.ROOT)}")


if __name__ == "__main__":
    main()
