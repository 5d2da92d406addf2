"""Sampler goldens: the committed tiny models run by diffusers with other scheduler classes.

Each case builds `SchedulerClass.from_config(pipe.scheduler.config, **overrides)` exactly as a
user of diffusers would (the schedule: `use_karras_sigmas=True` or `timestep_spacing=…`), runs
the SDXL text-to-image, img2img or inpaint pipeline with a seeded CPU `torch.Generator` (so
stochastic samplers draw their per-step noise from the same generator, after the initial
latents), and records the PNG, the timesteps and sigmas, and the latents after every UNet call.
img2img and inpainting take the VAE's latent mean, as every edit golden does
(make_fixtures.vae_mean_encoding).

    /path/to/venv/bin/python tools/parity/make_sampler_fixtures.py   # from the repository root

Needs the venv of tools/parity/requirements.txt; reads the tiny models under
crates/sdxl-models/tests/fixtures (made by make_fixtures.py) and rewrites
crates/sdxl-models/tests/fixtures/golden/samplers/ only. Deterministic on the same library
versions (fixed seeds, one CPU thread, AVX2 kernels)."""

import contextlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets ATEN_CPU_CAPABILITY before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from safetensors.torch import save_file  # noqa: E402

OUT = mf.FIXTURES / "golden" / "samplers"
PROMPT = mf.CAT

# name -> (class, overrides), the overrides a user passes for that sampler
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

T2I, I2I, INPAINT = "txt2img", "img2img", "inpaint"
SDXL, TWO_LEVEL = "tiny-sdxl", "tiny-2level-fp16"


def case(mode, sampler, schedule, width, height, steps, guidance, seed, strength=1.0, model=SDXL):
    tag = "" if model == SDXL else "2level_"
    name = f"{tag}{mode}_{sampler}_{schedule}_g{guidance:g}_{width}x{height}_{steps}steps"
    return dict(name=name, mode=mode, model=model, sampler=sampler, schedule=schedule, width=width, height=height,
                steps=steps, guidance=guidance, seed=seed, strength=strength)


CASES = [
    # text to image: every sampler with and without guidance, every schedule it takes
    case(T2I, "euler_a", "model", 64, 64, 4, 0.0, 7),
    case(T2I, "euler_a", "model", 64, 48, 3, 5.0, 11),
    case(T2I, "euler_a", "trailing", 48, 64, 4, 0.0, 3),
    case(T2I, "euler_a", "leading", 64, 64, 5, 2.0, 5),
    case(T2I, "euler", "linspace", 64, 64, 4, 0.0, 2),
    case(T2I, "euler", "karras", 64, 64, 5, 4.0, 21),
    case(T2I, "heun", "model", 64, 64, 3, 0.0, 8),
    case(T2I, "heun", "karras", 48, 64, 4, 5.0, 9),
    case(T2I, "heun", "leading", 64, 48, 3, 0.0, 10),
    case(T2I, "dpmpp_2m", "model", 64, 64, 5, 5.0, 12),
    case(T2I, "dpmpp_2m", "karras", 64, 64, 4, 0.0, 13),
    case(T2I, "dpmpp_2m", "linspace", 48, 64, 6, 3.0, 14),
    case(T2I, "dpmpp_2m", "leading", 64, 48, 4, 0.0, 15),
    case(T2I, "dpmpp_2m_sde", "model", 64, 64, 4, 0.0, 16),
    case(T2I, "dpmpp_2m_sde", "karras", 64, 48, 5, 5.0, 17),
    case(T2I, "dpmpp_2m_sde", "trailing", 48, 64, 4, 2.0, 18),
    case(T2I, "ddim", "model", 64, 64, 4, 5.0, 19),
    case(T2I, "ddim", "linspace", 64, 48, 5, 0.0, 20),
    case(T2I, "ddim", "leading", 48, 64, 3, 0.0, 22),
    case(T2I, "unipc", "model", 64, 64, 5, 0.0, 23),
    case(T2I, "unipc", "karras", 64, 64, 6, 5.0, 24),
    case(T2I, "unipc", "leading", 64, 48, 4, 3.0, 25),
    case(T2I, "unipc", "linspace", 48, 64, 3, 0.0, 26),
    case(T2I, "lcm", "model", 64, 64, 4, 0.0, 27),
    case(T2I, "lcm", "model", 64, 48, 6, 2.0, 28),
    # img2img and inpainting: every sampler
    *[case(I2I, s, sch, 64, 64, 5, g, 30 + k, strength=0.6)
      for k, (s, sch, g) in enumerate([("euler", "model", 0.0), ("euler_a", "model", 3.0), ("heun", "model", 0.0),
                                       ("dpmpp_2m", "karras", 0.0), ("dpmpp_2m_sde", "model", 3.0),
                                       ("ddim", "model", 0.0), ("unipc", "model", 3.0), ("lcm", "model", 0.0)])],
    *[case(INPAINT, s, sch, 64, 64, 4, g, 40 + k, strength=st)
      for k, (s, sch, g, st) in enumerate([("euler", "model", 0.0, 0.75), ("euler_a", "model", 0.0, 0.75),
                                           ("heun", "karras", 3.0, 0.75), ("dpmpp_2m", "model", 0.0, 1.0),
                                           ("dpmpp_2m_sde", "karras", 0.0, 0.75), ("ddim", "trailing", 3.0, 0.75),
                                           ("unipc", "model", 0.0, 1.0), ("lcm", "model", 0.0, 0.75)])],
    # the second tiny model: linear betas, leading spacing, a VAE of scale factor 2
    case(T2I, "dpmpp_2m_sde", "karras", 32, 32, 4, 5.0, 50, model=TWO_LEVEL),
    case(T2I, "unipc", "model", 32, 24, 5, 0.0, 51, model=TWO_LEVEL),
    case(T2I, "heun", "model", 24, 32, 3, 3.0, 52, model=TWO_LEVEL),
    case(T2I, "ddim", "model", 32, 32, 4, 0.0, 53, model=TWO_LEVEL),
    case(T2I, "lcm", "model", 32, 32, 3, 0.0, 54, model=TWO_LEVEL),
    case(I2I, "euler_a", "trailing", 32, 32, 4, 0.0, 55, strength=0.5, model=TWO_LEVEL),
]


def floats(t):
    return [float(x) for x in t.flatten().tolist()]


def scheduler_for(base, sampler, schedule):
    """`SchedulerClass.from_config(pipe.scheduler.config, ...)` with the schedule's override."""
    cls, overrides = SAMPLERS[sampler]
    overrides = dict(overrides)
    if schedule == "karras":
        overrides["use_karras_sigmas"] = True
    elif schedule != "model":
        overrides["timestep_spacing"] = schedule
    return cls.from_config(base.config, **overrides)


def load_pipes(model):
    directory = mf.FIXTURES / model
    variant = "fp16" if model == TWO_LEVEL else None
    pipes = {}
    for mode, cls in [(T2I, StableDiffusionXLPipeline), (I2I, StableDiffusionXLImg2ImgPipeline),
                      (INPAINT, StableDiffusionXLInpaintPipeline)]:
        pipe = cls.from_pretrained(directory, dtype=torch.float32, add_watermarker=False, variant=variant)
        pipe.set_progress_bar_config(disable=True)
        pipes[mode] = pipe
    return pipes


def edit_inputs(c):
    """The input image (and mask) of an edit case, written once per size."""
    w, h = c["width"], c["height"]
    image = mf.edit_input_image(w, h)
    c["image"] = mf.save_png(image, OUT / f"input_{w}x{h}.png")
    if c["mode"] == INPAINT:
        mask = mf.edit_mask_image(w, h)
        c["mask"] = mf.save_png(mask, OUT / f"mask_{w}x{h}.png")
        return image, mask
    return image, None


@torch.no_grad()
def run_case(pipes, c):
    pipe = pipes[c["mode"]]
    pipe.scheduler = scheduler_for(pipes["base"], c["sampler"], c["schedule"])
    trace = {}

    def record(_pipe, i, _t, kwargs):
        trace[f"step_{i}"] = kwargs["latents"].clone().contiguous()
        return {}

    args = dict(prompt=PROMPT, num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="pil",
                callback_on_step_end=record)
    with contextlib.ExitStack() as stack:
        if c["mode"] == T2I:
            args.update(width=c["width"], height=c["height"])
        else:
            image, mask = edit_inputs(c)
            args.update(image=image, strength=c["strength"])
            if mask is not None:
                args.update(mask_image=mask, width=c["width"], height=c["height"])
            stack.enter_context(mf.vae_mean_encoding([]))
        result = pipe(**args).images[0]
    pixels = np.asarray(result, dtype=np.float64)
    assert pixels.std() > 5, f"{c['name']}: flat image"
    assert result.size == (c["width"], c["height"])
    result.save(OUT / f"{c['name']}.png")
    save_file(trace, str(OUT / f"{c['name']}.latents.safetensors"))
    return {**c, "prompt": PROMPT, "png": f"{c['name']}.png", "latents": f"{c['name']}.latents.safetensors",
            "timesteps": floats(pipe.scheduler.timesteps), "sigmas": floats(getattr(pipe.scheduler, "sigmas", torch.zeros(0))),
            "init_noise_sigma": float(pipe.scheduler.init_noise_sigma)}


def main():
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    records = []
    for model in (SDXL, TWO_LEVEL):
        pipes = load_pipes(model)
        pipes["base"] = pipes[T2I].scheduler
        records += [run_case(pipes, c) for c in CASES if c["model"] == model]
    names = [r["name"] for r in records]
    assert len(set(names)) == len(names), "case names are unique"
    (OUT / "cases.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} sampler cases in {OUT.relative_to(mf.ROOT)}")


if __name__ == "__main__":
    main()
