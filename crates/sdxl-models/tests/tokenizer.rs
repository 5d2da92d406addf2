//! `ClipTokenizer` against transformers' `CLIPTokenizer`, called as diffusers calls it.
//!
//! Fixture: `tests/fixtures/tokenizer_reference.json`, made by
//! `tools/parity/make_tokenizer_reference.py` from the committed `tiny-sdxl/tokenizer*` folders
//! (real CLIP vocabulary) and three folders it describes (the SDXL base repository's config
//! layout, for both pad tokens, and a legacy `added_tokens.json`), which this test writes out;
//! and `tests/fixtures/tokenizer_json/reference.json`, made by the same script, for folders in
//! transformers 5's `save_pretrained` layout (`tokenizer.json` without `vocab.json`/`merges.txt`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdxl_models::clip::tokenizer::ClipTokenizer;
use sdxl_models::Error;
use serde::Deserialize;
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[derive(Deserialize)]
struct Fixture {
    prompts: Vec<String>,
    folders: BTreeMap<String, Folder>,
}

#[derive(Deserialize)]
struct Folder {
    /// A committed folder, relative to the fixtures directory ...
    dir: Option<String>,
    /// ... or one made from this folder's vocab.json and merges.txt and the files below.
    vocab_from: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, Value>,
    max_length: usize,
    pad_id: u32,
    eos_id: u32,
    /// transformers' ids for each prompt before padding.
    ids: Vec<Vec<u32>>,
}

fn fixture(file: &str) -> Fixture {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{file}")).expect("fixture is committed");
    serde_json::from_str(&text).expect("fixture is valid JSON")
}

/// Asserts the lengths, special ids and every prompt's padded ids against transformers'.
fn check_ids(name: &str, tok: &ClipTokenizer, folder: &Folder, prompts: &[String]) {
    assert_eq!(tok.max_length(), folder.max_length, "{name}: max_length");
    assert_eq!(tok.pad_id(), folder.pad_id, "{name}: pad id");
    assert_eq!(tok.eos_id(), folder.eos_id, "{name}: eos id");
    assert_eq!(folder.ids.len(), prompts.len());
    for (prompt, unpadded) in prompts.iter().zip(&folder.ids) {
        let mut want = unpadded.clone();
        want.resize(folder.max_length, folder.pad_id);
        let got = tok.encode(prompt).unwrap_or_else(|e| panic!("{name}: {prompt:?}: {e}"));
        assert_eq!(got, want, "{name}: {prompt:?}");
    }
}

/// A scratch directory under the system temp dir, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sdxl-tokenizer-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        Self(dir)
    }

    /// A copy of the committed `tokenizer/` folder's vocabulary, with `files` written beside it.
    fn with_vocab(name: &str, files: &[(&str, &str)]) -> Self {
        let scratch = Self::new(name);
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(format!("{FIXTURES}/tiny-sdxl/tokenizer/{file}"), scratch.0.join(file)).expect("copy vocab");
        }
        for (file, text) in files {
            std::fs::write(scratch.0.join(file), text).expect("write config");
        }
        scratch
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(name: &str, folder: &Folder) -> (ClipTokenizer, Option<ScratchDir>) {
    if let Some(dir) = &folder.dir {
        let tok = ClipTokenizer::from_dir(&Path::new(FIXTURES).join(dir)).unwrap_or_else(|e| panic!("{name}: {e}"));
        return (tok, None);
    }
    assert_eq!(folder.vocab_from.as_deref(), Some("tiny-sdxl/tokenizer"), "{name}: vocabulary source");
    let files: Vec<(&str, String)> = folder.files.iter().map(|(f, v)| (f.as_str(), v.to_string())).collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(f, v)| (*f, v.as_str())).collect();
    let scratch = ScratchDir::with_vocab(name, &files);
    let tok = ClipTokenizer::from_dir(&scratch.0).unwrap_or_else(|e| panic!("{name}: {e}"));
    (tok, Some(scratch))
}

#[test]
fn ids_match_transformers() {
    let fixture = fixture("tokenizer_reference.json");
    assert!(fixture.prompts.len() >= 40);
    assert!(fixture.folders.contains_key("tokenizer") && fixture.folders.contains_key("tokenizer_2"));
    for (name, folder) in &fixture.folders {
        let (tok, _scratch) = load(name, folder);
        check_ids(name, &tok, folder, &fixture.prompts);
    }
}

#[test]
fn tokenizer_json_folders_match_transformers() {
    let fixture = fixture("tokenizer_json/reference.json");
    assert_eq!(fixture.prompts, self::fixture("tokenizer_reference.json").prompts);
    assert_eq!(fixture.folders.keys().collect::<Vec<_>>(), ["pad_bang", "pad_eot"]);
    for (name, folder) in &fixture.folders {
        let dir = Path::new(FIXTURES).join(folder.dir.as_deref().expect("a committed folder"));
        for file in ["vocab.json", "merges.txt"] {
            assert!(!dir.join(file).exists(), "{name} has {file}: it would be read instead of tokenizer.json");
        }
        let tok = ClipTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_ids(name, &tok, folder, &fixture.prompts);
    }

    // transformers rebuilds CLIP's normalizer, pre-tokenizer and post-processor rather than
    // reading them from tokenizer.json (the script checks that it gives the same ids without
    // them); so must this loader.
    let bare = ScratchDir::new("bare-tokenizer-json");
    let source = Path::new(FIXTURES).join("tokenizer_json/pad_bang");
    std::fs::copy(source.join("tokenizer_config.json"), bare.0.join("tokenizer_config.json")).expect("copy config");
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("tokenizer.json")).expect("read")).expect("JSON");
    for stage in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
        json[stage] = Value::Null;
    }
    std::fs::write(bare.0.join("tokenizer.json"), json.to_string()).expect("write tokenizer.json");
    let tok = ClipTokenizer::from_dir(&bare.0).expect("bare tokenizer.json");
    check_ids("bare pad_bang", &tok, &fixture.folders["pad_bang"], &fixture.prompts);
}

#[test]
fn sdxl_pad_tokens() {
    // tokenizer_2 pads with `!` (id 0); padding it with EOT like tokenizer 1 would change every
    // hidden state text_encoder_2 computes at the pad positions.
    let one = ClipTokenizer::from_dir(&Path::new(FIXTURES).join("tiny-sdxl/tokenizer")).expect("tokenizer");
    let two = ClipTokenizer::from_dir(&Path::new(FIXTURES).join("tiny-sdxl/tokenizer_2")).expect("tokenizer_2");
    assert_eq!((one.pad_id(), one.eos_id(), one.max_length()), (49407, 49407, 77));
    assert_eq!((two.pad_id(), two.eos_id(), two.max_length()), (0, 49407, 77));
    let ids = two.encode("a photo of a cat").expect("encode");
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&id| id == 0));
}

#[test]
fn long_prompts_keep_eos_last() {
    let tok = ClipTokenizer::from_dir(&Path::new(FIXTURES).join("tiny-sdxl/tokenizer_2")).expect("tokenizer_2");
    let ids = tok.encode(&"cat ".repeat(200)).expect("encode");
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&id| id == 2368), "75 `cat</w>` tokens");
}

const MINIMAL_CONFIG: &str = r#"{"model_max_length": 77, "pad_token": "!"}"#;

fn expect_config_error(result: sdxl_models::Result<ClipTokenizer>, file: &str, needle: &str) {
    match result {
        Err(Error::Config { path, message }) => {
            assert!(path.ends_with(file), "error names {}, want {file}", path.display());
            assert!(message.contains(needle), "message {message:?} lacks {needle:?}");
        }
        Err(other) => panic!("want a config error for {file}, got {other}"),
        Ok(_) => panic!("want a config error for {file}, got a tokenizer"),
    }
}

#[test]
fn errors_name_the_file() {
    let missing = ScratchDir::with_vocab("missing", &[]);
    match ClipTokenizer::from_dir(&missing.0) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("tokenizer_config.json"), "{}", path.display()),
        Err(other) => panic!("want an io error, got {other}"),
        Ok(_) => panic!("loaded without tokenizer_config.json"),
    }

    let bad_json = ScratchDir::with_vocab(
        "bad-json",
        &[("tokenizer_config.json", MINIMAL_CONFIG), ("special_tokens_map.json", "{")],
    );
    expect_config_error(ClipTokenizer::from_dir(&bad_json.0), "special_tokens_map.json", "EOF");

    let bad_pad = ScratchDir::with_vocab(
        "bad-pad",
        &[("tokenizer_config.json", MINIMAL_CONFIG), ("special_tokens_map.json", r#"{"pad_token": "<pad>"}"#)],
    );
    expect_config_error(ClipTokenizer::from_dir(&bad_pad.0), "special_tokens_map.json", "`<pad>` is not in");

    let no_length = ScratchDir::with_vocab("no-length", &[("tokenizer_config.json", r#"{"pad_token": "!"}"#)]);
    expect_config_error(ClipTokenizer::from_dir(&no_length.0), "tokenizer_config.json", "model_max_length");

    let huge_length = ScratchDir::with_vocab(
        "huge-length",
        &[("tokenizer_config.json", r#"{"model_max_length": 1000000000000000019884624838656}"#)],
    );
    expect_config_error(ClipTokenizer::from_dir(&huge_length.0), "tokenizer_config.json", "model_max_length");

    let bad_merges = ScratchDir::with_vocab("bad-merges", &[("tokenizer_config.json", MINIMAL_CONFIG)]);
    std::fs::write(bad_merges.0.join("merges.txt"), "#version: 0.2\ni n\nthree parts here\n").expect("write");
    expect_config_error(ClipTokenizer::from_dir(&bad_merges.0), "merges.txt", "line 3");

    let bad_vocab = ScratchDir::with_vocab("bad-vocab", &[("tokenizer_config.json", MINIMAL_CONFIG)]);
    std::fs::write(bad_vocab.0.join("vocab.json"), r#"{"a": "zero"}"#).expect("write");
    expect_config_error(ClipTokenizer::from_dir(&bad_vocab.0), "vocab.json", "token -> id");
}

#[test]
fn folder_without_vocabulary_is_named() {
    let dir = ScratchDir::new("no-vocabulary");
    std::fs::write(dir.0.join("tokenizer_config.json"), MINIMAL_CONFIG).expect("write config");
    // vocab.json without merges.txt is no layout either.
    std::fs::write(dir.0.join("vocab.json"), "{}").expect("write vocab");
    match ClipTokenizer::from_dir(&dir.0) {
        Err(err @ Error::Config { .. }) => {
            let text = err.to_string();
            assert!(text.contains(&dir.0.display().to_string()), "{text:?} does not name the folder");
            assert!(text.contains("has neither vocab.json + merges.txt nor tokenizer.json"), "{text:?}");
        }
        Err(other) => panic!("want a config error, got {other}"),
        Ok(_) => panic!("loaded a folder without a vocabulary"),
    }
}

#[test]
fn tokenizer_json_saved_left_padding_is_refused() {
    // transformers takes `padding_side` from the padding saved in tokenizer.json when the config
    // sets none, and would pad on the left; only the right side is implemented.
    let dir = ScratchDir::new("left-padding");
    let source = Path::new(FIXTURES).join("tokenizer_json/pad_bang");
    std::fs::copy(source.join("tokenizer_config.json"), dir.0.join("tokenizer_config.json")).expect("copy config");
    let json = std::fs::read_to_string(source.join("tokenizer.json")).expect("read");
    let mut json: Value = serde_json::from_str(&json).expect("JSON");
    json["padding"]["direction"] = "Left".into();
    std::fs::write(dir.0.join("tokenizer.json"), json.to_string()).expect("write tokenizer.json");
    match ClipTokenizer::from_dir(&dir.0) {
        Err(Error::Unsupported { what, value }) => {
            assert!(what.starts_with("padding_side in") && what.ends_with("tokenizer.json"), "{what}");
            assert_eq!(value, r#""left""#);
        }
        Err(other) => panic!("want an unsupported error, got {other}"),
        Ok(_) => panic!("loaded a tokenizer that transformers pads on the left"),
    }
}
