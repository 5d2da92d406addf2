//! The SDXL base 1.0 description (component configs, tokenizers, scheduler) that single-file
//! checkpoints lack. Single files store weights only; their architecture is SDXL base's
//! unless a diffusers directory given with `--config` says otherwise.

use std::path::Path;

use crate::{Error, Result};

macro_rules! asset {
    ($path:literal) => {
        ($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/sdxl-base/", $path)).as_slice())
    };
}

/// Every file of the description, by its path in a diffusers directory. Both tokenizers share
/// CLIP's vocabulary; they differ in their padding token.
const FILES: &[(&str, &[u8])] = &[
    asset!("model_index.json"),
    asset!("scheduler/scheduler_config.json"),
    asset!("text_encoder/config.json"),
    asset!("text_encoder_2/config.json"),
    asset!("unet/config.json"),
    asset!("vae/config.json"),
    asset!("tokenizer/vocab.json"),
    asset!("tokenizer/merges.txt"),
    asset!("tokenizer/special_tokens_map.json"),
    asset!("tokenizer/tokenizer_config.json"),
    (
        "tokenizer_2/vocab.json",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/sdxl-base/tokenizer/vocab.json")),
    ),
    (
        "tokenizer_2/merges.txt",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/sdxl-base/tokenizer/merges.txt")),
    ),
    asset!("tokenizer_2/special_tokens_map.json"),
    asset!("tokenizer_2/tokenizer_config.json"),
];

/// Writes the description as a diffusers directory (without weights) into a temporary
/// directory, which the loaders read like any other; it is removed when dropped.
pub fn sdxl_base_description() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("sdxl-base-description-")
        .tempdir()
        .map_err(|e| Error::File { path: std::env::temp_dir(), message: e.to_string() })?;
    for (path, bytes) in FILES {
        write(&dir.path().join(path), bytes)?;
    }
    Ok(dir)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let error = |e: std::io::Error| Error::File { path: path.to_path_buf(), message: e.to_string() };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(path, bytes).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdxl_models::clip::tokenizer::ClipTokenizer;
    use sdxl_models::unet::config::UNetConfig;

    #[test]
    fn the_description_is_sdxl_base() {
        let dir = sdxl_base_description().unwrap();
        let config_path = dir.path().join("unet/config.json");
        let plan = UNetConfig::load(&config_path).unwrap().resolve(&config_path).unwrap();
        assert_eq!(
            plan.down.iter().map(|l| l.transformer_depths.clone()).collect::<Vec<_>>(),
            [None, Some(vec![2, 2]), Some(vec![10, 10])]
        );
        assert_eq!(plan.text_time, Some((256, 2816)));
        let one = ClipTokenizer::from_dir(&dir.path().join("tokenizer")).unwrap();
        let two = ClipTokenizer::from_dir(&dir.path().join("tokenizer_2")).unwrap();
        // "a photo of a cat": CLIP's ids; the second tokenizer pads with "!" (id 0).
        let ids = one.encode("a photo of a cat").unwrap();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!((one.pad_id(), two.pad_id()), (49407, 0));
        assert_eq!(two.encode("a photo of a cat").unwrap()[..7], ids[..7]);
    }
}
