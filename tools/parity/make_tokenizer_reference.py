"""Expected CLIP token ids for crates/sdxl-models/tests/tokenizer.rs, from transformers' CLIPTokenizer.

    python tools/parity/make_tokenizer_reference.py crates/sdxl-models/tests/fixtures/tokenizer_reference.json

Each prompt is tokenized as diffusers' StableDiffusionXLPipeline.encode_prompt does:
tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).
The fixture stores the ids before padding and each folder's pad id; the padded ids are checked here
to be exactly those followed by pad ids.

Folders: the committed tiny-sdxl/tokenizer and tokenizer_2, plus three made in a temporary directory
from tokenizer/'s vocab.json and merges.txt and the config files stored in the fixture: the layout of
the SDXL base repository's own files (special tokens as AddedToken objects with "normalized": true,
the pad token a plain string, no added_tokens_decoder) for both pad tokens, and that layout with a
legacy added_tokens.json.

It also writes tokenizer_json/{pad_eot,pad_bang}/: CLIPTokenizers on a small vocabulary (the byte
alphabet, the first SMALL_MERGES of tokenizer/'s merges, the two special tokens) padding with
<|endoftext|> and with `!`, saved by save_pretrained as transformers 5 does: tokenizer.json and
tokenizer_config.json only. pad_bang is saved after one call, so its tokenizer.json carries the
truncation and padding that call left, as a pipeline saved after use does. Their ids go to
tokenizer_json/reference.json. The script checks that transformers ignores the normalizer,
pre-tokenizer, post-processor and decoder in tokenizer.json.
"""
import json
import os
import shutil
import sys
import tempfile

from transformers import CLIPTokenizer

SMALL_MERGES = 2000

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "sdxl-models", "tests", "fixtures")

PROMPTS = [
    "a photo of a cat",
    "A majestic lion jumping from a big stone at night",
    "",
    "   ",
    "hello, world!",
    "wow!!!",
    "?!... ;-) :D <3",
    "(masterpiece:1.2), best quality, [blurry], {hat}",
    "a-b_c/d\\e|f=g+h*i&j#k@l~m`n^o$p%",
    "1girl, 2boys, 1024x768, 3.14159, 42nd street",
    "HELLO World, CamelCase and SHOUTING",
    "café crème brûlée",
    "Ångström naïve façade, Straße, İstanbul, ΣΑΣ",
    "cafe\u0301 decomposed accent",
    "ﬁne ligature, x² superscript, Ⅻ numeral",
    "a 🐱 with a 🎩 and 👨‍👩‍👧",
    "一只猫坐在垫子上",
    "日本の桜 さくら, 고양이",
    "a  photo\tof\na\r\ncat",
    "tab\t\tseparated\u00a0nbsp\u3000ideographic\u200bzero-width",
    "  leading and trailing  ",
    "don't",
    "it's",
    "I'M",
    "we're they've I'll you'd she's can't",
    "rock 'n' roll ''quoted'' 's",
    "\u2019curly\u2019 apostrophe don\u2019t",
    "state-of-the-art, well--known",
    "\u2013en dash \u2014 em dash",
    "supercalifragilisticexpialidocious " + "a" * 40,
    "a " * 75,
    "a " * 76,
    "a photo of a cat " * 30,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut "
    "aliquip ex ea commodo consequat.",
    "<|endoftext|>",
    "a <|endoftext|> b",
    "a<|endoftext|>b<|startoftext|>c",
    "<|ENDOFTEXT|> and <|StartOfText|> upper",
    "<|endoftext|><|endoftext|>  <|endoftext|>",
    "null\x00byte and bell\x07",
    "1234567890",
    "!",
    "hi! !! !!! !?",
]


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def hub_files(pad):
    """The SDXL base repository's tokenizer files (special_tokens_map.json, tokenizer_config.json)."""
    special = {"bos_token": added_token("<|startoftext|>"), "eos_token": added_token("<|endoftext|>"),
               "pad_token": pad, "unk_token": added_token("<|endoftext|>")}
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
              **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v) for k, v in special.items()}}
    return {"special_tokens_map.json": special, "tokenizer_config.json": config}


SYNTHETIC = {
    "hub_tokenizer": hub_files("<|endoftext|>"),
    "hub_tokenizer_2": hub_files("!"),
    "legacy_added_tokens_2": {**hub_files("!"),
                              "added_tokens.json": {"!": 0, "<|endoftext|>": 49407, "<|startoftext|>": 49406}},
}


def reference(folder):
    tok = CLIPTokenizer.from_pretrained(folder)
    max_length = tok.model_max_length
    ids = []
    for prompt in PROMPTS:
        padded = tok(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        unpadded = tok(prompt, max_length=max_length, truncation=True).input_ids
        assert padded == unpadded + [tok.pad_token_id] * (max_length - len(unpadded)), prompt
        ids.append(unpadded)
    return {"max_length": max_length, "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "ids": ids}


def save_small_tokenizers():
    """The tokenizer_json/ folders, relative to FIXTURES."""
    source = os.path.join(FIXTURES, "tiny-sdxl", "tokenizer")
    with open(os.path.join(source, "merges.txt")) as f:
        merges = [tuple(line.split(" ")) for line in f.read().splitlines()[1:SMALL_MERGES + 1]]
    with open(os.path.join(source, "vocab.json")) as f:
        vocab = {token: i for token, i in json.load(f).items() if i < 512 + SMALL_MERGES}
    assert all(vocab["".join(m)] == 512 + i for i, m in enumerate(merges))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    dirs = []
    for name, pad in [("pad_eot", "<|endoftext|>"), ("pad_bang", "!")]:
        tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
        if pad == "!":
            tok("a cat", padding="max_length", max_length=77, truncation=True)
        folder = os.path.join(FIXTURES, "tokenizer_json", name)
        shutil.rmtree(folder, ignore_errors=True)
        tok.save_pretrained(folder)
        for f in set(os.listdir(folder)) - {"tokenizer.json", "tokenizer_config.json"}:
            os.remove(os.path.join(folder, f))
        dirs.append(os.path.join("tokenizer_json", name))
    return dirs


def main(path):
    folders = {}
    for name in ["tokenizer", "tokenizer_2"]:
        folders[name] = {"dir": f"tiny-sdxl/{name}", **reference(os.path.join(FIXTURES, "tiny-sdxl", name))}
    small = {os.path.basename(d): {"dir": d, **reference(os.path.join(FIXTURES, d))} for d in save_small_tokenizers()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in SYNTHETIC.items():
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            for f in ["vocab.json", "merges.txt"]:
                shutil.copy(os.path.join(FIXTURES, "tiny-sdxl", "tokenizer", f), folder)
            for f, content in files.items():
                with open(os.path.join(folder, f), "w") as out:
                    json.dump(content, out)
            folders[name] = {"vocab_from": "tiny-sdxl/tokenizer", "files": files, **reference(folder)}
        # transformers rebuilds CLIP's pipeline and reads only the vocab, merges and added tokens.
        folder = shutil.copytree(os.path.join(FIXTURES, "tokenizer_json", "pad_bang"), os.path.join(tmp, "bare"))
        with open(os.path.join(folder, "tokenizer.json")) as f:
            bare = {**json.load(f), **dict.fromkeys(["normalizer", "pre_tokenizer", "post_processor", "decoder"])}
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump(bare, f)
        assert reference(folder) == {k: v for k, v in small["pad_bang"].items() if k != "dir"}
    write(path, folders)
    write(os.path.join(FIXTURES, "tokenizer_json", "reference.json"), small)


def write(path, folders):
    with open(path, "w") as f:
        f.write('{"prompts": ' + json.dumps(PROMPTS, ensure_ascii=False, indent=0) + ',\n"folders": {\n')
        f.write(",\n".join(
            f'"{name}": {{' + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in entry.items() if k != "ids")
            + ', "ids": [\n' + ",\n".join(json.dumps(ids) for ids in entry["ids"]) + "\n]}"
            for name, entry in folders.items()))
        f.write("\n}}\n")
    print(len(PROMPTS), "prompts x", len(folders), "folders ->", path)


if __name__ == "__main__":
    main(sys.argv[1])
