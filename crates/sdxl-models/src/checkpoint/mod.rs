//! A safetensors checkpoint (one file or shards) with strict key accounting: it records which
//! tensors a model asked for, and [`Checkpoint::finish`] fails on any tensor that was neither
//! used nor on the component's ignore list, so a checkpoint that does not match its config (or
//! a loader that forgot a layer) is an error naming the key.
//!
//! Tensors are read with positioned reads straight into their own buffers, not memory-mapped:
//! a mapping's touched pages stay resident while the model holds its copy, so loading a
//! mapped f16 file into f16 tensors would need twice the file's size.

mod files;
mod header;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use half::{bf16, f16};

use self::header::{read_as, read_header, Entry};
use crate::{Error, Result};

/// The safetensors files of one checkpoint (a component, a single-file model or a LoRA).
pub struct Checkpoint {
    paths: Vec<PathBuf>,
    files: Vec<File>,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
    used: Mutex<BTreeSet<String>>,
}

impl Checkpoint {
    /// Opens the weights of the component in `dir` whose files are named `stem` (for example
    /// `diffusion_pytorch_model` or `model`): `stem.safetensors`, else the `stem.fp16.safetensors`
    /// variant, else the shards listed by `stem[.fp16].safetensors.index.json`.
    pub fn open(dir: &Path, stem: &str) -> Result<Arc<Self>> {
        Self::open_files(files::find_weight_files(dir, stem)?)
    }

    /// Opens the given safetensors files (one checkpoint, possibly sharded).
    pub fn open_files(paths: Vec<PathBuf>) -> Result<Arc<Self>> {
        if paths.is_empty() {
            return Err(Error::InvalidArgument("no weight files given".into()));
        }
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file_error = |message: String| Error::Weights { path: path.clone(), message };
            if !path.is_file() {
                return Err(file_error("no such file".into()));
            }
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let header = read_header(&file).map_err(file_error)?;
            for (name, info) in header.tensors {
                entries.insert(name, Entry { file: index, ..info });
            }
            if index == 0 {
                metadata = header.metadata;
            }
            files.push(file);
        }
        Ok(Arc::new(Self { paths, files, entries, metadata, used: Mutex::new(BTreeSet::new()) }))
    }

    /// The file (or first shard) the tensors come from, for error messages.
    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The `__metadata__` strings of the (first) file's header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads tensor `name` in its stored dtype (f16, bf16, f32, f64 or i64) and marks it used.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let entry =
            self.entries.get(name).ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))?;
        let file = &self.files[entry.file];
        let tensor = match entry.dtype.as_str() {
            "F16" => read_as::<f16>(file, entry, name)?,
            "BF16" => read_as::<bf16>(file, entry, name)?,
            "F32" => read_as::<f32>(file, entry, name)?,
            "F64" => read_as::<f64>(file, entry, name)?,
            // kohya files store LoRA alphas as integer scalars
            "I64" => read_as::<i64>(file, entry, name)?,
            other => {
                return Err(candle_core::Error::Msg(format!("tensor `{name}` has dtype {other}, expected a number")))
            }
        };
        self.mark_used(name);
        tensor.to_device(device)
    }

    fn mark_used(&self, name: &str) {
        self.used.lock().expect("weights: usage lock poisoned by an earlier panic").insert(name.to_string());
    }

    /// Wraps a model-construction failure (missing tensor, wrong shape) with the file's name.
    pub fn error(&self, e: candle_core::Error) -> Error {
        Error::Weights { path: self.path().to_path_buf(), message: crate::error::strip_backtrace(e).to_string() }
    }

    /// Fails if the checkpoint holds a tensor the model did not use and whose name does not
    /// start with one of `ignored_prefixes`.
    pub fn finish(&self, ignored_prefixes: &[&str]) -> Result<()> {
        self.finish_under("", ignored_prefixes)
    }

    /// [`Checkpoint::finish`] for the tensors whose names start with `prefix` only: one
    /// component of a file that holds several.
    pub fn finish_under(&self, prefix: &str, ignored_prefixes: &[&str]) -> Result<()> {
        let unused = self.unused(prefix, ignored_prefixes);
        match unused.as_slice() {
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

    /// The names under `prefix` that were not loaded and are not ignored, sorted.
    pub fn unused(&self, prefix: &str, ignored_prefixes: &[&str]) -> Vec<String> {
        let used = self.used.lock().expect("weights: usage lock poisoned by an earlier panic");
        self.names()
            .filter(|name| name.starts_with(prefix) && !used.contains(*name))
            .filter(|name| !ignored_prefixes.iter().any(|p| name.starts_with(p)))
            .map(String::from)
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use candle_core::{DType, Device, Tensor};

    use super::*;

    pub(crate) fn write(
        dir: &Path,
        tensors: &[(&str, Tensor)],
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> PathBuf {
        let path = dir.join("w.safetensors");
        let map: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        safetensors::serialize_to_file(map, metadata, &path).unwrap();
        path
    }

    #[test]
    fn reads_each_dtype_and_the_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let values = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let tensors = [
            ("a", values.clone()),
            ("b", values.to_dtype(DType::F16).unwrap()),
            ("c", values.to_dtype(DType::BF16).unwrap()),
            ("d", values.to_dtype(DType::F64).unwrap()),
        ];
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let checkpoint = Checkpoint::open_files(vec![write(dir.path(), &tensors, Some(meta))]).unwrap();
        for name in ["a", "b", "c", "d"] {
            let t = checkpoint.load(name, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(t.to_vec2::<f32>().unwrap(), values.to_vec2::<f32>().unwrap(), "{name}");
        }
        assert_eq!(checkpoint.metadata().get("format").map(String::as_str), Some("pt"));
        assert!(checkpoint.unused("", &[]).is_empty());
    }

    #[test]
    fn truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[("a", Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap())], None);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = Checkpoint::open_files(vec![path]).err().unwrap().to_string();
        assert!(err.contains("does not fit the file"), "{err}");
    }
}
