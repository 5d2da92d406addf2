//! Which safetensors files hold a component: one file, its fp16 variant, or shards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `stem.safetensors`, else `stem.fp16.safetensors`, else the shards of their index.
pub(super) fn find_weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        if index.is_file() {
            return shard_files(dir, &index);
        }
    }
    Err(Error::Weights {
        path: dir.to_path_buf(),
        message: format!("no {stem}.safetensors or {stem}.fp16.safetensors"),
    })
}

/// The distinct shard files named by a `*.safetensors.index.json` weight map.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::config(index, e))?;
    let names: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if names.is_empty() {
        return Err(Error::config(index, "empty weight_map"));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}
