"""The tiny-model parity cases through a built `sdxl` binary, for machines with no Rust
toolchain (a GPU host): every text-to-image, img2img and inpainting case of the committed
fixtures, generated with the case's noise file, compared with the PNG diffusers made.

    python3 tools/gpu/parity.py --sdxl target/gpu/sdxl --device cuda --dtype f32

Bounds per 8-bit channel (docs/gpu.md): f32 is held to the CPU's parity bounds (those of
crates/sdxl-cli/tests/generate.rs); f16 is not a parity mode and is held to a mean bound
only. Needs Pillow. Exits 1 if any case is out of bounds.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops, ImageStat

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "sdxl-models" / "tests" / "fixtures"
MODELS = ["tiny-sdxl", "tiny-2level-fp16"]

# (max, mean) absolute difference per channel; None: no bound on the maximum.
BOUNDS = {
    "f32": (3, 0.1),
    # input resized by our Lanczos-3 and PIL's, a level apart in some pixels
    "f32-resized": (4, 0.3),
    # the UNet and text encoders round to f16 (on the CPU: worst mean 0.48, worst max 4)
    "f16": (None, 1.0),
}


def difference(actual, expected):
    """(max, mean) absolute difference over the RGB channels of two images of one size."""
    a, b = Image.open(actual).convert("RGB"), Image.open(expected).convert("RGB")
    if a.size != b.size:
        raise SystemExit(f"{actual}: size {a.size}, expected {b.size}")
    diff = ImageChops.difference(a, b)
    worst = max(high for _, high in diff.getextrema())
    mean = sum(ImageStat.Stat(diff).mean) / 3
    return worst, mean


def command(args, model, case, out):
    golden = FIXTURES / "golden" / model
    cmd = [
        args.sdxl, "generate", "--model", str(FIXTURES / model), "--prompt", case["prompt"],
        "--width", str(case["width"]), "--height", str(case["height"]), "--steps", str(case["steps"]),
        "--guidance", str(case["guidance"]), "--noise", str(golden / case["noise"]),
        "--device", args.device, "--dtype", args.dtype, "--output", str(out),
    ]
    if case.get("negative_prompt") is not None:
        cmd += ["--negative-prompt", case["negative_prompt"]]
    if "image" in case:
        cmd += ["--image", str(golden / case["image"]), "--strength", str(case["strength"])]
    if case.get("mask"):
        cmd += ["--mask", str(golden / case["mask"])]
    return cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdxl", default=str(ROOT / "target" / "gpu" / "sdxl"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    args = parser.parse_args()

    failures, worst_max, worst_mean, count = [], 0, 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            golden = FIXTURES / "golden" / model
            cases = json.loads((golden / "cases.json").read_text())
            cases += json.loads((golden / "edit_cases.json").read_text())
            for case in cases:
                out = Path(tmp) / f"{model}-{case['name']}.png"
                run = subprocess.run(command(args, model, case, out), capture_output=True, text=True)
                name = f"{model}/{case['name']}"
                if run.returncode != 0:
                    failures.append(f"{name}: sdxl failed: {run.stderr.strip()}")
                    continue
                high, mean = difference(out, golden / case["png"])
                key = "f32-resized" if args.dtype == "f32" and case.get("resize") else args.dtype
                max_bound, mean_bound = BOUNDS[key]
                ok = mean <= mean_bound and (max_bound is None or high <= max_bound)
                print(f"{'ok  ' if ok else 'FAIL'} {name:<55} max {high:>3} mean {mean:.4f}", flush=True)
                if not ok:
                    failures.append(f"{name}: max {high} mean {mean:.4f} exceeds {key} bounds {BOUNDS[key]}")
                worst_max, worst_mean, count = max(worst_max, high), max(worst_mean, mean), count + 1
    print(f"parity {args.device} {args.dtype}: {count} cases, worst max {worst_max}, worst mean {worst_mean:.4f}, "
          f"{len(failures)} failed")
    for failure in failures:
        print("  " + failure, file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
