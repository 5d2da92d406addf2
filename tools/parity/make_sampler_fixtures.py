"""Sampler goldens: the committed tiny-sdxl model run by diffusers with other schedulers.

Each case builds `SchedulerClass.from_config(pipe.scheduler.config, **overrides)` exactly as a
user of diffusers would, runs `StableDiffusionXLPipeline` with a seeded CPU `torch.Generator`
(so stochastic samplers draw their per-step noise from the same generator, after the initial
latents), and records the PNG, the timesteps and sigmas, and the latents after every step.

    /path/to/venv/bin/python tools/parity/make_sampler_fixtures.py   # from the repository root

Needs the venv of tools/parity/requirements.txt; reads crates/sdxl-models/tests/fixtures/tiny-sdxl
(made by make_fixtures.py) and rewrites crates/sdxl-models/tests/fixtures/golden/samplers/ only.
Deterministic on the same library versions (fixed seeds, one CPU thread, AVX2 kernels)."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "sdxl-models" / "tests" / "fixtures"
OUT = FIXTURES / "golden" / "samplers"
PROMPT = "a photo of a cat wearing a tiny hat"

SAMPLERS = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler}

# (name, sampler, schedule, width, height, steps, guidance, seed)
CASES = [
    ("euler_a_g0_64x64_4steps", "euler_a", "model", 64, 64, 4, 0.0, 7),
    ("euler_a_g5_64x48_3steps", "euler_a", "model", 64, 48, 3, 5.0, 11),
    ("euler_a_trailing_48x64_4steps", "euler_a", "trailing", 48, 64, 4, 0.0, 3),
    ("euler_a_leading_64x64_5steps", "euler_a", "leading", 64, 64, 5, 2.0, 5),
    ("euler_linspace_64x64_4steps", "euler", "linspace", 64, 64, 4, 0.0, 2),
]


def floats(t):
    return [float(x) for x in t.flatten().tolist()]


def scheduler_for(base, sampler, schedule):
    """`SchedulerClass.from_config(pipe.scheduler.config)`, with the schedule's spacing."""
    overrides = {} if schedule == "model" else {"timestep_spacing": schedule}
    return SAMPLERS[sampler].from_config(base.config, **overrides)


def run_case(pipe, base_scheduler, case):
    name, sampler, schedule, width, height, steps, guidance, seed = case
    pipe.scheduler = scheduler_for(base_scheduler, sampler, schedule)
    trace = {}

    def record(_pipe, i, _t, kwargs):
        trace[f"step_{i}"] = kwargs["latents"].clone().contiguous()
        return {}

    image = pipe(
        prompt=PROMPT, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", callback_on_step_end=record,
    ).images[0]
    pixels = np.asarray(image, dtype=np.float64)
    assert pixels.std() > 10, f"{name}: flat image"
    image.save(OUT / f"{name}.png")
    save_file(trace, str(OUT / f"{name}.latents.safetensors"))
    return {
        "name": name, "sampler": sampler, "schedule": schedule, "prompt": PROMPT, "width": width,
        "height": height, "steps": steps, "guidance": guidance, "seed": seed, "png": f"{name}.png",
        "latents": f"{name}.latents.safetensors", "timesteps": floats(pipe.scheduler.timesteps),
        "sigmas": floats(pipe.scheduler.sigmas), "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
    }


def main():
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(FIXTURES / "tiny-sdxl", dtype=torch.float32,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler
    records = [run_case(pipe, base, case) for case in CASES]
    (OUT / "cases.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} sampler cases in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
