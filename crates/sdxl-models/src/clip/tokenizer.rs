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
//! `tokenization_utils_tokenizers.py`. The pipeline is built with the `tokenizers` crate from the
//! folder's BPE vocabulary and merges, stage for stage as `CLIPTokenizer.__init__` builds it:
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
//! - every named token, and every `added_tokens_decoder` entry (or, in the legacy layout without
//!   one, every `added_tokens.json` entry), is an added token: it is split off the prompt before
//!   BPE. So `tokenizer_2`'s pad token `!` makes each `!` in a prompt id 0
//!   (`"wow!!!"` is `wow</w> ! ! !`), where `tokenizer/` gives `wow</w> !!!</w>`;
//! - a token written as a plain string is matched case-sensitively in the raw prompt; one written
//!   as an object with `"normalized": true` is matched after lowercasing. When two entries share a
//!   content (eos, unk and pad are all `<|endoftext|>` in `tokenizer/`), the last in the order
//!   `added_tokens_decoder`, bos, eos, unk, sep, pad, cls, mask decides.
//!
//! `model_max_length` is required (without it transformers would pad to 10^30); a
//! `padding_side` or `truncation_side` other than `"right"` is refused.
//!
//! The vocabulary and merges come from one of two layouts:
//! - `vocab.json` + `merges.txt`, as in the SDXL base repository (and the fixtures that pin the
//!   ids). This layout is read whenever both files exist, even beside a `tokenizer.json`. Note
//!   that transformers would then take what it reads from `tokenizer.json` (below) from there
//!   instead; that gives the same ids whenever the files agree, as they do in every folder
//!   transformers writes;
//! - `tokenizer.json` alone, as transformers 5's `save_pretrained` writes it. transformers takes
//!   from that file only the model's `vocab` and `merges`, its `added_tokens` (as the added-token
//!   list, when the config has no `added_tokens_decoder`), and the `direction` of a `truncation`
//!   or `padding` saved in it (the `truncation_side` / `padding_side` where the config sets none).
//!   Its normalizer, pre-tokenizer, post-processor and BPE options are not read: `CLIPTokenizer`
//!   rebuilds CLIP's, and so does this module.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, Model, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

/// CLIP's pre-tokenization pattern (`CLIPTokenizer.__init__`); matches are kept, the rest
/// (whitespace) is dropped.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

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
    /// Loads tokenizer files from a diffusers `tokenizer*/` folder: `vocab.json` + `merges.txt`
    /// or, without them, `tokenizer.json`; `tokenizer_config.json` (which must give
    /// `model_max_length`); optionally `special_tokens_map.json` and `added_tokens.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut bpe = BpeFiles::load(dir)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?;
        let max_length = model_max_length(&config, &config_path)?;
        check_right_side(&config, &config_path)?;
        // A side the config leaves out is the direction tokenizer.json was saved with.
        bpe.saved_sides.retain(|key, _| !config.contains_key(key));
        check_right_side(&bpe.saved_sides, &bpe.vocab_path)?;
        let specials = SpecialTokens::load(dir, &config, &config_path, bpe.added_tokens)?;

        let unk = specials.get("unk_token").map(|t| t.token.content.clone());
        let mut tokenizer = clip_pipeline(bpe.vocab, bpe.merges, unk, &bpe.merges_path)?;

        // Register the added tokens in transformers' order (`TokenizersBackend.__init__`, then
        // `_post_init`); a later entry with the same content replaces an earlier one's flags.
        tokenizer
            .add_tokens(specials.by_id.values().cloned())
            .map_err(|e| Error::config(&config_path, format!("added tokens: {e}")))?;
        let named_tokens = SPECIAL_TOKEN_KEYS.iter().filter_map(|key| specials.get(key).map(|t| t.token.clone()));
        tokenizer
            .add_special_tokens(named_tokens)
            .map_err(|e| Error::config(&config_path, format!("special tokens: {e}")))?;

        let id_of = |key: &str| -> Result<(String, u32)> {
            let special = specials
                .get(key)
                .ok_or_else(|| Error::config(dir, format!("`{key}` is set to null; a CLIP tokenizer needs one")))?;
            let content = special.token.content.clone();
            // Only ids of the BPE vocabulary have embeddings in the text encoder.
            match tokenizer.get_model().token_to_id(&content) {
                Some(id) => Ok((content, id)),
                None => Err(Error::config(
                    &special.source,
                    format!("{key} `{content}` is not in {}", bpe.vocab_path.display()),
                )),
            }
        };
        let bos = id_of("bos_token")?;
        let eos = id_of("eos_token")?;
        let (pad_token, pad_id) = id_of("pad_token")?;
        let eos_id = eos.1;

        // `processors.RobertaProcessing(eos, bos, trim_offsets=False, add_prefix_space=False)`:
        // <bos> tokens <eos>.
        tokenizer
            .with_post_processor(Some(RobertaProcessing::new(eos, bos).trim_offsets(false).add_prefix_space(false)));
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

/// A folder's BPE vocabulary and merges, and what else transformers reads from the file they
/// come from.
struct BpeFiles {
    vocab: Vocab,
    merges: Vec<(String, String)>,
    /// `vocab.json` / `merges.txt`, or `tokenizer.json` for both, for error messages.
    vocab_path: PathBuf,
    merges_path: PathBuf,
    /// `tokenizer.json`'s `added_tokens` by id; empty for `vocab.json` + `merges.txt`.
    added_tokens: BTreeMap<u32, AddedToken>,
    /// `truncation_side` / `padding_side` as `tokenizer.json` saved them (`"right"`, `"left"`).
    saved_sides: Map<String, Value>,
}

/// The parts of a `tokenizer.json` that transformers' `CLIPTokenizer` reads
/// (`TokenizersBackend.convert_to_native_format` and `PreTrainedTokenizerBase._from_pretrained`).
#[derive(Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
    #[serde(default)]
    added_tokens: Vec<Value>,
    truncation: Option<SavedSide>,
    padding: Option<SavedSide>,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    /// Absent merges are none, as transformers reads them.
    #[serde(default)]
    merges: Vec<JsonMerge>,
}

/// A merge as `tokenizers` writes it: `["a", "b"]`, or `"a b"` in older files.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonMerge {
    Pair(String, String),
    Joined(String),
}

/// A truncation or padding saved in `tokenizer.json`; only its direction survives loading.
#[derive(Deserialize)]
struct SavedSide {
    direction: Option<String>,
}

impl BpeFiles {
    /// Reads `vocab.json` + `merges.txt` where both exist (the SDXL base repository's layout,
    /// which the reference fixtures pin), else `tokenizer.json`.
    fn load(dir: &Path) -> Result<Self> {
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab_path.is_file() && merges_path.is_file() {
            let vocab: HashMap<String, u32> = serde_json::from_str(&read(&vocab_path)?)
                .map_err(|e| Error::config(&vocab_path, format!("not a token -> id map: {e}")))?;
            let merges = parse_merges(&read(&merges_path)?, &merges_path)?;
            return Ok(Self {
                vocab: vocab.into_iter().collect(),
                merges,
                vocab_path,
                merges_path,
                added_tokens: BTreeMap::new(),
                saved_sides: Map::new(),
            });
        }
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::config(
                dir,
                "the tokenizer folder has neither vocab.json + merges.txt nor tokenizer.json",
            ));
        }
        let json: TokenizerJson = serde_json::from_str(&read(&path)?).map_err(|e| Error::config(&path, e))?;
        if let Some(kind) = json.model.kind.as_deref().filter(|&kind| kind != "BPE") {
            return Err(Error::config(&path, format!("the model is {kind}, not BPE")));
        }
        let merges = json
            .model
            .merges
            .into_iter()
            .enumerate()
            .map(|(n, merge)| match merge {
                JsonMerge::Pair(a, b) => Ok((a, b)),
                JsonMerge::Joined(text) => split_merge(&text)
                    .ok_or_else(|| Error::config(&path, format!("merge {n}: expected two tokens, got {text:?}"))),
            })
            .collect::<Result<_>>()?;
        let added_tokens = json
            .added_tokens
            .iter()
            .enumerate()
            .map(|(n, value)| {
                let key = format!("added_tokens[{n}]");
                let id = value.get("id").and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok());
                let id = id.ok_or_else(|| Error::config(&path, format!("`{key}` has no token `id`")))?;
                Ok((id, added_token(value, &path, &key)?))
            })
            .collect::<Result<_>>()?;
        // tokenizers writes "Right" / "Left"; transformers reads them lowercased.
        let saved_sides = [("truncation_side", json.truncation), ("padding_side", json.padding)]
            .into_iter()
            .filter_map(|(key, saved)| Some((key.to_string(), saved?.direction?.to_lowercase().into())))
            .collect();
        let vocab = json.model.vocab.into_iter().collect();
        Ok(Self { vocab, merges, vocab_path: path.clone(), merges_path: path, added_tokens, saved_sides })
    }
}

/// `"a b"` as a merge: exactly two space-separated parts.
fn split_merge(text: &str) -> Option<(String, String)> {
    match text.split(' ').collect::<Vec<_>>().as_slice() {
        [a, b] => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}

/// `merges.txt` as the `tokenizers` BPE reads it: `#version` lines skipped, every other line
/// exactly two space-separated parts.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version"))
        .map(|(n, line)| {
            split_merge(line).ok_or_else(|| {
                Error::config(path, format!("line {}: expected two tokens separated by a space, got {line:?}", n + 1))
            })
        })
        .collect()
}

/// `model_max_length`, the padded length; a config without it would make transformers pad to
/// 10^30, so it is required here.
fn model_max_length(config: &Map<String, Value>, path: &Path) -> Result<usize> {
    let value = config.get("model_max_length").ok_or_else(|| Error::config(path, "missing `model_max_length`"))?;
    value.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|&n| (2..=1 << 20).contains(&n)).ok_or_else(|| {
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
                    Some(v) => {
                        v.as_bool().ok_or_else(|| Error::config(path, format!("`{key}.{name}` is not a boolean")))
                    }
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
    /// `json_added` is `tokenizer.json`'s `added_tokens` (empty where the folder has none).
    fn load(
        dir: &Path,
        config: &Map<String, Value>,
        config_path: &Path,
        json_added: BTreeMap<u32, AddedToken>,
    ) -> Result<Self> {
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
                let mut by_id =
                    if added_path.is_file() { legacy_added_tokens(&added_path, &named)? } else { BTreeMap::new() };
                // tokenizer.json's added tokens come last and replace those with the same id.
                by_id.extend(json_added);
                by_id
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
            named.entry(key).or_insert_with(|| {
                Some(SpecialToken { token: plain_token(content), source: config_path.to_path_buf() })
            });
        }
        Ok(Self { by_id, named })
    }

    /// The named token for `key`, if it is set.
    fn get(&self, key: &str) -> Option<&SpecialToken> {
        self.named.get(key).and_then(Option::as_ref)
    }
}

/// Sets the named tokens that `file` mentions; `null` removes one.
fn overlay(
    named: &mut BTreeMap<&'static str, Option<SpecialToken>>,
    file: &Map<String, Value>,
    path: &Path,
) -> Result<()> {
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

/// `added_tokens_decoder` of `tokenizer_config.json`: `{"id": {"content": …, flags…}}`.
fn added_tokens_decoder(decoder: &Value, path: &Path) -> Result<BTreeMap<u32, AddedToken>> {
    let entries = decoder.as_object().ok_or_else(|| Error::config(path, "`added_tokens_decoder` is not an object"))?;
    entries
        .iter()
        .map(|(id, value)| {
            let key = format!("added_tokens_decoder.{id}");
            let id =
                id.parse::<u32>().map_err(|_| Error::config(path, format!("`{key}`: the key is not a token id")))?;
            Ok((id, added_token(value, path, &key)?))
        })
        .collect()
}

/// An entry of `added_tokens_decoder` or of tokenizer.json's `added_tokens`: a token object with
/// a `special` flag (false when absent).
fn added_token(value: &Value, path: &Path, key: &str) -> Result<AddedToken> {
    let special = value.get("special").and_then(Value::as_bool).unwrap_or(false);
    Ok(AddedToken { special, ..parse_token(value, path, key)? })
}

/// `added_tokens.json` (`{"content": id}`): a token is special, and then not normalized, when it
/// is one of the named tokens the files set.
fn legacy_added_tokens(
    path: &Path,
    named: &BTreeMap<&'static str, Option<SpecialToken>>,
) -> Result<BTreeMap<u32, AddedToken>> {
    let entries: HashMap<String, u32> =
        serde_json::from_str(&read(path)?).map_err(|e| Error::config(path, format!("not a token -> id map: {e}")))?;
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
                return Err(Error::Unsupported {
                    what: format!("{key} in {}", path.display()),
                    value: other.to_string(),
                })
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
