"""Write a full-size SDXL base model with random float16 weights in the diffusers layout.

For measurements that depend on sizes, not values (load memory, speed), without downloading
the real weights. The configs and tokenizers are the ones `sdxl` embeds for single-file
checkpoints (crates/sdxl-engine/assets/sdxl-base). Tensors are created from the models'
shapes on torch's `meta` device, so no model is ever built in memory.

    python tools/bench/make_random_sdxl.py OUT_DIR        # about 7 GB, a few minutes
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "crates" / "sdxl-engine" / "assets" / "sdxl-base"


def random_f16(model, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.state_dict().items():
        tensors[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.float16)
    return tensors


def main(out):
    out = Path(out)
    shutil.copytree(BASE, out, dirs_exist_ok=True)
    shutil.copytree(BASE / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
    shutil.copy(BASE / "tokenizer_2" / "special_tokens_map.json", out / "tokenizer_2")
    shutil.copy(BASE / "tokenizer_2" / "tokenizer_config.json", out / "tokenizer_2")
    builders = [
        ("unet", "diffusion_pytorch_model", lambda c: UNet2DConditionModel.from_config(c)),
        ("vae", "diffusion_pytorch_model", lambda c: AutoencoderKL.from_config(c)),
        ("text_encoder", "model", lambda c: CLIPTextModel(CLIPTextConfig(**c))),
        ("text_encoder_2", "model", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))),
    ]
    for seed, (folder, stem, build) in enumerate(builders):
        config = json.loads((BASE / folder / "config.json").read_text())
        with torch.device("meta"):
            model = build(config)
        tensors = random_f16(model, seed)
        save_file(tensors, str(out / folder / f"{stem}.fp16.safetensors"))
        count = sum(t.numel() for t in tensors.values())
        print(f"{folder}: {len(tensors)} tensors, {count / 1e6:.1f}M parameters", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
