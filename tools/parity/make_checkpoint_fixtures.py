"""Single-file (SGM) checkpoint and LoRA fixtures for `sdxl-models`, made from the tiny-sdxl fixture model.

Run after make_fixtures.py (it reads crates/sdxl-models/tests/fixtures/tiny-sdxl, and make_fixtures.py
deletes golden/, including golden/checkpoints/), from the repository root:

    python tools/parity/make_checkpoint_fixtures.py --convert-script PATH

PATH is diffusers' scripts/convert_diffusers_to_original_sdxl.py (in the GitHub repository, not in the pip
package; tools/parity/README.md says where to get it). Writes, under crates/sdxl-models/tests/fixtures/:

  checkpoints/tiny-sdxl-sgm.safetensors   tiny-sdxl's four models in the original Stability (SGM) layout, f16
  lora/peft_unet.safetensors              a UNet LoRA as diffusers' save_lora_weights writes it (PEFT keys)
  lora/kohya_diffusers_names.safetensors  UNet + both text encoders, diffusers' convert_state_dict_to_kohya
  lora/kohya_sgm_names.safetensors        UNet (SGM block names) + both text encoders, as kohya sd-scripts
                                          writes SDXL LoRAs (f16, per-module ranks and alphas)
  golden/checkpoints/sgm_cases.json       from_single_file pipeline runs (+ PNGs, noise files)
  golden/checkpoints/lora_cases.json      runs of tiny-sdxl with LoRAs fused by diffusers (+ PNGs, noise files)

Deterministic: fixed seeds, one CPU thread, ATEN_CPU_CAPABILITY=avx2 (as make_fixtures.py).
"""

import os

# Same pinning as make_fixtures.py; must precede importing torch.
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the Hub

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from diffusers.training_utils import _collate_lora_metadata  # noqa: E402
from diffusers.utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

FIXTURES = mf.FIXTURES
TINY = FIXTURES / "tiny-sdxl"
CHECKPOINTS = FIXTURES / "checkpoints"
LORA = FIXTURES / "lora"
GOLDEN = FIXTURES / "golden" / "checkpoints"
SGM_FILE = CHECKPOINTS / "tiny-sdxl-sgm.safetensors"

# sha256 of scripts/convert_diffusers_to_original_sdxl.py as of diffusers v0.33.0 … v0.40.0 and main
# (git blob 1aa792b3f06ac7db88078024da241e0aa97b7925; unchanged since April 2025).
CONVERT_SCRIPT_SHA256 = "a309bc9dae8e3fb5667bfbd1439636e0caba8fffff12850f91a0470add7230e3"

NEG = "blurry, low quality"

SGM_CASES = [
    dict(name="sgm_g0_64x64_4steps", width=64, height=64, steps=4, guidance=0.0, seed=0),
    dict(name="sgm_g5_neg_64x48_2steps", width=64, height=48, steps=2, guidance=5.0, seed=1, negative_prompt=NEG),
    dict(name="sgm_generator_48x64_2steps", width=48, height=64, steps=2, guidance=0.0, seed=12345, generator=True),
]

# The two txt2img cases every LoRA golden runs (name suffixes).
LORA_CASES = [
    dict(name="g0_64x64_4steps", width=64, height=64, steps=4, guidance=0.0, seed=0),
    dict(name="g5_neg_64x48_2steps", width=64, height=48, steps=2, guidance=5.0, seed=1, negative_prompt=NEG),
]

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ----------------------------------------------------------------------------------------------
# helpers


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_convert_script(path):
    """Import diffusers' convert_diffusers_to_original_sdxl.py as a module (its __main__ block does not run)."""
    path = Path(path).resolve()
    digest = sha256(path)
    if digest != CONVERT_SCRIPT_SHA256:
        print(f"warning: {path} has sha256 {digest}, not the known {CONVERT_SCRIPT_SHA256}; the output may differ")
    spec = importlib.util.spec_from_file_location("convert_diffusers_to_original_sdxl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ["convert_unet_state_dict", "convert_vae_state_dict", "convert_openai_text_enc_state_dict",
                 "convert_openclip_text_enc_state_dict"]:
        assert callable(getattr(module, name, None)), f"{path} has no function {name}"
    return module, digest


def load_tiny():
    return StableDiffusionXLPipeline.from_pretrained(TINY, dtype=torch.float32, add_watermarker=False)


def components(pipe):
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


def state_dicts(pipe):
    return {name: {k: v.detach().clone() for k, v in model.state_dict().items()} for name, model in components(pipe).items()}


@torch.no_grad()
def run_case(pipe, case, out_dir, name):
    """One txt2img run, recorded exactly as make_fixtures.golden_cases records it. Returns (record, PIL image)."""
    prompt = case.get("prompt", mf.CAT)
    negative = case.get("negative_prompt")
    factor = mf.vae_scale_factor(pipe)
    shape = [1, pipe.unet.config.in_channels, case["height"] // factor, case["width"] // factor]
    noise = mf.randn(shape, case["seed"])
    mf.save_tensors({"noise": noise}, out_dir / f"{name}.noise.safetensors")
    noise_args = ({"generator": torch.Generator("cpu").manual_seed(case["seed"])} if case.get("generator")
                  else {"latents": noise})
    image = pipe(
        prompt=prompt, negative_prompt=negative, width=case["width"], height=case["height"],
        num_inference_steps=case["steps"], guidance_scale=case["guidance"], output_type="pil", **noise_args,
    ).images[0]
    assert image.size == (case["width"], case["height"])
    image.save(out_dir / f"{name}.png")
    record = {
        "name": name, "prompt": prompt, "negative_prompt": negative, "width": case["width"],
        "height": case["height"], "steps": case["steps"], "guidance": case["guidance"], "seed": case["seed"],
        "noise_from": "generator" if case.get("generator") else "latents",
        "noise": f"{name}.noise.safetensors", "png": f"{name}.png",
        "timesteps": mf.floats(pipe.scheduler.timesteps), "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        **mf.check_image(image, name),
    }
    return record, image


def canonical_header(path):
    """Sort a safetensors file's __metadata__ keys in place. safetensors writes them in the order of a Rust
    HashMap, i.e. differently on every run once there are two or more; everything else is deterministic."""
    data = bytearray(Path(path).read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", None)
    if not metadata:
        return
    header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert len(text) <= n and len(text) == len(data[8 : 8 + n].rstrip(b" ")), "header changed length"
    data[8 : 8 + n] = text + b" " * (n - len(text))
    Path(path).write_bytes(bytes(data))


def mad(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


# ----------------------------------------------------------------------------------------------
# A. the single-file checkpoint


# diffusers-layout fragments that must not survive the conversion.
BLOCK_FRAGMENTS = ["down_blocks", "up_blocks", "mid_block", "resnets", "attentions", "upsamplers", "downsamplers",
                   "conv_shortcut", "conv_norm_out"]
DIFFUSERS_FRAGMENTS = {
    "unet": BLOCK_FRAGMENTS + ["time_embedding", "add_embedding", "conv_in", "conv_out", "time_emb_proj"],
    "vae": BLOCK_FRAGMENTS + ["group_norm", "to_q", "to_k", "to_v", "to_out"],
}


def build_sgm_checkpoint(convert):
    """tiny-sdxl's four models → one SGM-layout state dict, converted by diffusers' script, stored as float16."""
    unet = load_file(TINY / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(TINY / "vae" / "diffusion_pytorch_model.safetensors")
    te1 = load_file(TINY / "text_encoder" / "model.safetensors")
    te2 = load_file(TINY / "text_encoder_2" / "model.safetensors")

    # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level ("embeddings.…", "encoder.…",
    # "final_layer_norm.…"). The script's CLIP-L conversion is the identity, written for the classic layout,
    # and real checkpoints (and from_single_file) have conditioner.embedders.0.transformer.text_model.…:
    # restore the level first. CLIPTextModelWithProjection still saves text_model.… + text_projection.weight.
    if not any(k.startswith("text_model.") for k in te1):
        te1 = {f"text_model.{k}": v for k, v in te1.items()}
    assert all(k.startswith("text_model.") for k in te1)
    assert "text_projection.weight" in te2 and all(k.startswith("text_model.") for k in te2 if k != "text_projection.weight")

    with contextlib.redirect_stdout(io.StringIO()):  # convert_vae_state_dict prints one line per reshaped weight
        unet_sgm = convert.convert_unet_state_dict(unet)
        vae_sgm = convert.convert_vae_state_dict(vae)
    te1_sgm = convert.convert_openai_text_enc_state_dict(te1)
    te2_sgm = convert.convert_openclip_text_enc_state_dict(te2)
    for part, converted in [("unet", unet_sgm), ("vae", vae_sgm)]:
        left = [k for k in converted if any(f in k for f in DIFFUSERS_FRAGMENTS[part])]
        assert not left, f"{part}: keys the script left in diffusers layout: {left[:5]}"
    assert len(unet_sgm) == len(unet) and len(vae_sgm) == len(vae) and len(te1_sgm) == len(te1)
    assert len(te2_sgm) == len(te2) - 4 * te2_layers(te2)  # q/k/v weights and biases fused into in_proj_*

    state = {}
    state.update({f"model.diffusion_model.{k}": v for k, v in unet_sgm.items()})
    state.update({f"first_stage_model.{k}": v for k, v in vae_sgm.items()})
    state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in te1_sgm.items()})
    state.update({f"conditioner.embedders.1.model.{k}": v for k, v in te2_sgm.items()})
    # As the script's __main__ does after convert_openclip_text_enc_state_dict (its functions leave it out):
    # OpenCLIP keeps text_projection as a [width, projection_dim] matrix used as x @ P, i.e. transposed
    # relative to HF's Linear weight [projection_dim, width], and without ".weight".
    state["conditioner.embedders.1.model.text_projection"] = state.pop(
        "conditioner.embedders.1.model.text_projection.weight").T.contiguous()

    # Extras that sd_xl_base_1.0.safetensors carries and the script does not write (transformers no longer
    # saves position_ids, and HF's CLIPTextModelWithProjection has no logit_scale): CLIP-L's position ids
    # (int64 [1, 77]) and OpenCLIP's logit_scale (a float16 scalar, ln(100) ≈ 4.6055 there). Readers ignore both.
    positions = te1["text_model.embeddings.position_embedding.weight"].shape[0]
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(math.log(100.0))

    # Float16, like the released checkpoint (the script's --half casts everything; the int64 ids stay int64).
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sorted(state.items())}


def te2_layers(te2):
    return len({k.split(".")[3] for k in te2 if k.startswith("text_model.encoder.layers.")})


def check_sgm_layout(state):
    """Spot checks of the original layout (tiny-sdxl sizes: UNet 8/16/32, VAE 8/16/16/32, CLIP-L 8, CLIP-G 16 → 24)."""
    expected_shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": [8, 4, 3, 3],
        "model.diffusion_model.time_embed.0.weight": [32, 8],
        "model.diffusion_model.label_emb.0.0.weight": [32, 72],
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": [8, 8, 3, 3],
        "model.diffusion_model.input_blocks.3.0.op.weight": [8, 8, 3, 3],
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": [16, 8, 1, 1],
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": [16, 16],
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [16, 24],
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.ff.net.0.proj.weight": [256, 32],
        "model.diffusion_model.middle_block.1.transformer_blocks.2.attn1.to_out.0.weight": [32, 32],
        "model.diffusion_model.output_blocks.2.2.conv.weight": [32, 32, 3, 3],
        "model.diffusion_model.output_blocks.5.2.conv.weight": [16, 16, 3, 3],
        "model.diffusion_model.output_blocks.6.0.skip_connection.weight": [8, 24, 1, 1],
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": [8, 16, 1, 1],
        "model.diffusion_model.out.2.weight": [4, 8, 3, 3],
        "first_stage_model.encoder.down.0.block.0.conv1.weight": [8, 8, 3, 3],
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": [16, 8, 1, 1],
        "first_stage_model.encoder.down.2.downsample.conv.weight": [16, 16, 3, 3],
        "first_stage_model.encoder.mid.attn_1.q.weight": [32, 32, 1, 1],
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": [32, 32, 1, 1],
        "first_stage_model.encoder.norm_out.weight": [32],
        "first_stage_model.decoder.mid.attn_1.norm.weight": [32],
        "first_stage_model.decoder.mid.attn_1.v.weight": [32, 32, 1, 1],
        "first_stage_model.decoder.up.3.block.0.conv1.weight": [32, 32, 3, 3],  # diffusers up_blocks.0 (widest)
        "first_stage_model.decoder.up.0.block.1.conv2.weight": [8, 8, 3, 3],
        "first_stage_model.decoder.up.2.block.0.nin_shortcut.weight": [16, 32, 1, 1],  # diffusers up_blocks.1
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": [8, 16, 1, 1],
        "first_stage_model.decoder.up.3.upsample.conv.weight": [32, 32, 3, 3],
        "first_stage_model.quant_conv.weight": [8, 8, 1, 1],
        "first_stage_model.post_quant_conv.weight": [4, 4, 1, 1],
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 8],
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": [1, 77],
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight": [8, 8],
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [8],
        "conditioner.embedders.1.model.token_embedding.weight": [49408, 16],
        "conditioner.embedders.1.model.positional_embedding": [77, 16],
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": [48, 16],
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": [48],
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.out_proj.weight": [16, 16],
        "conditioner.embedders.1.model.transformer.resblocks.1.ln_1.weight": [16],
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight": [64, 16],
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.weight": [16, 64],
        "conditioner.embedders.1.model.ln_final.weight": [16],
        "conditioner.embedders.1.model.text_projection": [16, 24],
        "conditioner.embedders.1.model.logit_scale": [],
    }
    for key, shape in expected_shapes.items():
        assert key in state, f"missing {key}"
        assert list(state[key].shape) == shape, f"{key}: {list(state[key].shape)} != {shape}"
    prefixes = ["model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model."]
    assert all(any(k.startswith(p) for p in prefixes) for k in state)
    assert state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert all(v.dtype == torch.float16 for k, v in state.items() if not k.endswith("position_ids"))


@torch.no_grad()
def check_sgm_roundtrip(sgm_pipe, reference):
    """Every tensor of the from_single_file pipeline is the tiny-sdxl tensor rounded to float16, nothing more."""
    loaded = state_dicts(sgm_pipe)
    for name, ref in reference.items():
        got = loaded[name]
        assert set(got) == set(ref), f"{name}: keys differ: {sorted(set(got) ^ set(ref))[:5]}"
        for key, value in ref.items():
            expected = value.to(torch.float16).to(torch.float32) if value.is_floating_point() else value
            assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), f"{name}.{key} differs"
    assert sgm_pipe.scheduler.config == load_tiny().scheduler.config
    assert sgm_pipe.vae.config.scaling_factor == 0.13025
    return sum(len(sd) for sd in reference.values())


def make_sgm(convert, convert_digest):
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    state = build_sgm_checkpoint(convert)
    check_sgm_layout(state)
    save_file(state, str(SGM_FILE), metadata={"format": "pt"})

    # Load it back the way diffusers loads a single-file SDXL checkpoint. `config=` points at the diffusers
    # directory for every component's config: without it, diffusers infers the model type from
    # conditioner.embedders.1.model.transformer.resblocks.9.… (absent in a 3-layer CLIP-G) and would fetch
    # stable-diffusion-v1-5's configs from the Hub.
    sgm_pipe = StableDiffusionXLPipeline.from_single_file(
        str(SGM_FILE), config=str(TINY), dtype=torch.float32, add_watermarker=False, local_files_only=True)
    sgm_pipe.set_progress_bar_config(disable=True)
    tiny = load_tiny()
    reference = state_dicts(tiny)
    n_tensors = check_sgm_roundtrip(sgm_pipe, reference)

    # The same model from the diffusers directory with every weight rounded to f16 must give the same pixels.
    rounded = load_tiny()
    rounded.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for model in components(rounded).values():
            for p in model.parameters():
                p.copy_(p.to(torch.float16).to(torch.float32))

    records = []
    for case in SGM_CASES:
        record, image = run_case(sgm_pipe, case, GOLDEN, case["name"])
        _, same = run_case(rounded, case, GOLDEN, case["name"] + ".check")
        for suffix in [".check.png", ".check.noise.safetensors"]:
            (GOLDEN / (case["name"] + suffix)).unlink()
        assert np.array_equal(np.asarray(image), np.asarray(same)), f"{case['name']}: from_single_file ≠ f16-rounded"
        record["checkpoint"] = SGM_FILE.name
        records.append(record)
    mf.write_json(records, GOLDEN / "sgm_cases.json")
    return {"file": SGM_FILE.name, "tensors": len(state), "pipeline_tensors_checked": n_tensors,
            "convert_script_sha256": convert_digest}


# ----------------------------------------------------------------------------------------------
# B. LoRA files


def module_of(pipe, component, name):
    return dict(components(pipe)[component].named_modules())[name]


@torch.no_grad()
def random_lora(pipe, component, targets, seed, rank, alpha, up_std, rank_of=None, alpha_of=None):
    """A LoRA for one component as {module name: (down [r, in, (kh, kw)], up [out, r, (1, 1)], alpha)}, seeded.

    Module names are diffusers/transformers module paths of the loaded model. `rank_of` / `alpha_of` may
    override the rank / alpha per module (functions of the module name returning None for the default)."""
    model = components(pipe)[component]
    g = torch.Generator("cpu").manual_seed(seed)
    lora = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)), f"{component}.{name}: {type(module).__name__}"
        r = (rank_of(name) if rank_of else None) or rank
        a = (alpha_of(name) if alpha_of else None) or alpha
        w = module.weight
        fan_in = w[0].numel()
        down = torch.randn((r, *w.shape[1:]), generator=g) / math.sqrt(fan_in)
        up_shape = (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())
        up = torch.randn(up_shape, generator=g) * up_std
        lora[name] = (down, up, float(a))
    assert lora, f"no {component} module matches {targets}"
    return lora


def lora_delta(down, up, alpha):
    r = down.shape[0]
    delta = up.flatten(1).double() @ down.flatten(1).double()
    return (alpha / r) * delta.reshape(up.shape[0], *down.shape[1:])


def peft_state_dict(lora):
    """{module}.lora_A.weight / .lora_B.weight, as get_peft_model_state_dict names them."""
    out = {}
    for name, (down, up, _) in lora.items():
        out[f"{name}.lora_A.weight"] = down
        out[f"{name}.lora_B.weight"] = up
    return out


def add_peft_adapter(model, lora, config_kwargs):
    """Attach the LoRA with peft (diffusers' add_adapter for the UNet), set its weights, and return
    get_peft_model_state_dict(model) and the LoraConfig. Checks the adapter holds exactly `lora`."""
    config = LoraConfig(init_lora_weights=False, **config_kwargs)
    model.add_adapter(config)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in peft_state_dict(lora).items():
            name, kind = key.rsplit(".lora_", 1)
            params[f"{name}.lora_{kind[0]}.default.weight"].copy_(value)
    state = get_peft_model_state_dict(model)
    assert set(state) == set(peft_state_dict(lora)), sorted(set(state) ^ set(peft_state_dict(lora)))[:5]
    return state, config


def sgm_module_names(convert, unet):
    """{diffusers UNet module path: SGM module path}, by the single-file script's UNet key mapping."""
    mapping = convert.convert_unet_state_dict({k: k for k in unet.state_dict()})  # {sgm key: diffusers key}
    return {hf.removesuffix(".weight"): sgm.removesuffix(".weight") for sgm, hf in mapping.items()
            if hf.endswith(".weight")}


def sgm_lora_name(sgm_names, module):
    """A UNet module path → kohya's SDXL LoRA name (SGM blocks, dots → underscores)."""
    return "lora_unet_" + sgm_names[module].replace(".", "_")


def kohya_text_name(prefix, component, module):
    # Kohya names CLIP-L modules from transformers' classic layout (text_model.encoder.layers.…); transformers
    # >= 5.6's flat CLIPTextModel lacks the `text_model.` level, so it is put back.
    path = module if module.startswith("text_model.") or component == "text_encoder_2" else f"text_model.{module}"
    return f"{prefix}_{path.replace('.', '_')}"


@torch.no_grad()
def expected_fused(base, loras_with_scales):
    """{component: {param: value}}: base weights plus Σ scale · (alpha/r) · up @ down, computed in float64."""
    out = {}
    for lora, scale in loras_with_scales:
        for component, modules in lora.items():
            for name, (down, up, alpha) in modules.items():
                key = f"{name}.weight"
                current = out.setdefault(component, {}).get(key, base[component][key].double())
                out[component][key] = current + scale * lora_delta(down, up, alpha)
    return out


@torch.no_grad()
def check_fused(pipe, base, loras_with_scales):
    """After fuse_lora + unload_lora_weights: exactly the LoRA-targeted weights changed, each by what the file
    says (so no key was ignored, no alpha or scale lost), and nothing else. Returns the number of changed tensors."""
    fused = state_dicts(pipe)
    expected = expected_fused(base, loras_with_scales)
    changed = 0
    for component, ref in base.items():
        assert set(fused[component]) == set(ref), f"{component}: LoRA layers left after unload_lora_weights"
        for key, value in ref.items():
            want = expected.get(component, {}).get(key)
            got = fused[component][key]
            if want is None:
                assert torch.equal(got, value), f"{component}.{key} changed but no LoRA targets it"
                continue
            changed += 1
            assert not torch.equal(got, value), f"{component}.{key}: LoRA not applied"
            err = (got.double() - want).abs().max().item()
            scale = (want - value.double()).abs().max().item()
            assert err <= 1e-5 * max(1.0, value.abs().max().item()), f"{component}.{key}: off by {err} (delta {scale})"
    n_targets = sum(len(modules) for lora, _ in loras_with_scales for modules in lora.values())
    distinct = {(c, m) for lora, _ in loras_with_scales for c, modules in lora.items() for m in modules}
    assert changed == len(distinct) <= n_targets
    return changed


def lora_file_stats(path):
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    return keys, metadata


def make_loras(convert):
    LORA.mkdir(parents=True, exist_ok=True)
    tiny = load_tiny()
    tiny_unet_cfg = tiny.unet.config
    assert tiny_unet_cfg.layers_per_block == 2 and len(tiny_unet_cfg.block_out_channels) == 3

    # --- adapter 1: UNet r=4 alpha=8 (scale alpha/r = 2), attention, projections, feed-forward, resnet convs;
    #     text encoders r=4 alpha=2 (scale 0.5) on attention and MLP.
    unet_a = random_lora(tiny, "unet", UNET_TARGETS, seed=101, rank=4, alpha=8, up_std=0.1)
    te1_a = random_lora(tiny, "text_encoder", TEXT_TARGETS, seed=102, rank=4, alpha=2, up_std=0.3)
    te2_a = random_lora(tiny, "text_encoder_2", TEXT_TARGETS, seed=103, rank=4, alpha=2, up_std=0.3)

    # 1. peft_unet.safetensors: the UNet part, through peft and diffusers' save_lora_weights with the adapter
    #    config as metadata (diffusers' training scripts' _collate_lora_metadata).
    torch.manual_seed(0)  # peft's own init (overwritten) draws from the global generator
    unet_state, _ = add_peft_adapter(
        tiny.unet, unet_a, dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    metadata = _collate_lora_metadata({"unet": tiny.unet})
    # target_modules is a set (its order varies with PYTHONHASHSEED); sorted so that reruns give the same bytes.
    metadata["unet_lora_adapter_metadata"]["target_modules"] = sorted(metadata["unet_lora_adapter_metadata"]["target_modules"])
    out = LORA / "_peft_tmp"
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=unet_state, **metadata)
    shutil.move(out / "pytorch_lora_weights.safetensors", LORA / "peft_unet.safetensors")
    canonical_header(LORA / "peft_unet.safetensors")
    out.rmdir()
    tiny = load_tiny()  # without the peft layers

    # 2. kohya_diffusers_names.safetensors: UNet (same weights as peft_unet) + text encoders, converted by
    #    diffusers' convert_state_dict_to_kohya. That function writes `.alpha` = rank (int64), i.e. scale 1,
    #    whatever the adapter's lora_alpha was; it is overwritten with the real alphas (same dtype).
    te1_state = {f"text_encoder.{k}": v for k, v in peft_state_dict(te1_a).items()}
    te1_state = {k.replace("text_encoder.", "text_encoder.text_model.", 1) if not k.startswith("text_encoder.text_model.")
                 else k: v for k, v in te1_state.items()}  # classic CLIP-L paths (see kohya_text_name)
    te2_state = {f"text_encoder_2.{k}": v for k, v in peft_state_dict(te2_a).items()}
    peft_all = {**{f"unet.{k}": v for k, v in unet_state.items()}, **te1_state, **te2_state}
    kohya = convert_state_dict_to_kohya(peft_all)
    alphas = {}
    for component, lora, prefix in [("unet", unet_a, "lora_unet"), ("text_encoder", te1_a, "lora_te1"),
                                    ("text_encoder_2", te2_a, "lora_te2")]:
        for name, (_, _, alpha) in lora.items():
            path = name if component == "unet" else kohya_text_name("", component, name)[1:]
            key = f"{prefix}_{path.replace('.', '_')}.alpha"
            assert key in kohya and kohya[key].dtype == torch.int64 and kohya[key].item() == 4, key
            alphas[key] = torch.tensor(int(alpha))
    kohya.update(alphas)
    assert len(kohya) == 3 * (len(unet_a) + len(te1_a) + len(te2_a))
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(LORA / "kohya_diffusers_names.safetensors"))

    # --- adapter 2 (kohya_sgm_names): other weights, ranks and alphas varying per module kind, stored in f16
    #     as kohya sd-scripts does with --save_precision fp16.
    def unet_rank(name):
        return 2 if name.endswith(("conv1", "conv2")) else None  # LoCon-style conv_dim 2

    # Per-module alphas reach diffusers as a peft alpha_pattern, which diffusers 0.42.1 builds wrongly for two
    # kinds of modules, silently (peft only warns "alpha_pattern keys did not match"), so those modules fall
    # back to the file's most common alpha: attention projections (kohya's to_q/to_k/to_v/to_out_0 become
    # "…attn1.processor.to_q_lora.down.weight", whose alpha key never matches a module), and every CLIP-L module
    # (its keys keep "text_model.", which transformers 5's flat CLIPTextModel lacks). So the attention
    # projections share one alpha, which is also the most common one (224 of the 336 UNet modules), and CLIP-L has
    # one alpha; the other UNet kinds and CLIP-G's MLP differ (diffusers applies those correctly, checked).
    def unet_alpha(name):
        if name.endswith(("conv1", "conv2")):
            return 1.0            # r 2 → scale 0.5
        if name.endswith(("proj_in", "proj_out")):
            return 2.0            # scale 0.5
        if name.endswith(("ff.net.0.proj", "ff.net.2")):
            return 3.0            # scale 0.75
        return 8.0                # to_q/to_k/to_v/to_out.0: scale 2

    unet_b = random_lora(tiny, "unet", UNET_TARGETS, seed=201, rank=4, alpha=8, up_std=0.1,
                         rank_of=unet_rank, alpha_of=unet_alpha)
    te1_b = random_lora(tiny, "text_encoder", TEXT_TARGETS, seed=202, rank=4, alpha=2, up_std=0.3)
    te2_b = random_lora(tiny, "text_encoder_2", TEXT_TARGETS, seed=203, rank=4, alpha=1, up_std=0.3,
                        alpha_of=lambda n: 3.0 if n.endswith(("fc1", "fc2")) else None)
    # f16 storage: the reference LoRA is the f16-rounded one.
    for lora in (unet_b, te1_b, te2_b):
        for name, (down, up, alpha) in list(lora.items()):
            assert float(torch.tensor(alpha, dtype=torch.float16)) == alpha
            lora[name] = (down.half().float(), up.half().float(), alpha)
    sgm_names = sgm_module_names(convert, tiny.unet)
    sgm = {}
    for component, lora in [("unet", unet_b), ("text_encoder", te1_b), ("text_encoder_2", te2_b)]:
        for name, (down, up, alpha) in lora.items():
            if component == "unet":
                base = sgm_lora_name(sgm_names, name)
            else:
                base = kohya_text_name("lora_te1" if component == "text_encoder" else "lora_te2", component, name)
            sgm[f"{base}.lora_down.weight"] = down.half()
            sgm[f"{base}.lora_up.weight"] = up.half()
            sgm[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    assert len(sgm) == 3 * (len(unet_b) + len(te1_b) + len(te2_b))
    save_file({k: v.contiguous() for k, v in sgm.items()}, str(LORA / "kohya_sgm_names.safetensors"),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
                        "ss_base_model_version": "sdxl_base_v1-0"})
    canonical_header(LORA / "kohya_sgm_names.safetensors")

    adapters = {
        "peft_unet.safetensors": {"unet": unet_a},
        "kohya_diffusers_names.safetensors": {"unet": unet_a, "text_encoder": te1_a, "text_encoder_2": te2_a},
        "kohya_sgm_names.safetensors": {"unet": unet_b, "text_encoder": te1_b, "text_encoder_2": te2_b},
    }
    return adapters


def make_lora_goldens(adapters):
    base_pipe = load_tiny()
    base_pipe.set_progress_bar_config(disable=True)
    base = state_dicts(base_pipe)
    base_images = {}
    for case in LORA_CASES:
        _, base_images[case["name"]] = run_case(base_pipe, case, GOLDEN, "_base")
    for suffix in [".png", ".noise.safetensors"]:
        (GOLDEN / f"_base{suffix}").unlink()

    runs = [
        [("peft_unet.safetensors", 0.8)],
        [("kohya_diffusers_names.safetensors", 1.0)],
        [("kohya_sgm_names.safetensors", 0.6)],
        [("peft_unet.safetensors", 0.5), ("kohya_sgm_names.safetensors", 0.7)],
    ]
    records, checks = [], {}
    for run in runs:
        pipe = load_tiny()
        pipe.set_progress_bar_config(disable=True)
        if len(run) == 1:
            (file, scale), = run
            pipe.load_lora_weights(str(LORA / file))
            pipe.fuse_lora(lora_scale=scale)
            label = file.removesuffix(".safetensors")
        else:
            names = []
            for i, (file, _) in enumerate(run):
                names.append(f"lora{i}")
                pipe.load_lora_weights(str(LORA / file), adapter_name=names[-1])
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in run])
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            label = "two_loras"
        pipe.unload_lora_weights()  # keeps the fused weights, removes the LoRA layers
        changed = check_fused(pipe, base, [(adapters[file], scale) for file, scale in run])
        checks[label] = {"changed_tensors": changed}
        for case in LORA_CASES:
            name = f"{label}_{case['name']}"
            record, image = run_case(pipe, case, GOLDEN, name)
            difference = mad(image, base_images[case["name"]])
            assert difference > 5, f"{name}: only {difference:.2f} mean abs pixel difference from the base model"
            if len(run) == 1:
                record.update({"lora": run[0][0], "lora_scale": run[0][1]})
            record["loras"] = [[file, scale] for file, scale in run]
            record["mad_vs_base"] = round(difference, 2)
            records.append(record)
    mf.write_json(records, GOLDEN / "lora_cases.json")
    return checks


@torch.no_grad()
def probe_alpha_quirks():
    """What diffusers does with per-module alphas it cannot place (recorded in info.json, not in any golden):
    kohya_sgm_names with one attention projection and one CLIP-L module given an alpha of their own."""
    state = load_file(str(LORA / "kohya_sgm_names.safetensors"))
    unet_key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
    te1_key = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    state[f"{unet_key}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    state[f"{te1_key}.alpha"] = torch.tensor(6.0, dtype=torch.float16)
    pipe = load_tiny()
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's "alpha_pattern keys did not match" is the point here
        pipe.load_lora_weights(state)
    unet_mod = module_of(pipe, "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    te1_mod = module_of(pipe, "text_encoder", "encoder.layers.0.mlp.fc1")
    return {
        "unet_attn2_to_q_alpha_2_rank_4": {"expected_scaling": 0.5, "diffusers_scaling": unet_mod.scaling["default_0"]},
        "te1_fc1_alpha_6_rank_4": {"expected_scaling": 1.5, "diffusers_scaling": te1_mod.scaling["default_0"]},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--convert-script", required=True, type=Path,
                        help="diffusers' scripts/convert_diffusers_to_original_sdxl.py (from the GitHub repository)")
    args = parser.parse_args()

    assert torch.backends.cpu.get_cpu_capability() == "AVX2", "ATEN_CPU_CAPABILITY=avx2 did not take effect"
    torch.set_num_threads(1)
    assert (TINY / "model_index.json").exists(), "run make_fixtures.py first"
    convert, digest = load_convert_script(args.convert_script)
    for generated in [CHECKPOINTS, LORA, GOLDEN]:
        shutil.rmtree(generated, ignore_errors=True)
    GOLDEN.mkdir(parents=True)

    with mf.quiet_diffusers():
        sgm = make_sgm(convert, digest)
        adapters = make_loras(convert)
        checks = make_lora_goldens(adapters)
        quirks = probe_alpha_quirks()
    versions = mf.library_versions()
    versions["peft"] = importlib.metadata.version("peft")
    versions["convert_diffusers_to_original_sdxl_sha256"] = digest
    mf.write_json({"versions": versions, "sgm": sgm, "lora_checks": checks,
                   "diffusers_alpha_quirks": quirks}, GOLDEN / "info.json")
    print(json.dumps({"sgm": sgm, "lora_checks": checks, "diffusers_alpha_quirks": quirks}, indent=1))


if __name__ == "__main__":
    main()
