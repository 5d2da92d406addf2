//! The CLIP BPE tokenizer, as diffusers calls transformers' `CLIPTokenizer` for SDXL.
//!
//! Why: both SDXL text encoders read 77 token ids per prompt, and the ids must be the ones
//! diffusers feeds them: `tokenizer(prompt, padding="max_length",
//! max_length=tokenizer.model_max_length, truncation=True)`. Each of SDXL's two tokenizer folders
//! pads with its own pad token (`<|endoftext|>` for `tokenizer/`, `!` for `tokenizer_2/`).
//!
//! Contract: [`ClipTokenizer::encode`] returns exactly [`ClipTokenizer::max_length`] ids:
//! BOS, the prompt's tokens truncated to `max_length - 2`, EOS, then the pad id.
//!
//! Ported from transformers 5.x `models/clip/tokenization_clip.py` (`CLIPTokenizer`, a
//! `tokenizers`-backed tokenizer) and the loading rules of `tokenization_utils_base.py` /
//! `tokenization_utils_tokenizers.py`. The pipeline is built from the folder's `vocab.json` and
//! `merges.txt` with the `tokenizers` crate, stage for stage as transformers builds it:
//! - normalizer: NFC, every run of whitespace to one space, lowercase (no ftfy, no accent
//!   stripping);
//! - pre-tokenizer: CLIP's split regex (the literal special tokens, the English contractions
//!   `'s 't 're 've 'm 'll 'd`, runs of letters, single digits, runs of other non-space
//!   characters), then byte-level mapping;
//! - model: BPE with the `</w>` end-of-word suffix;
//! - post-processor: BOS + tokens + EOS; truncation keeps EOS last; padding on the right.
//!
//! Special tokens follow transformers' rules, which decide some prompts' ids:
//! - the named tokens (bos, eos, unk, pad) come from `tokenizer_config.json`, each overridden by
//!   `special_tokens_map.json` unless the config has an `added_tokens_decoder`, in which case
//!   that file is ignored; missing ones default to CLIP's (`<|startoftext|>`, `<|endoftext|>`);
//! - every named token, and every `added_tokens_decoder` entry, is an added token: it is split off
//!   the prompt before BPE. So `tokenizer_2`'s pad token `!` makes each `!` in a prompt id 0
//!   (`"wow!!!"` is `wow</w> ! ! !`), where `tokenizer/` gives `wow</w> !!!</w>`;
//! - a token written as a plain string is matched case-sensitively in the raw prompt; one written
//!   as an object with `"normalized": true` is matched after lowercasing. When two entries share a
//!   content (eos, unk and pad are all `<|endoftext|>` in `tokenizer/`), the last in the order
//!   `added_tokens_decoder`, bos, eos, unk, sep, pad, cls, mask decides.
//!
//! A `tokenizer.json` in the folder is not read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, Model, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

/// CLIP's pre-tokenization pattern (`CLIPTokenizer.__init__`); matches are kept, the rest
/// (whitespace) is dropped.
const CLIP_SPLIT_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`), in the order it adds them.
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// `CLIPTokenizer.__init__`'s defaults for the named tokens a config leaves out.
const CLIP_DEFAULTS: [(&str, &str); 4] = [
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("unk_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// A CLIP tokenizer loaded from a diffusers `tokenizer/` or `tokenizer_2/` folder.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
    eos_id: u32,
}

impl ClipTokenizer {
    /// Loads tokenizer files from a diffusers `tokenizer*/` folder: `vocab.json`, `merges.txt`,
    /// `tokenizer_config.json` (which must give `model_max_length`) and, optionally,
    /// `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let config_path = dir.join("tokenizer_config.json");

        let vocab: HashMap<String, u32> = serde_json::from_str(&read(&vocab_path)?)
            .map_err(|e| Error::config(&vocab_path, format!("not a token -> id map: {e}")))?;
        let vocab: Vocab = vocab.into_iter().collect();
        let merges = parse_merges(&read(&merges_path)?, &merges_path)?;
        let config = read_json_object(&config_path)?;
        let max_length = model_max_length(&config, &config_path)?;
        check_right_side(&config, &config_path)?;
        let specials = SpecialTokens::load(dir, &config, &config_path)?;

        let unk = specials.get("unk_token").map(|t| t.token.content.clone());
        let mut tokenizer = clip_pipeline(vocab, merges, unk, &merges_path)?;

        // Register the added tokens in transformers' order (`TokenizersBackend.__init__`, then
        // `_post_init`); a later entry with the same content replaces an earlier one's flags.
        tokenizer
            .add_tokens(specials.by_id.values().cloned())
            .map_err(|e| Error::config(&config_path, format!("added tokens: {e}")))?;
        let named_tokens = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|key| specials.get(key).map(|t| t.token.clone()));
        tokenizer
            .add_special_tokens(named_tokens)
            .map_err(|e| Error::config(&config_path, format!("special tokens: {e}")))?;

        let id_of = |key: &str| -> Result<(String, u32)> {
            let special = specials.get(key).ok_or_else(|| {
                Error::config(&config_path, format!("`{key}` is null; a CLIP tokenizer needs one"))
            })?;
            let content = special.token.content.clone();
            // Only ids of the BPE vocabulary have embeddings in the text encoder.
            match tokenizer.get_model().token_to_id(&content) {
                Some(id) => Ok((content, id)),
                None => Err(Error::config(
                    &special.source,
                    format!("{key} `{content}` is not in {}", vocab_path.display()),
                )),
            }
        };
        let bos = id_of("bos_token")?;
        let eos = id_of("eos_token")?;
        let (pad_token, pad_id) = id_of("pad_token")?;
        let eos_id = eos.1;

        // `processors.RobertaProcessing(eos, bos, trim_offsets=False, add_prefix_space=False)`:
        // <bos> tokens <eos>.
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(eos, bos).trim_offsets(false).add_prefix_space(false),
        ));
        // `truncation=True, max_length=model_max_length`: the tokens are cut to make room for
        // BOS and EOS; `padding="max_length"` then fills to the same length.
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::config(&config_path, format!("model_max_length: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));

        Ok(Self { tokenizer, max_length, pad_id, eos_id })
    }

    /// Token ids for `text`: BOS, tokens (truncated), EOS, padded to `max_length()`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenize the prompt: {e}")))?;
        let ids = encoding.get_ids().to_vec();
        debug_assert_eq!(ids.len(), self.max_length, "truncation and padding fix the length");
        Ok(ids)
    }

    /// The number of ids [`ClipTokenizer::encode`] returns (`model_max_length`, 77 for SDXL).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id that fills the sequence after EOS.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The end-of-text id, which closes every sequence (the position the pooled output is read
    /// at is its first occurrence).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    match serde_json::from_str(&read(path)?) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::config(path, "not a JSON object")),
        Err(e) => Err(Error::config(path, e)),
    }
}

/// `merges.txt` as the `tokenizers` BPE reads it: `#version` lines skipped, every other line
/// exactly two space-separated parts.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version"))
        .map(|(n, line)| match line.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => Ok((a.to_string(), b.to_string())),
            _ => Err(Error::config(path, format!("line {}: expected two tokens separated by a space, got {line:?}", n + 1))),
        })
        .collect()
}

/// `model_max_length`, the padded length; a config without it would make transformers pad to
/// 10^30, so it is required here.
fn model_max_length(config: &Map<String, Value>, path: &Path) -> Result<usize> {
    let value = config.get("model_max_length").ok_or_else(|| Error::config(path, "missing `model_max_length`"))?;
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| (2..=1 << 20).contains(&n))
        .ok_or_else(|| {
            Error::config(path, format!("`model_max_length` must be an integer from 2 (BOS and EOS) to 2^20, got {value}"))
        })
}

/// A special token written as a plain string: matched in the raw text, not normalized.
fn plain_token(content: &str) -> AddedToken {
    AddedToken::from(content, true).normalized(false)
}

/// A token as the config files write it: a string, or an object with `content` and optional
/// `single_word`, `lstrip`, `rstrip`, `normalized` flags (false when absent, as transformers
/// loads them).
fn parse_token(value: &Value, path: &Path, key: &str) -> Result<AddedToken> {
    match value {
        Value::String(content) => Ok(plain_token(content)),
        Value::Object(fields) => {
            let content = fields
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::config(path, format!("`{key}` has no string `content`")))?;
            let flag = |name: &str| -> Result<bool> {
                match fields.get(name) {
                    None => Ok(false),
                    Some(v) => v.as_bool().ok_or_else(|| Error::config(path, format!("`{key}.{name}` is not a boolean"))),
                }
            };
            Ok(AddedToken::from(content, true)
                .single_word(flag("single_word")?)
                .lstrip(flag("lstrip")?)
                .rstrip(flag("rstrip")?)
                .normalized(flag("normalized")?))
        }
        other => Err(Error::config(path, format!("`{key}` must be a string or an object, got {other}"))),
    }
}

/// The added tokens of a folder, as transformers 5.x resolves them in
/// `PreTrainedTokenizerBase._from_pretrained` and `TokenizersBackend.__init__`.
struct SpecialTokens {
    /// The added tokens listed by id: `added_tokens_decoder` of `tokenizer_config.json`, or the
    /// legacy `added_tokens.json` where the config has no `added_tokens_decoder`.
    by_id: BTreeMap<u32, AddedToken>,
    /// The named tokens by key; `None` where a file sets one to `null`.
    named: BTreeMap<&'static str, Option<SpecialToken>>,
}

/// A named special token and the file that defined it, for error messages.
struct SpecialToken {
    token: AddedToken,
    source: PathBuf,
}

impl SpecialTokens {
    fn load(dir: &Path, config: &Map<String, Value>, config_path: &Path) -> Result<Self> {
        let mut named = BTreeMap::new();
        overlay(&mut named, config, config_path)?;
        let by_id = match config.get("added_tokens_decoder") {
            Some(decoder) => added_tokens_decoder(decoder, config_path)?,
            // Legacy layout: special_tokens_map.json overrides the config, and added_tokens.json
            // lists the added tokens; both are ignored once a config has `added_tokens_decoder`.
            None => {
                let map_path = dir.join("special_tokens_map.json");
                if map_path.is_file() {
                    overlay(&mut named, &read_json_object(&map_path)?, &map_path)?;
                }
                let added_path = dir.join("added_tokens.json");
                if added_path.is_file() {
                    legacy_added_tokens(&added_path, &named)?
                } else {
                    BTreeMap::new()
                }
            }
        };
        // A named token read from a file takes the flags of the listed added token with the same
        // content (transformers maps it through `added_tokens_map`).
        for special in named.values_mut().flatten() {
            if let Some(listed) = by_id.values().find(|t| t.content == special.token.content) {
                special.token = AddedToken { special: true, ..listed.clone() };
            }
        }
        // `CLIPTokenizer.__init__`'s defaults, for the keys no file sets.
        for (key, content) in CLIP_DEFAULTS {
            named
                .entry(key)
                .or_insert_with(|| Some(SpecialToken { token: plain_token(content), source: config_path.to_path_buf() }));
        }
        Ok(Self { by_id, named })
    }

    /// The named token for `key`, if it is set.
    fn get(&self, key: &str) -> Option<&SpecialToken> {
        self.named.get(key).and_then(Option::as_ref)
    }
}

/// Sets the named tokens that `file` mentions; `null` removes one.
fn overlay(named: &mut BTreeMap<&'static str, Option<SpecialToken>>, file: &Map<String, Value>, path: &Path) -> Result<()> {
    for key in SPECIAL_TOKEN_KEYS {
        let token = match file.get(key) {
            None => continue,
            Some(Value::Null) => None,
            Some(value) => Some(SpecialToken { token: parse_token(value, path, key)?, source: path.to_path_buf() }),
        };
        named.insert(key, token);
    }
    Ok(())
}

/// `added_tokens.json` (`{"content": id}`): a token is special, and then not normalized, when it
/// is one of the named tokens the files set.
fn legacy_added_tokens(
    path: &Path,
    named: &BTreeMap<&'static str, Option<SpecialToken>>,
) -> Result<BTreeMap<u32, AddedToken>> {
    let entries: HashMap<String, u32> = serde_json::from_str(&read(path)?)
        .map_err(|e| Error::config(path, format!("not a token -> id map: {e}")))?;
    Ok(entries
        .into_iter()
        .map(|(content, id)| {
            let special = named.values().flatten().any(|t| t.token.content == content);
            (id, AddedToken::from(content, special).normalized(!special))
        })
        .collect())
}

/// Rejects `padding_side` / `truncation_side` other than `"right"`, the only sides implemented.
fn check_right_side(config: &Map<String, Value>, path: &Path) -> Result<()> {
    for key in ["padding_side", "truncation_side"] {
        match config.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(side)) if side == "right" => {}
            Some(other) => {
                return Err(Error::Unsupported { what: format!("{key} in {}", path.display()), value: other.to_string() })
            }
        }
    }
    Ok(())
}

/// CLIPTokenizer's backend without its added tokens, post-processor, truncation and padding:
/// BPE with `</w>`, NFC + whitespace collapse + lowercase, CLIP's split then byte-level.
fn clip_pipeline(
    vocab: Vocab,
    merges: Vec<(String, String)>,
    unk: Option<String>,
    merges_path: &Path,
) -> Result<Tokenizer> {
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let bpe = bpe.build().map_err(|e| Error::config(merges_path, format!("cannot build the BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    // `normalizers.Sequence([NFC(), Replace(Regex(r"\s+"), " "), Lowercase()])`. The patterns are
    // constants, so a failure to compile them is a bug, not a property of the folder.
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").expect("constant regex compiles");
    let normalizer = NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()]);
    tokenizer.with_normalizer(Some(normalizer)).expect("setting a normalizer before adding tokens cannot fail");
    let split = Split::new(SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
        .expect("constant regex compiles");
    // `pre_tokenizers.ByteLevel(add_prefix_space=False)`: trim_offsets and use_regex default on.
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), byte_level.into()])));
    Ok(tokenizer)
}
/// `added_tokens_decoder` of `tokenizer_config.json`: `{"id": {"content": …, flags…}}`.
fn added_tokens_decoder(decoder: &Value, path: &Path) -> Result<BTreeMap<u32, AddedToken>> {
    let entries = decoder.as_object().ok_or_else(|| Error::config(path, "`added_tokens_decoder` is not an object"))?;
    entries
        .iter()
        .map(|(id, value)| {
            let key = format!("added_tokens_decoder.{id}");
            let id = id.parse::<u32>().map_err(|_| Error::config(path, format!("`{key}`: the key is not a token id")))?;
            let special = value.get("special").and_then(Value::as_bool).unwrap_or(false);
            Ok((id, AddedToken { special, ..parse_token(value, path, &key)? }))
        })
        .collect()
}
