//! Reading the JSON configs of a diffusers model directory.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Parses the JSON file at `path` into `T`; errors name the file and the serde message
/// (which names the offending key).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e))
}

/// A config value diffusers accepts either once for all levels or once per level
/// (`attention_head_dim: 8` or `[5, 10, 20]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    /// One value per level. (Listed first: serde tries untagged variants in order, and a
    /// nested `PerLevel<PerLevel<_>>` must read `[1, 2]` as two levels, not one list.)
    Each(Vec<T>),
    /// The same value at every level.
    Same(T),
}

impl<T: Clone> PerLevel<T> {
    /// The per-level values for `levels` levels; `key` names the config key in errors.
    pub fn expand(&self, levels: usize, key: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            PerLevel::Same(v) => Ok(vec![v.clone(); levels]),
            PerLevel::Each(vs) if vs.len() == levels => Ok(vs.clone()),
            PerLevel::Each(vs) => {
                Err(Error::config(path, format!("`{key}` has {} entries, the model has {levels} levels", vs.len())))
            }
        }
    }
}
