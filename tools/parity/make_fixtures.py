"""Make the parity fixtures for `sdxl-models` from diffusers (the numerical reference).

Writes, under crates/sdxl-models/tests/fixtures/:
  tiny-sdxl/          an SDXL-shaped pipeline with random weights, float32 *.safetensors
  tiny-2level-fp16/   a differently shaped pipeline, float16 *.fp16.safetensors
  golden/             what diffusers/transformers/torch compute from them on the CPU in float32
                      (text-to-image with StableDiffusionXLPipeline; img2img and inpainting with
                      StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline, VAE mean
                      instead of a sample)

Every golden output comes from reloading a saved model directory, never from the in-memory
objects that wrote it. Random numbers come from fixed seeds, so a rerun gives the same files.

Run from the repository root:  python tools/parity/make_fixtures.py
"""

import os

# torch's vectorised randn (what x86-64 machines with AVX2 or AVX-512 run by default) differs from its
# scalar path in the last bits for tensors of 16 or more elements. Pin the AVX2 kernels, which AVX-512
# machines give bit for bit too, so the goldens are what diffusers draws on a typical x86 machine and
# what `sdxl_models::noise::randn` reproduces, whichever machine made them. Must precede importing torch.
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"

import contextlib  # noqa: E402
import gzip  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module  # noqa: E402
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as inpaint_module  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "sdxl-models" / "tests" / "fixtures"
GOLDEN = FIXTURES / "golden"

CAT = "a photo of a cat wearing a tiny hat"
LONG_PROMPT = (
    "an extremely detailed oil painting of a red fox sitting in a snowy birch forest at dawn, soft golden "
    "light, mist between the trees, footprints in the snow, a frozen river in the background, crows on the "
    "branches, dramatic clouds, highly detailed fur, volumetric lighting, cinematic composition, 35mm film "
    "grain, muted colour palette, award winning wildlife photography, trending on artstation, sharp focus, "
    "intricate details, masterpiece, best quality, ultra realistic, eight k resolution"
)

# Prompts for golden/tokenizer.json; the tokenizer folders are also checked against them.
TOKENIZER_PROMPTS = [
    CAT,
    "",
    "Hello, World!",
    "wow!!! amazing!! really?!",
    "1234567890 and 3.14159, 2024-01-31",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "café crème brûlée naïve résumé",
    "ÅNGSTRÖM Ωmega STRASSE straße",
    "cafe\u0301 (combining acute accent)",
    "emoji 😀🐱🎩 party 🎉👍🏽",
    "multiple   spaces\n\nnewlines\tand\ttabs",
    "   leading and trailing whitespace   ",
    "don't stop, it's fine, we're here, i've got it, you'll see, i'm ok, he'd go",
    "DON'T IT'S WE'RE",
    "state-of-the-art, well-known x-ray self-portrait",
    "a cat <|endoftext|> on a mat <|endoftext|>",
    "<|startoftext|>a cat",
    "<|EndOfText|> is not special when capitalised",
    "punctuation... !!! ??? ;;; :: -- (( )) [[ ]] {{ }}",
    "hashtag #sdxl @user $100 50% a&b a+b=c",
    "中文 日本語のテキスト 한국어",
    "under_score snake_case CamelCase",
    "quotes \"double\" 'single' `back` «guillemets»",
    "https://example.com/path?q=1&r=2",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["a"] * 75),  # 75 words: exactly 77 ids with BOS and EOS, no truncation
    " ".join(["a"] * 76),  # 76 words: truncated, the last word replaced by EOS
    "½ ² ™ © ﬁ (NFC keeps compatibility characters)",
    "non\u00a0breaking\u00a0space and zero\u200bwidth",
    LONG_PROMPT,
]

CLIP_TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)

# Model shapes. The widths are as small as they are so that the fixtures fit in 18 MB (README.md says why).
MODELS = {
    "tiny-sdxl": dict(
        dtype=torch.float32,
        variant=None,
        text_encoder=dict(hidden_size=8, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                          hidden_act="quick_gelu", projection_dim=16),
        text_encoder_2=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            hidden_act="gelu", projection_dim=24),
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 2, 3), cross_attention_dim=8 + 16, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 24,
            norm_num_groups=8,
        ),
        vae=dict(
            in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 32),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.13025, sample_size=64,
        ),
        scheduler=dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1, interpolation_type="linear",
            use_karras_sigmas=False,
        ),
        vae_latent_hw=(5, 3),
        cases=[
            dict(name="g0_64x64_4steps", width=64, height=64, steps=4, guidance=0.0, seed=0, trace_latents=True),
            dict(name="g5_neg_64x64_2steps", width=64, height=64, steps=2, guidance=5.0, seed=1,
                 negative_prompt="blurry, low quality"),
            dict(name="g5_zeros_64x48_2steps", width=64, height=48, steps=2, guidance=5.0, seed=42),
            dict(name="g0_96x48_8steps", width=96, height=48, steps=8, guidance=0.0, seed=7),
            dict(name="g0_48x96_1step", width=48, height=96, steps=1, guidance=0.0, seed=1234),
            dict(name="generator_48x64_2steps", width=48, height=64, steps=2, guidance=0.0, seed=12345, generator=True),
            dict(name="long_prompt_g5_64x64_2steps", width=64, height=64, steps=2, guidance=5.0, seed=3,
                 prompt=LONG_PROMPT, negative_prompt="blurry"),
            dict(name="odd_latent_72x40_3steps", width=72, height=40, steps=3, guidance=0.0, seed=5),
        ],
        # img2img / inpainting (golden_edits). sNN = strength 0.NN, s1 = strength 1.0. `input_size` (w, h):
        # the input image (and mask) have that size instead of the output's. `trace`: edit_trace.safetensors.
        edit_cases=[
            dict(name="i2i_s05_g0_64x64_4steps", mode="img2img", width=64, height=64, steps=4, guidance=0.0,
                 strength=0.5, seed=20, trace=True),
            dict(name="i2i_s1_g0_64x48_2steps", mode="img2img", width=64, height=48, steps=2, guidance=0.0,
                 strength=1.0, seed=21),
            dict(name="i2i_s03_g5_neg_64x64_8steps", mode="img2img", width=64, height=64, steps=8, guidance=5.0,
                 strength=0.3, seed=22, negative_prompt="blurry, low quality"),
            dict(name="i2i_s075_g5_zeros_48x64_4steps", mode="img2img", width=48, height=64, steps=4, guidance=5.0,
                 strength=0.75, seed=23),
            dict(name="i2i_generator_s06_64x64_4steps", mode="img2img", width=64, height=64, steps=4, guidance=0.0,
                 strength=0.6, seed=24, generator=True),
            dict(name="i2i_resize_80x56_to_64x48_s05_4steps", mode="img2img", width=64, height=48, steps=4,
                 guidance=0.0, strength=0.5, seed=25, input_size=(80, 56)),
            dict(name="inp_s1_g0_64x64_4steps", mode="inpaint", width=64, height=64, steps=4, guidance=0.0,
                 strength=1.0, seed=30),
            dict(name="inp_s06_g0_64x64_4steps", mode="inpaint", width=64, height=64, steps=4, guidance=0.0,
                 strength=0.6, seed=31, trace=True),
            dict(name="inp_s05_g5_neg_64x48_3steps", mode="inpaint", width=64, height=48, steps=3, guidance=5.0,
                 strength=0.5, seed=32, negative_prompt="blurry, low quality"),
            dict(name="inp_generator_s1_64x64_4steps", mode="inpaint", width=64, height=64, steps=4, guidance=0.0,
                 strength=1.0, seed=33, generator=True),
            dict(name="inp_generator_s07_72x40_4steps", mode="inpaint", width=72, height=40, steps=4, guidance=0.0,
                 strength=0.7, seed=34, generator=True),
            dict(name="inp_rgb_mask_s08_64x64_4steps", mode="inpaint", width=64, height=64, steps=4, guidance=0.0,
                 strength=0.8, seed=35, rgb_mask=True),
            dict(name="inp_resize_44x64_to_64x48_s075_4steps", mode="inpaint", width=64, height=48, steps=4,
                 guidance=0.0, strength=0.75, seed=36, input_size=(44, 64)),
        ],
    ),
    "tiny-2level-fp16": dict(
        dtype=torch.float16,
        variant="fp16",
        text_encoder=dict(hidden_size=4, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          hidden_act="gelu", projection_dim=8),
        text_encoder_2=dict(hidden_size=8, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="quick_gelu", projection_dim=12),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 48), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(2, 3),
            transformer_layers_per_block=(2, 1), cross_attention_dim=4 + 8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 12,
            norm_num_groups=4,
        ),
        vae=dict(
            in_channels=3, out_channels=3, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=2, latent_channels=4, norm_num_groups=2, scaling_factor=0.18215, sample_size=32,
        ),
        scheduler=dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        ),
        vae_latent_hw=(5, 3),
        cases=[
            dict(name="g0_32x32_4steps", width=32, height=32, steps=4, guidance=0.0, seed=0, trace_latents=True),
            dict(name="g5_neg_32x32_2steps", width=32, height=32, steps=2, guidance=5.0, seed=1,
                 negative_prompt="blurry, low quality"),
            dict(name="g5_zeros_40x24_3steps", width=40, height=24, steps=3, guidance=5.0, seed=42),
            dict(name="g0_24x40_8steps", width=24, height=40, steps=8, guidance=0.0, seed=7),
            dict(name="g0_48x16_1step", width=48, height=16, steps=1, guidance=0.0, seed=1234),
            dict(name="generator_32x48_2steps", width=32, height=48, steps=2, guidance=0.0, seed=12345, generator=True),
            dict(name="long_prompt_g5_32x32_2steps", width=32, height=32, steps=2, guidance=5.0, seed=3,
                 prompt=LONG_PROMPT, negative_prompt="blurry"),
        ],
        edit_cases=[
            dict(name="i2i_s05_g0_32x32_4steps", mode="img2img", width=32, height=32, steps=4, guidance=0.0,
                 strength=0.5, seed=20, trace=True),
            dict(name="i2i_s1_g0_40x24_2steps", mode="img2img", width=40, height=24, steps=2, guidance=0.0,
                 strength=1.0, seed=21),
            dict(name="i2i_s03_g5_neg_32x32_8steps", mode="img2img", width=32, height=32, steps=8, guidance=5.0,
                 strength=0.3, seed=22, negative_prompt="blurry, low quality"),
            dict(name="i2i_s075_g5_zeros_24x40_4steps", mode="img2img", width=24, height=40, steps=4, guidance=5.0,
                 strength=0.75, seed=23),
            dict(name="i2i_generator_s06_32x32_4steps", mode="img2img", width=32, height=32, steps=4, guidance=0.0,
                 strength=0.6, seed=24, generator=True),
            dict(name="i2i_resize_44x30_to_32x24_s05_4steps", mode="img2img", width=32, height=24, steps=4,
                 guidance=0.0, strength=0.5, seed=25, input_size=(44, 30)),
            dict(name="inp_s1_g0_32x32_4steps", mode="inpaint", width=32, height=32, steps=4, guidance=0.0,
                 strength=1.0, seed=30),
            dict(name="inp_s06_g0_32x32_4steps", mode="inpaint", width=32, height=32, steps=4, guidance=0.0,
                 strength=0.6, seed=31, trace=True),
            dict(name="inp_s05_g5_neg_40x24_3steps", mode="inpaint", width=40, height=24, steps=3, guidance=5.0,
                 strength=0.5, seed=32, negative_prompt="blurry, low quality"),
            dict(name="inp_generator_s1_32x32_4steps", mode="inpaint", width=32, height=32, steps=4, guidance=0.0,
                 strength=1.0, seed=33, generator=True),
            dict(name="inp_generator_s07_24x40_4steps", mode="inpaint", width=24, height=40, steps=4, guidance=0.0,
                 strength=0.7, seed=34, generator=True),
            dict(name="inp_rgb_mask_s08_32x32_4steps", mode="inpaint", width=32, height=32, steps=4, guidance=0.0,
                 strength=0.8, seed=35, rgb_mask=True),
            dict(name="inp_resize_26x36_to_40x24_s075_4steps", mode="inpaint", width=40, height=24, steps=4,
                 guidance=0.0, strength=0.75, seed=36, input_size=(26, 36)),
        ],
    ),
}

NOISE_SEEDS = [0, 1, 5, 42, 1234, 2**31 - 1, 2**32 - 1, 2**32 + 5, 2**63 - 1, 2**64 - 1]
NOISE_SHAPES = [[1], [5], [15], [16], [17], [1, 4, 1, 1], [1, 4, 8, 6], [1, 4, 16, 12], [3, 7, 11]]


# ----------------------------------------------------------------------------------------------
# small helpers


def floats(t):
    """A float32 tensor as a list of Python floats (exactly the float32 values)."""
    return t.to(torch.float32).flatten().tolist()


def randn(shape, seed):
    """torch.randn on a seeded CPU generator, as diffusers' randn_tensor draws it."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def save_tensors(tensors, path):
    """Save a dict of tensors as contiguous float32 (integer tensors keep their dtype)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        out[name] = (t.to(torch.float32) if t.is_floating_point() else t).clone().contiguous()
    save_file(out, str(path))


def write_json(obj, path):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_json_lines(items, path):
    """A JSON array with one element per line: readable and diff-friendly."""
    body = ",\n".join(json.dumps(item, ensure_ascii=False) for item in items)
    path.write_text("[\n" + body + "\n]\n", encoding="utf-8")


def library_versions():
    names = ["torch", "diffusers", "transformers", "tokenizers", "safetensors", "open_clip_torch", "numpy", "pillow"]
    versions = {name: importlib.metadata.version(name) for name in names}
    versions["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return versions


# ----------------------------------------------------------------------------------------------
# CLIP tokenizer files


def byte_symbols():
    """The 256 symbols of CLIP's byte-level alphabet, in vocabulary order.

    Printable bytes come first and stand for themselves ("!" is id 0); the remaining bytes follow in
    byte order, shifted to code points 256, 257, ... so that every symbol is a visible character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_vocab_and_merges():
    """The real CLIP BPE (49408 tokens) from open_clip's bpe_simple_vocab_16e6.txt.gz.

    The vocabulary is: the 256 byte symbols, the same with the end-of-word marker `</w>`, one token per
    merge (in merge order), then <|startoftext|> (49406) and <|endoftext|> (49407).
    """
    package_dir = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    lines = gzip.open(package_dir / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    n_merges = 49408 - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]  # line 0 is a header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 and len(set(tokens)) == 49408 and tokens[0] == "!"
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizer(vocab, merges, pad_token):
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def token_ids(tokenizer, prompt):
    """Ids exactly as diffusers' encode_prompt asks for them."""
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def special_token(content):
    # normalized: false for all three, as transformers saves them. (SDXL's own files mark
    # <|startoftext|> normalized: true, which would make "<|StartOfText|>" match it too.)
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def rewrite_tokenizer_folder(folder, vocab, merges, pad_token):
    """Give a saved tokenizer folder the SDXL base repository's layout.

    transformers 5 saves only tokenizer.json + tokenizer_config.json. SDXL ships vocab.json, merges.txt,
    special_tokens_map.json and tokenizer_config.json and no tokenizer.json. The ids of the reloaded
    folder are checked against the ids of the folder as transformers saved it.
    """
    saved = CLIPTokenizer.from_pretrained(folder)
    expected = [token_ids(saved, p) for p in TOKENIZER_PROMPTS]

    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    write_json(
        {
            "bos_token": special_token("<|startoftext|>"),
            "eos_token": special_token("<|endoftext|>"),
            "pad_token": pad_token,
            "unk_token": special_token("<|endoftext|>"),
        },
        folder / "special_tokens_map.json",
    )
    # The pad token is an added special token: tokenizer_2's "!" (id 0) is split out of the text before
    # BPE, exactly like <|endoftext|>.
    added = {str(vocab[t]): {**special_token(t), "special": True}
             for t in sorted({pad_token, "<|startoftext|>", "<|endoftext|>"}, key=vocab.get)}
    write_json(
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
        folder / "tokenizer_config.json",
    )

    reloaded = CLIPTokenizer.from_pretrained(folder)
    for prompt, ids in zip(TOKENIZER_PROMPTS, expected):
        assert token_ids(reloaded, prompt) == ids, f"{folder}: ids changed after rewrite for {prompt!r}"


# ----------------------------------------------------------------------------------------------
# tiny models


@torch.no_grad()
def perturb_(model, seed):
    """Replace every parameter with seeded random values so that no path sits at zero.

    Linear/conv weights ~ N(0, 1/fan_in); biases ~ N(0, 0.1^2); norm weights ~ 1 + N(0, 0.1^2), norm
    biases ~ N(0, 0.1^2); embeddings ~ N(0, 0.02^2). Zero-initialised layers (conv_out, proj_out, to_out)
    become non-zero like the rest.
    """
    g = torch.Generator("cpu").manual_seed(seed)

    def draw(p, std, mean=0.0):
        p.copy_(mean + std * torch.randn(p.shape, generator=g))

    touched = set()
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            draw(module.weight, 1.0 / math.sqrt(module.weight[0].numel()))
            if module.bias is not None:
                draw(module.bias, 0.1)
        elif isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            draw(module.weight, 0.1, mean=1.0)
            draw(module.bias, 0.1)
        elif isinstance(module, torch.nn.Embedding):
            draw(module.weight, 0.02)
        else:
            raise TypeError(f"no perturbation rule for {type(module).__name__} ({list(params)})")
        touched.update(id(p) for p in params.values())
    missed = [name for name, p in model.named_parameters() if id(p) not in touched]
    assert not missed, f"parameters left unperturbed: {missed}"


def build_pipeline(name, spec, vocab, merges):
    """A float32 pipeline with random weights (seeded per component)."""
    base_seed = sum(name.encode())
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_COMMON, **spec["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_COMMON, **spec["text_encoder_2"]))
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    for offset, model in enumerate([text_encoder, text_encoder_2, unet, vae]):
        perturb_(model, base_seed + offset)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_tokenizer(vocab, merges, "<|endoftext|>"),
        tokenizer_2=make_tokenizer(vocab, merges, "!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**spec["scheduler"]),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_model(name, spec, vocab, merges):
    """Build, perturb in float32, save in the model's storage dtype; returns the directory."""
    directory = FIXTURES / name
    pipe = build_pipeline(name, spec, vocab, merges)
    pipe.to(dtype=spec["dtype"])
    pipe.save_pretrained(directory, safe_serialization=True, variant=spec["variant"])
    rewrite_tokenizer_folder(directory / "tokenizer", vocab, merges, "<|endoftext|>")
    rewrite_tokenizer_folder(directory / "tokenizer_2", vocab, merges, "!")
    index = json.loads((directory / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    return directory


def load_model(directory, spec):
    """The saved directory, loaded the way the goldens are computed: float32 on the CPU."""
    return StableDiffusionXLPipeline.from_pretrained(
        directory, dtype=torch.float32, variant=spec["variant"], add_watermarker=False
    )


def vae_scale_factor(pipe):
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------
# goldens shared by both models


def golden_tokenizer(pipe):
    records = [
        {"prompt": p, "ids": token_ids(pipe.tokenizer, p), "ids_2": token_ids(pipe.tokenizer_2, p)}
        for p in TOKENIZER_PROMPTS
    ]
    write_json_lines(records, GOLDEN / "tokenizer.json")


def golden_noise():
    tensors, records = {}, []
    for seed in NOISE_SEEDS:
        for shape in NOISE_SHAPES:
            name = f"seed{seed}_" + "x".join(map(str, shape))
            tensors[name] = randn(shape, seed)
            records.append({"name": name, "seed": seed, "shape": shape})
    save_tensors(tensors, GOLDEN / "noise.safetensors")
    write_json_lines(records, GOLDEN / "noise.json")


def scheduler_config(scheduler):
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def golden_scheduler():
    records = []
    for spacing in ["leading", "linspace", "trailing"]:
        for beta_schedule in ["scaled_linear", "linear", "squaredcos_cap_v2"]:
            for steps in [1, 2, 3, 4, 8, 20]:
                for steps_offset in [0, 1]:
                    scheduler = EulerDiscreteScheduler(
                        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
                        timestep_spacing=spacing, steps_offset=steps_offset,
                    )
                    scheduler.set_timesteps(steps)
                    records.append({
                        "config": scheduler_config(scheduler),
                        "steps": steps,
                        "timesteps": floats(scheduler.timesteps),
                        "sigmas": floats(scheduler.sigmas),
                        "init_noise_sigma": float(scheduler.init_noise_sigma),
                    })
    write_json_lines(records, GOLDEN / "scheduler.json")


def golden_scheduler_step():
    """scale_model_input / step / add_noise on a 3-step trailing schedule, inputs and outputs recorded."""
    shape = [1, 4, 2, 3]
    tensors = {"sample": randn(shape, 100), "noise": randn(shape, 101)}
    for i in range(3):
        tensors[f"model_output_{i}"] = randn(shape, 102 + i)
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                timestep_spacing="trailing", steps_offset=1)
    calls = []
    for prediction_type in ["epsilon", "sample", "v_prediction"]:
        scheduler = EulerDiscreteScheduler(**base, prediction_type=prediction_type)
        scheduler.set_timesteps(3)
        sample = tensors["sample"] * scheduler.init_noise_sigma
        tensors[f"{prediction_type}_initial"] = sample
        for i, t in enumerate(scheduler.timesteps):
            prefix = f"{prediction_type}_{i}"
            sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
            tensors[f"{prefix}_scaled"] = scheduler.scale_model_input(sample, t)
            out = scheduler.step(tensors[f"model_output_{i}"], t, sample)
            tensors[f"{prefix}_prev_sample"] = out.prev_sample
            tensors[f"{prefix}_pred_original_sample"] = out.pred_original_sample
            common = {"prediction_type": prediction_type, "step_index": i, "timestep": float(t),
                      "sigma": sigma, "sigma_next": sigma_next}
            input_name = f"{prediction_type}_initial" if i == 0 else f"{prediction_type}_{i - 1}_prev_sample"
            calls.append({"call": "scale_model_input", **common, "inputs": {"sample": input_name},
                          "outputs": {"scaled": f"{prefix}_scaled"}})
            calls.append({"call": "step", **common,
                          "inputs": {"model_output": f"model_output_{i}", "sample": input_name},
                          "outputs": {"prev_sample": f"{prefix}_prev_sample",
                                      "pred_original_sample": f"{prefix}_pred_original_sample"}})
            sample = out.prev_sample

    scheduler = EulerDiscreteScheduler(**base)
    scheduler.set_timesteps(3)
    for i, t in enumerate(scheduler.timesteps):
        tensors[f"add_noise_{i}"] = scheduler.add_noise(tensors["sample"], tensors["noise"], t.reshape(1))
        calls.append({"call": "add_noise", "prediction_type": "epsilon", "step_index": i, "timestep": float(t),
                      "sigma": float(scheduler.sigmas[i]),
                      "inputs": {"original_samples": "sample", "noise": "noise"},
                      "outputs": {"noisy_samples": f"add_noise_{i}"}})

    save_tensors(tensors, GOLDEN / "scheduler_step.safetensors")
    write_json({"config": scheduler_config(scheduler), "steps": 3, "timesteps": floats(scheduler.timesteps),
                "sigmas": floats(scheduler.sigmas), "calls": calls}, GOLDEN / "scheduler_step.json")


# ----------------------------------------------------------------------------------------------
# per-model goldens


@torch.no_grad()
def golden_text(pipe, out_dir):
    tensors = {}
    for key, prompt in [("cat", CAT), ("empty", ""), ("eot", "a cat <|endoftext|> on a mat")]:
        ids = torch.tensor([token_ids(pipe.tokenizer, prompt)])
        ids_2 = torch.tensor([token_ids(pipe.tokenizer_2, prompt)])
        out_1 = pipe.text_encoder(ids, output_hidden_states=True)
        out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        tensors.update({
            f"{key}_ids": ids,
            f"{key}_ids_2": ids_2,
            f"{key}_hidden_1": out_1.hidden_states[-2],
            f"{key}_last_1": out_1.last_hidden_state,
            f"{key}_pooled_1": out_1.pooler_output,
            f"{key}_hidden_2": out_2.hidden_states[-2],
            f"{key}_last_2": out_2.last_hidden_state,
            f"{key}_pooled_2": out_2.text_embeds,
        })
    for key, negative in [("blurry", "blurry"), ("zeros", None)]:
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            CAT, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative
        )
        tensors.update({
            f"encode_cat_{key}_prompt_embeds": embeds,
            f"encode_cat_{key}_negative_prompt_embeds": negative_embeds,
            f"encode_cat_{key}_pooled": pooled,
            f"encode_cat_{key}_negative_pooled": negative_pooled,
        })
    assert not tensors["encode_cat_zeros_negative_prompt_embeds"].any()
    save_tensors(tensors, out_dir / "text.safetensors")


def hook_outputs(modules):
    """Forward hooks that store each named module's output (first element if it returns a tuple)."""
    store, handles = {}, []
    for name, module in modules.items():
        def hook(_module, _inputs, output, name=name):
            store[name] = output[0] if isinstance(output, tuple) else output
        handles.append(module.register_forward_hook(hook))
    return store, handles


@torch.no_grad()
def unet_forward(unet, prefix, sample, timestep, context, text_embeds, time_ids):
    modules = {"time_proj": unet.time_proj, "time_emb": unet.time_embedding,
               "add_time_proj": unet.add_time_proj, "add_emb": unet.add_embedding, "conv_in": unet.conv_in,
               "mid": unet.mid_block}
    modules.update({f"down_{i}": block for i, block in enumerate(unet.down_blocks)})
    modules.update({f"up_{i}": block for i, block in enumerate(unet.up_blocks)})
    store, handles = hook_outputs(modules)
    output = unet(sample, timestep, encoder_hidden_states=context,
                  added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    for handle in handles:
        handle.remove()
    store["emb"] = store["time_emb"] + store["add_emb"]
    tensors = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context,
               "text_embeds": text_embeds, "time_ids": time_ids, "output": output, **store}
    return {prefix + k: v for k, v in tensors.items()}


def golden_unet(pipe, out_dir):
    unet = pipe.unet
    cross, proj = unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim
    g = torch.Generator("cpu").manual_seed(2024)
    tensors = unet_forward(
        unet, "",
        sample=torch.randn(2, 4, 6, 5, generator=g),  # odd size: the up path must resize to the skips
        timestep=torch.tensor(757.0),
        context=torch.randn(2, 77, cross, generator=g),
        text_embeds=torch.randn(2, proj, generator=g),
        time_ids=torch.tensor([[48.0, 64.0, 0.0, 0.0, 48.0, 64.0], [1024.0, 768.0, 16.0, 8.0, 1024.0, 768.0]]),
    )
    tensors.update(unet_forward(
        unet, "b1_",
        sample=torch.randn(1, 4, 8, 6, generator=g),
        timestep=torch.tensor(999.0),
        context=torch.randn(1, 77, cross, generator=g),
        text_embeds=torch.randn(1, proj, generator=g),
        time_ids=torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]]),
    ))
    save_tensors(tensors, out_dir / "unet.safetensors")


@torch.no_grad()
def golden_vae(pipe, spec, out_dir):
    vae = pipe.vae
    g = torch.Generator("cpu").manual_seed(2025)
    h, w = spec["vae_latent_hw"]
    latents = torch.randn(1, vae.config.latent_channels, h, w, generator=g)
    modules = {"post_quant_conv": vae.post_quant_conv, "conv_in": vae.decoder.conv_in, "mid": vae.decoder.mid_block}
    modules.update({f"up_{i}": block for i, block in enumerate(vae.decoder.up_blocks)})
    store, handles = hook_outputs(modules)
    decoded = vae.decode(latents).sample
    for handle in handles:
        handle.remove()
    factor = vae_scale_factor(pipe)
    image = torch.rand(1, 3, h * factor, w * factor, generator=g) * 2 - 1
    encoded_mean = vae.encode(image).latent_dist.mean
    save_tensors({"latents": latents, "decoded": decoded, **store, "enc_image": image, "enc_mean": encoded_mean},
                 out_dir / "vae.safetensors")


@torch.no_grad()
def golden_vae_tiled(pipe, out_dir):
    """Latents larger than the VAE's tile, decoded by diffusers' tiled decoder (`enable_tiling`):
    two and a half tiles high and not quite two wide, so the last row and column are partial."""
    vae = pipe.vae
    g = torch.Generator("cpu").manual_seed(2026)
    tile = vae.tile_latent_min_size
    latents = torch.randn(1, vae.config.latent_channels, 2 * tile + tile // 2, tile + tile // 2 + 2, generator=g)
    vae.enable_tiling()
    try:
        decoded = vae.decode(latents).sample
    finally:
        vae.disable_tiling()
    save_tensors({"latents": latents, "decoded": decoded}, out_dir / "vae_tiled.safetensors")


def check_image(image, name):
    pixels = np.asarray(image, dtype=np.float64)
    saturated = np.mean((pixels == 0) | (pixels == 255))
    assert pixels.std() > 10, f"{name}: image is flat (std {pixels.std():.2f})"
    assert saturated < 0.5, f"{name}: {saturated:.0%} of the pixel values are saturated"
    return {"pixel_std": round(float(pixels.std()), 2), "saturated_fraction": round(float(saturated), 4)}


def golden_cases(pipe, spec, out_dir):
    records = []
    factor = vae_scale_factor(pipe)
    for case in spec["cases"]:
        name = case["name"]
        prompt = case.get("prompt", CAT)
        negative = case.get("negative_prompt")
        shape = [1, pipe.unet.config.in_channels, case["height"] // factor, case["width"] // factor]
        noise = randn(shape, case["seed"])
        save_tensors({"noise": noise}, out_dir / f"{name}.noise.safetensors")
        trace = {}

        def record_latents(_pipe, i, _t, kwargs):
            trace[f"step_{i}"] = kwargs["latents"].clone()
            return {}

        noise_args = ({"generator": torch.Generator("cpu").manual_seed(case["seed"])} if case.get("generator")
                      else {"latents": noise})
        image = pipe(
            prompt=prompt, negative_prompt=negative, width=case["width"], height=case["height"],
            num_inference_steps=case["steps"], guidance_scale=case["guidance"], output_type="pil",
            callback_on_step_end=record_latents if case.get("trace_latents") else None,
            **noise_args,
        ).images[0]
        assert image.size == (case["width"], case["height"])
        image.save(out_dir / f"{name}.png")
        record = {
            "name": name, "prompt": prompt, "negative_prompt": negative, "width": case["width"],
            "height": case["height"], "steps": case["steps"], "guidance": case["guidance"], "seed": case["seed"],
            "noise_from": "generator" if case.get("generator") else "latents",
            "noise": f"{name}.noise.safetensors", "png": f"{name}.png",
            "timesteps": floats(pipe.scheduler.timesteps), "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
            **check_image(image, name),
        }
        if trace:
            trace["final"] = trace[f"step_{case['steps'] - 1}"]
            save_tensors(trace, out_dir / f"{name}.latents.safetensors")
            record["latents"] = f"{name}.latents.safetensors"
        records.append(record)
    write_json(records, out_dir / "cases.json")


# ----------------------------------------------------------------------------------------------
# img2img and inpainting goldens


def edit_input_image(width, height):
    """A deterministic picture: smooth colour gradients, a sun, a house with a roof, window and door, a tree,
    grass and one thin line. Coordinates are fractions of the size, so every size shows the same scene."""
    x = np.arange(width, dtype=np.float64)[None, :] / (width - 1)
    y = np.arange(height, dtype=np.float64)[:, None] / (height - 1)
    channels = [30 + 190 * x + 0 * y, 70 + 140 * y + 0 * x, 210 - 90 * x - 60 * y]
    image = Image.fromarray(np.round(np.stack(channels, axis=-1)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    def at(fx, fy):
        return (round(fx * width), round(fy * height))

    cx, cy = at(0.76, 0.2)
    r = round(0.12 * min(width, height))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 215, 70))
    draw.rectangle([at(0.0, 0.88), at(1.0, 1.0)], fill=(70, 130, 60))
    draw.rectangle([at(0.12, 0.52), at(0.46, 0.9)], fill=(170, 70, 55))
    draw.polygon([at(0.08, 0.54), at(0.29, 0.28), at(0.5, 0.54)], fill=(95, 45, 35))
    draw.rectangle([at(0.18, 0.62), at(0.28, 0.74)], fill=(235, 225, 150))
    draw.rectangle([at(0.34, 0.66), at(0.42, 0.9)], fill=(70, 40, 30))
    draw.rectangle([at(0.69, 0.6), at(0.73, 0.9)], fill=(90, 60, 35))
    draw.ellipse([at(0.6, 0.42), at(0.82, 0.68)], fill=(40, 110, 50))
    draw.line([at(0.52, 0.06), at(0.97, 0.58)], fill=(255, 255, 255), width=1)
    return image


# Colours of the RGB mask and the side of 128 their Pillow "L" value (ITU-R 601-2 luma:
# L = (19595 R + 38470 G + 7471 B + 2^15) >> 16) falls on. The comments give what other conversions
# would decide, which the colours are chosen to catch.
RGB_MASK_COLOURS = {
    "white": ((255, 255, 255), True),
    "green": ((0, 200, 0), False),       # L 117: keep (Rec. 709 luma 143 and the channel mean 67 disagree)
    "magenta": ((255, 50, 255), True),   # L 135: repaint (Rec. 709 luma 108: keep)
    "pink": ((255, 0, 200), False),      # L 99: keep (channel mean 152, channel max 255: repaint)
    "grey128": ((128, 128, 128), True),  # L 128: repaint (exactly at the threshold)
    "olive": ((200, 200, 40), True),     # L 182: repaint
}


def edit_mask_image(width, height, rgb=False):
    """White (255) = repaint, black = keep. Mode "L": a white ellipse over the house, a white corner triangle,
    and grey blocks of 128 and 160 (repaint: >= 0.5 after /255) and 127 and 96 (keep). Mode "RGB": the same
    layout in the colours of RGB_MASK_COLOURS, which Rec. 709 luma or a channel mean would sort differently."""
    def at(fx, fy):
        return (round(fx * width), round(fy * height))

    if rgb:
        for colour, repaint in RGB_MASK_COLOURS.values():
            assert (Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)) >= 128) == repaint
        c = {name: colour for name, (colour, _) in RGB_MASK_COLOURS.items()}
        fills = [c["white"], c["olive"], c["grey128"], c["green"], c["magenta"], c["pink"]]
        image = Image.new("RGB", (width, height), (0, 0, 0))
    else:
        fills = [255, 255, 128, 127, 160, 96]
        image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse([at(0.06, 0.26), at(0.54, 0.96)], fill=fills[0])
    draw.polygon([at(0.0, 0.0), at(0.34, 0.0), at(0.0, 0.24)], fill=fills[1])
    draw.rectangle([at(0.58, 0.04), at(0.78, 0.44)], fill=fills[2])
    draw.rectangle([at(0.8, 0.04), at(1.0, 0.44)], fill=fills[3])
    draw.rectangle([at(0.58, 0.52), at(0.78, 0.86)], fill=fills[4])
    draw.rectangle([at(0.8, 0.52), at(1.0, 0.86)], fill=fills[5])
    return image


def save_png(image, path):
    image.save(path, format="PNG")
    return path.name


@contextlib.contextmanager
def patch_attr(obj, name, value):
    """Set obj.name = value for the duration (a module global, or an attribute of one instance)."""
    had_own = name in vars(obj)
    old = vars(obj)[name] if had_own else None
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def vae_mean_encoding(calls):
    """Make both pipeline modules' retrieve_latents take the latent distribution's mean (mode), never a
    sample, so the generator only feeds the noise draw. Records each result in `calls`."""
    original = img2img_module.retrieve_latents
    assert inpaint_module.retrieve_latents.__code__.co_code == original.__code__.co_code

    def retrieve_mean(encoder_output, generator=None, sample_mode="sample"):
        latents = original(encoder_output, generator, sample_mode="argmax")
        assert torch.equal(latents, encoder_output.latent_dist.mean)
        calls.append(latents)
        return latents

    with contextlib.ExitStack() as stack:
        for module in (img2img_module, inpaint_module):
            stack.enter_context(patch_attr(module, "retrieve_latents", retrieve_mean))
        yield


def record_randn(module, calls, fixed=None):
    """Replace module.randn_tensor: with `fixed`, return that tensor (asserting the shape and that no
    generator is passed); without, pass through to diffusers' randn_tensor. Records each draw in `calls`."""
    original = module.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        if fixed is not None:
            assert generator is None, "a noise-file case must not get a generator"
            assert tuple(shape) == tuple(fixed.shape), f"randn_tensor asked for {tuple(shape)}, not {tuple(fixed.shape)}"
            out = fixed.clone().to(dtype=dtype)
        else:
            out = original(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        calls.append(out.clone())
        return out

    return patch_attr(module, "randn_tensor", randn_tensor)


def record_calls(obj, name, calls):
    """Wrap the bound method obj.name so that every call's (args, kwargs, result) lands in `calls`."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = method(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    return patch_attr(obj, name, wrapper)


def load_edit_pipelines(directory, spec):
    pipes = {}
    for mode, cls in [("img2img", StableDiffusionXLImg2ImgPipeline), ("inpaint", StableDiffusionXLInpaintPipeline)]:
        pipe = cls.from_pretrained(directory, dtype=torch.float32, add_watermarker=False, variant=spec["variant"])
        pipe.set_progress_bar_config(disable=True)
        # No aesthetic score: time_ids are the plain 6-vector (orig_h, orig_w, 0, 0, target_h, target_w).
        assert pipe.config.requires_aesthetics_score is False
        assert pipe.watermark is None
        assert pipe.unet.config.in_channels == 4  # the 4-channel path: blend with the image latents each step
        pipes[mode] = pipe
    return pipes


def pixels_to_tensor(image):
    """A PIL image as diffusers' VaeImageProcessor feeds it to the encoder: [1, C, H, W], x/255·2 − 1."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


@torch.no_grad()
def run_edit_case(pipes, case, inputs, noise):
    """One pipeline run with every intermediate recorded. Returns (PIL output, captured dict)."""
    mode = case["mode"]
    pipe = pipes[mode]
    module = img2img_module if mode == "img2img" else inpaint_module
    generator = case.get("generator", False)
    seen = {"retrieve": [], "randn": [], "encode": [], "prepare_latents": [], "add_noise": [], "mask": [],
            "steps": [], "timesteps": [], "time_ids": [], "callback_mask": []}

    def on_step_end(_pipe, i, t, kwargs):
        assert i == len(seen["steps"])
        seen["steps"].append(kwargs["latents"].clone())
        seen["timesteps"].append(float(t))
        seen["time_ids"].append(kwargs["add_time_ids"].clone())
        if "mask" in kwargs:
            seen["callback_mask"].append(kwargs["mask"].clone())
        return {}

    args = dict(
        prompt=case.get("prompt", CAT), negative_prompt=case.get("negative_prompt"), image=inputs["pipeline_image"],
        strength=case["strength"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
        output_type="pil", callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents", "add_time_ids"] + (["mask"] if mode == "inpaint" else []),
    )
    if mode == "inpaint":
        args.update(mask_image=inputs["pipeline_mask"], height=case["height"], width=case["width"])
    if generator:
        args["generator"] = torch.Generator("cpu").manual_seed(case["seed"])

    with contextlib.ExitStack() as stack:
        stack.enter_context(vae_mean_encoding(seen["retrieve"]))
        stack.enter_context(record_randn(module, seen["randn"], fixed=None if generator else noise))
        stack.enter_context(record_calls(pipe.vae, "encode", seen["encode"]))
        stack.enter_context(record_calls(pipe, "prepare_latents", seen["prepare_latents"]))
        stack.enter_context(record_calls(pipe.scheduler, "add_noise", seen["add_noise"]))
        if mode == "inpaint":
            stack.enter_context(record_calls(pipe, "prepare_mask_latents", seen["mask"]))
        image = pipe(**args).images[0]

    # The noise: drawn exactly once, of the latent shape, and (generator cases) equal to the noise file.
    assert len(seen["randn"]) == 1, f"{case['name']}: randn_tensor called {len(seen['randn'])} times"
    assert torch.equal(seen["randn"][0], noise), f"{case['name']}: the pipeline's noise is not the noise file"
    return image, seen


def edit_case_inputs(case, out_dir):
    """Write the case's input PNGs (shared between cases of the same size) and build what the pipeline gets."""
    width, height = case["width"], case["height"]
    in_w, in_h = case.get("input_size", (width, height))
    image = edit_input_image(in_w, in_h)
    image_file = save_png(image, out_dir / f"edit_input_{in_w}x{in_h}.png")
    inputs = {"image": image_file, "mask": None, "resized_image": None, "resized_mask": None,
              "resize": None if (in_w, in_h) == (width, height) else "PIL LANCZOS"}
    if case["mode"] == "img2img":
        if inputs["resize"]:
            # The img2img pipeline takes no height/width (it would keep the input's size, rounded down to a
            # multiple of the VAE factor), so the reference resizes first, as the Rust side does.
            image = image.resize((width, height), Image.LANCZOS)
            inputs["resized_image"] = save_png(image, out_dir / f"{case['name']}.input_resized.png")
        inputs["pipeline_image"] = image
        return inputs

    rgb = case.get("rgb_mask", False)
    mask = edit_mask_image(in_w, in_h, rgb=rgb)
    inputs["mask"] = save_png(mask, out_dir / f"edit_mask{'_rgb' if rgb else ''}_{in_w}x{in_h}.png")
    inputs["pipeline_image"], inputs["pipeline_mask"] = image, mask
    if inputs["resize"]:
        # What the inpaint pipeline does inside (VaeImageProcessor.resize: Lanczos, reducing_gap None),
        # saved so a resize mismatch can be told from a pipeline mismatch. Checked against the run below.
        inputs["resized_image"] = save_png(image.resize((width, height), Image.LANCZOS, reducing_gap=None),
                                           out_dir / f"{case['name']}.input_resized.png")
        inputs["resized_mask"] = save_png(mask.resize((width, height), Image.LANCZOS, reducing_gap=None),
                                          out_dir / f"{case['name']}.mask_resized.png")
    return inputs


@torch.no_grad()
def decode_to_pil(pipe, latents):
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' loading bars and its "should be kept in float32" notes (the pipelines call
    vae.to(float32) on a VAE that is float32 already)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()
        diffusers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity(verbosity)


def golden_edits(directory, spec, out_dir):
    """img2img and inpainting runs of golden/<model>/edit_cases.json, and edit_trace.safetensors."""
    with quiet_diffusers():
        edit_goldens(directory, spec, out_dir)


def edit_goldens(directory, spec, out_dir):
    pipes = load_edit_pipelines(directory, spec)
    factor = vae_scale_factor(pipes["img2img"])
    scaling = pipes["img2img"].vae.config.scaling_factor
    records, trace = [], {}
    for case in spec["edit_cases"]:
        name, mode, width, height = case["name"], case["mode"], case["width"], case["height"]
        pipe = pipes[mode]
        shape = [1, pipe.vae.config.latent_channels, height // factor, width // factor]
        noise = randn(shape, case["seed"])
        save_tensors({"noise": noise}, out_dir / f"{name}.noise.safetensors")
        inputs = edit_case_inputs(case, out_dir)
        image, seen = run_edit_case(pipes, case, inputs, noise)
        assert image.size == (width, height)
        image.save(out_dir / f"{name}.png")

        # What went into the encoder, and the image latents (scaling_factor · mean).
        encoded = seen["encode"][0][0][0]
        assert torch.equal(encoded, pixels_to_tensor(inputs["pipeline_image"].resize((width, height), Image.LANCZOS)))
        assert len(seen["encode"]) == (1 if mode == "img2img" else 2)  # inpaint also encodes the masked image
        image_latents = scaling * seen["retrieve"][0]
        prepared = seen["prepare_latents"][0][2]
        start = prepared if mode == "img2img" else prepared[0]
        if mode == "inpaint":
            assert torch.equal(prepared[2], image_latents) and torch.equal(prepared[1], noise)

        # Timesteps and the noise level of the start latents.
        scheduler = pipe.scheduler
        begin = scheduler.begin_index
        timesteps_run = seen["timesteps"]
        assert timesteps_run == floats(scheduler.timesteps[begin:])
        assert len(timesteps_run) == min(int(case["steps"] * case["strength"]), case["steps"])
        from_pure_noise = mode == "inpaint" and case["strength"] == 1.0
        if from_pure_noise:
            assert torch.equal(start, noise * scheduler.init_noise_sigma)
            start_sigma = None
        else:
            start_sigma = float(scheduler.sigmas[begin])
            assert torch.equal(seen["add_noise"][0][2], image_latents + noise * scheduler.sigmas[begin])
            assert torch.equal(start, seen["add_noise"][0][2])

        # time_ids: the generation size from the latent grid, no crop, no aesthetic score; negative row equal.
        time_ids = seen["time_ids"][0]
        assert time_ids.shape[-1] == 6 and all(torch.equal(row, time_ids[-1]) for row in time_ids)
        assert floats(time_ids[-1]) == [height, width, 0, 0, height, width]

        record = {
            "name": name, "mode": mode, "prompt": case.get("prompt", CAT),
            "negative_prompt": case.get("negative_prompt"), "width": width, "height": height,
            "steps": case["steps"], "guidance": case["guidance"], "strength": case["strength"], "seed": case["seed"],
            "noise_from": "generator" if case.get("generator") else "patched", "noise": f"{name}.noise.safetensors",
            "image": inputs["image"], "mask": inputs["mask"], "png": f"{name}.png", "timesteps": timesteps_run,
            "resize": inputs["resize"],
            "begin_index": begin, "start_sigma": start_sigma, "init_noise_sigma": float(scheduler.init_noise_sigma),
            "time_ids": floats(time_ids[-1]),
        }
        if inputs["resize"]:
            record["resized_image"] = inputs["resized_image"]
            if mode == "inpaint":
                record["resized_mask"] = inputs["resized_mask"]
        record.update(check_image(image, name))

        if mode == "inpaint":
            pixel_mask = seen["mask"][0][0][0]  # processed (resized, grey, binarised) mask at full resolution
            latent_mask = seen["mask"][0][2][0][:1]
            assert set(pixel_mask.unique().tolist()) <= {0.0, 1.0}
            assert all(torch.equal(m[:1], latent_mask) for m in seen["callback_mask"])
            # The processed mask is the (resized) PNG's luma >= 128; the latent mask samples it at (f·i, f·j).
            mask_png = Image.open(out_dir / (inputs["resized_mask"] or inputs["mask"]))
            luma = np.asarray(mask_png.convert("L"), dtype=np.uint8)
            assert np.array_equal(pixel_mask[0, 0].numpy(), (luma >= 128).astype(np.float32))
            assert torch.equal(latent_mask[0, 0], pixel_mask[0, 0, ::factor, ::factor])
            if not inputs["resize"]:
                sampled = set(luma[::factor, ::factor].flatten().tolist())
                pillow_luma = [(r * 19595 + g * 38470 + b * 7471 + 2**15) >> 16
                               for (r, g, b), _ in RGB_MASK_COLOURS.values()]
                wanted = set(pillow_luma) if case.get("rgb_mask") else {0, 96, 127, 128, 160, 255}
                assert wanted <= sampled, f"{name}: latent grid misses mask levels {wanted - sampled}"
            keep = latent_mask[0, 0] == 0
            final = seen["steps"][-1]
            # After the last step the kept area is the clean image latents, bit for bit (no re-noising).
            assert torch.equal(final[0][:, keep], image_latents[0][:, keep])
            assert not torch.equal(final[0][:, ~keep], image_latents[0][:, ~keep])
            # In pixels: the kept area stays near a decode of the image latents, the repainted area moves away.
            reference = np.asarray(decode_to_pil(pipe, image_latents), dtype=np.float64)
            out = np.asarray(image, dtype=np.float64)
            keep_px = np.kron(keep.numpy(), np.ones((factor, factor), dtype=bool))
            diff = np.abs(out - reference).mean(axis=-1)
            kept_mad, repaint_mad = float(diff[keep_px].mean()), float(diff[~keep_px].mean())
            # The tiny random VAE decoders are far from local (mid-block self-attention, a receptive field as
            # large as the latent grid), so the kept area moves too: only the ordering is checked here.
            assert kept_mad < repaint_mad, f"{name}: kept area moved more ({kept_mad:.1f} vs {repaint_mad:.1f})"
            record.update({"repaint_fraction": round(float((~keep).float().mean()), 4),
                           "kept_mad_vs_input_decode": round(kept_mad, 2),
                           "repaint_mad_vs_input_decode": round(repaint_mad, 2)})
        records.append(record)

        if case.get("trace"):
            trace[f"{name}_image"] = encoded
            trace[f"{name}_image_latents"] = image_latents
            if mode == "inpaint":
                trace[f"{name}_mask"] = latent_mask
            trace[f"{name}_start"] = start
            for i, latents in enumerate(seen["steps"]):
                trace[f"{name}_step_{i}"] = latents
    assert sorted({r["mode"] for r in records if r["name"] + "_start" in trace}) == ["img2img", "inpaint"]
    save_tensors(trace, out_dir / "edit_trace.safetensors")
    write_json(records, out_dir / "edit_cases.json")


# ----------------------------------------------------------------------------------------------


def main():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", "ATEN_CPU_CAPABILITY=avx2 did not take effect (needs an AVX2 CPU)"
    torch.set_num_threads(1)  # reduction order, hence the last bits, does not depend on the machine's cores
    for generated in [GOLDEN, *(FIXTURES / name for name in MODELS)]:
        shutil.rmtree(generated, ignore_errors=True)
    GOLDEN.mkdir(parents=True)

    vocab, merges = clip_vocab_and_merges()
    golden_noise()
    golden_scheduler()
    golden_scheduler_step()
    for name, spec in MODELS.items():
        directory = save_model(name, spec, vocab, merges)
        pipe = load_model(directory, spec)
        pipe.set_progress_bar_config(disable=True)
        if name == "tiny-sdxl":
            golden_tokenizer(pipe)
        out_dir = GOLDEN / name
        out_dir.mkdir()
        golden_text(pipe, out_dir)
        golden_unet(pipe, out_dir)
        golden_vae(pipe, spec, out_dir)
        golden_vae_tiled(pipe, out_dir)
        golden_cases(pipe, spec, out_dir)
        golden_edits(directory, spec, out_dir)
    write_json(library_versions(), GOLDEN / "versions.json")
    print(f"fixtures written to {FIXTURES.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
