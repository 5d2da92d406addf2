//! Loading a component's safetensors checkpoint, memory-mapped, with strict key accounting.
//!
//! A model is built from a [`candle_nn::VarBuilder`] over a [`Checkpoint`]; the checkpoint
//! records which tensors the model asked for. After the build, [`Checkpoint::finish`] fails on
//! any tensor that was neither used nor on the component's ignore list, so a checkpoint that
//! does not match its config (or a loader that forgot a layer) is an error naming the key.
//! Tensors stored as f16, bf16 or f32 are converted to the compute dtype on load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The memory-mapped safetensors files of one model component.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    used: Mutex<BTreeSet<String>>,
}

impl Checkpoint {
    /// Opens the weights of the component in `dir` whose files are named `stem` (for example
    /// `diffusion_pytorch_model` or `model`): `stem.safetensors`, else the `stem.fp16.safetensors`
    /// variant, else the shards listed by `stem[.fp16].safetensors.index.json`.
    pub fn open(dir: &Path, stem: &str) -> Result<Arc<Self>> {
        Self::open_files(find_weight_files(dir, stem)?)
    }

    /// Opens the given safetensors files (one checkpoint, possibly sharded).
    pub fn open_files(files: Vec<PathBuf>) -> Result<Arc<Self>> {
        if files.is_empty() {
            return Err(Error::InvalidArgument("no weight files given".into()));
        }
        for file in &files {
            if !file.is_file() {
                return Err(Error::Weights { path: file.clone(), message: "no such file".into() });
            }
        }
        // SAFETY: the files are mapped read-only; as with every mmap-based loader, modifying
        // them while the process runs is undefined behaviour, which we document, not prevent.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::Weights { path: files[0].clone(), message: e.to_string() })?;
        Ok(Arc::new(Self { files, tensors, used: Mutex::new(BTreeSet::new()) }))
    }

    /// The file (or first shard) the tensors come from, for error messages.
    pub fn path(&self) -> &Path {
        &self.files[0]
    }

    /// A var builder over this checkpoint that converts tensors to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Tracking(self.clone())), dtype, device.clone())
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    /// Wraps a model-construction failure (missing tensor, wrong shape) with the file's name.
    pub fn error(&self, e: candle_core::Error) -> Error {
        Error::Weights { path: self.path().to_path_buf(), message: crate::error::strip_backtrace(e).to_string() }
    }

    /// Fails if the checkpoint holds a tensor the model did not use and whose name does not
    /// start with one of `ignored_prefixes`.
    pub fn finish(&self, ignored_prefixes: &[&str]) -> Result<()> {
        let used = self.used.lock().expect("weights: usage lock poisoned by an earlier panic");
        let unexpected: Vec<String> = self
            .tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| !used.contains(name))
            .filter(|name| !ignored_prefixes.iter().any(|p| name.starts_with(p)))
            .collect();
        match unexpected.as_slice() {
            [] => Ok(()),
            [first, rest @ ..] => Err(Error::Weights {
                path: self.path().to_path_buf(),
                message: format!(
                    "unexpected tensor `{first}`{} (the config does not describe it)",
                    if rest.is_empty() { String::new() } else { format!(" and {} more", rest.len()) }
                ),
            }),
        }
    }
}

fn find_weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
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
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::config(index, e))?;
    let names: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if names.is_empty() {
        return Err(Error::config(index, "empty weight_map"));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The var-builder backend: loads from the mapped files and records each name it hands out.
struct Tracking(Arc<Checkpoint>);

impl SimpleBackend for Tracking {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        if !self.contains_tensor(name) {
            return Err(candle_core::Error::Msg(format!("missing tensor `{name}`")));
        }
        let tensor = self.0.tensors.load(name, device)?.to_dtype(dtype)?;
        self.0.used.lock().expect("weights: usage lock poisoned by an earlier panic").insert(name.to_string());
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
