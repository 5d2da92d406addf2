//! Loading a component's safetensors checkpoint with strict key accounting.
//!
//! A model is built from a [`candle_nn::VarBuilder`] over a [`Checkpoint`]; the checkpoint
//! records which tensors the model asked for. After the build, [`Checkpoint::finish`] fails on
//! any tensor that was neither used nor on the component's ignore list, so a checkpoint that
//! does not match its config (or a loader that forgot a layer) is an error naming the key.
//!
//! Tensors are read with positioned reads straight into their own buffers, not memory-mapped:
//! a mapping's touched pages stay resident while the model holds its copy, so loading a
//! mapped f16 file into f16 tensors would need twice the file's size. Stored f16, bf16 or f32
//! tensors are converted to the compute dtype one at a time.
//!
//! The names a model asks for are diffusers' names; a [`KeyMap`] says where each one is stored
//! in a checkpoint of another layout (the original single-file layout, see [`crate::sgm`]),
//! and a [`crate::lora::LoraSet`] can add low-rank updates to the weights as they load.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use half::{bf16, f16};

use crate::lora::{Component, LoraSet};
use crate::{Error, Result};

/// One tensor's place in a file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    start: u64,
    len: usize,
}

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
        Self::open_files(find_weight_files(dir, stem)?)
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

    /// A var builder over this checkpoint, in diffusers' names, that converts tensors to
    /// `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.var_builder_with(KeyMap::identity(), None, None, dtype, device)
    }

    /// A var builder that finds each requested name through `map` and, with `lora`, fuses the
    /// low-rank updates that target the component's weights.
    pub fn var_builder_with(
        self: &Arc<Self>,
        map: KeyMap,
        lora: Option<(Arc<LoraSet>, Component)>,
        narrow: Option<DType>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = Tracking { checkpoint: self.clone(), map, lora, narrow };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
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

struct Header {
    tensors: Vec<(String, Entry)>,
    metadata: BTreeMap<String, String>,
}

/// Parses a safetensors header: an 8-byte little-endian length, then JSON naming each tensor's
/// dtype, shape and byte range (relative to the end of the header).
fn read_header(file: &File) -> std::result::Result<Header, String> {
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).map_err(|_| "not a safetensors file (too short)".to_string())?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err("not a safetensors file (bad header length)".into());
    }
    let mut bytes = vec![0u8; header_len as usize];
    file.read_exact_at(&mut bytes, 8).map_err(|e| e.to_string())?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a safetensors file (header: {e})"))?;
    let data_start = 8 + header_len;
    let mut header = Header { tensors: Vec::new(), metadata: BTreeMap::new() };
    for (name, value) in json {
        if name == "__metadata__" {
            let strings: BTreeMap<String, String> =
                serde_json::from_value(value).map_err(|e| format!("header `__metadata__`: {e}"))?;
            header.metadata = strings;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let info: Info = serde_json::from_value(value).map_err(|e| format!("header entry `{name}`: {e}"))?;
        let (begin, end) = info.data_offsets;
        let elements = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let size = dtype_size(&info.dtype).and_then(|s| elements.and_then(|n| n.checked_mul(s)));
        if begin > end || data_start + end > file_len || size.is_some_and(|s| s as u64 != end - begin) {
            return Err(format!("header entry `{name}` does not fit the file"));
        }
        let entry = Entry {
            file: 0,
            dtype: info.dtype,
            shape: info.shape,
            start: data_start + begin,
            len: (end - begin) as usize,
        };
        header.tensors.push((name, entry));
    }
    Ok(header)
}

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => Some(1),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "F32" | "I32" | "U32" => Some(4),
        "F64" | "I64" | "U64" => Some(8),
        _ => None,
    }
}

/// Reads one tensor's little-endian data directly into a typed buffer (one copy in memory).
fn read_as<T: candle_core::WithDType + bytemuck::Pod>(
    file: &File,
    entry: &Entry,
    name: &str,
) -> candle_core::Result<Tensor> {
    const { assert!(cfg!(target_endian = "little"), "safetensors data is little-endian") };
    let mut data = vec![T::zeroed(); entry.len / std::mem::size_of::<T>()];
    file.read_exact_at(bytemuck::cast_slice_mut(&mut data), entry.start)
        .map_err(|e| candle_core::Error::Msg(format!("reading tensor `{name}`: {e}")))?;
    Tensor::from_vec(data, entry.shape.as_slice(), &Device::Cpu)
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

/// The key layout of a component's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// diffusers' own names, as the models ask for them.
    Diffusers,
    /// The original (SGM) names, under `prefix` (`model.diffusion_model.` and so on in single
    /// files; empty in standalone original-layout files).
    Original { prefix: String },
}

/// Where one component's weights come from: a checkpoint in some layout, plus the LoRA
/// updates to fuse; or made-up values, for timing the architecture without files. Also the
/// dtype its matrices are kept in, where narrower than the compute dtype (see
/// [`crate::nn::precision`]).
#[derive(Clone)]
pub struct ComponentWeights {
    source: Source,
    layout: Layout,
    lora: Option<Arc<LoraSet>>,
    narrow: Option<DType>,
}

#[derive(Clone)]
enum Source {
    File(Arc<Checkpoint>),
    Random,
}

impl ComponentWeights {
    /// A diffusers-layout checkpoint.
    pub fn diffusers(checkpoint: Arc<Checkpoint>) -> Self {
        Self { source: Source::File(checkpoint), layout: Layout::Diffusers, lora: None, narrow: None }
    }

    /// An original-layout checkpoint whose keys for this component start with `prefix`.
    pub fn original(checkpoint: Arc<Checkpoint>, prefix: &str) -> Self {
        Self {
            source: Source::File(checkpoint),
            layout: Layout::Original { prefix: prefix.to_string() },
            lora: None,
            narrow: None,
        }
    }

    /// Small uniform random values for every tensor, drawn fast: speed does not depend on
    /// weight values, so benchmarks build the full-size models this way.
    pub fn random() -> Self {
        Self { source: Source::Random, layout: Layout::Diffusers, lora: None, narrow: None }
    }

    /// The same weights with `lora`'s updates fused in.
    pub fn with_lora(self, lora: Option<Arc<LoraSet>>) -> Self {
        Self { lora, ..self }
    }

    /// The same weights with the matrices and convolution kernels kept in `dtype` (f16 or
    /// bf16: half the memory), whatever the compute dtype; `None` keeps everything in the
    /// compute dtype.
    pub fn stored_as(self, narrow: Option<DType>) -> Self {
        Self { narrow, ..self }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn lora(&self) -> Option<&Arc<LoraSet>> {
        self.lora.as_ref()
    }

    /// Whether the checkpoint stores `key` (never, for random weights).
    pub fn contains(&self, key: &str) -> bool {
        match &self.source {
            Source::File(checkpoint) => checkpoint.contains(key),
            Source::Random => false,
        }
    }

    /// Wraps a model-construction failure with the file's name.
    pub fn error(&self, e: candle_core::Error) -> Error {
        match &self.source {
            Source::File(checkpoint) => checkpoint.error(e),
            Source::Random => Error::Candle(crate::error::strip_backtrace(e)),
        }
    }

    /// A var builder in diffusers' names; `original` gives the key map for the original layout
    /// from its prefix.
    pub fn var_builder(
        &self,
        original: impl FnOnce(&str) -> KeyMap,
        component: Option<Component>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let checkpoint = match &self.source {
            Source::File(checkpoint) => checkpoint,
            Source::Random => {
                return VarBuilder::from_backend(Box::new(RandomValues { narrow: self.narrow }), dtype, device.clone())
            }
        };
        let map = match &self.layout {
            Layout::Diffusers => KeyMap::identity(),
            Layout::Original { prefix } => original(prefix),
        };
        let lora = component.and_then(|c| self.lora.clone().filter(|set| set.touches(c)).map(|set| (set, c)));
        checkpoint.var_builder_with(map, lora, self.narrow, dtype, device)
    }

    /// Fails on tensors of this component that the model did not use: in a diffusers file,
    /// any not starting with one of `ignored`; in an original-layout file, any under the
    /// component's prefix except [`crate::sgm::IGNORED`].
    pub fn finish(&self, ignored: &[&str]) -> Result<()> {
        let Source::File(checkpoint) = &self.source else { return Ok(()) };
        match &self.layout {
            Layout::Diffusers => checkpoint.finish(ignored),
            Layout::Original { prefix } => checkpoint.finish_under(prefix, crate::sgm::IGNORED),
        }
    }
}

/// The var-builder backend of [`ComponentWeights::random`]: uniform values in ±0.02 from a
/// per-tensor xorshift generator, filled in parallel.
struct RandomValues {
    narrow: Option<DType>,
}

impl SimpleBackend for RandomValues {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let seed = name.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
        let mut values = vec![0f32; shape.elem_count()];
        values.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, out)| {
            let mut state = seed ^ (chunk as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
            for v in out {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
            }
        });
        let dtype = crate::nn::precision::stored_dtype(&shape, dtype, self.narrow);
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("random weights need a shape for `{name}`")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Where a parameter the model asks for (by its diffusers name) is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Under this key, in the requested shape (or with extra trailing 1×1 dimensions, as the
    /// original VAE's attention stores its linear layers as 1×1 convolutions).
    Key(String),
    /// Part `index` of `parts` equal row blocks of a fused tensor (OpenCLIP's `in_proj`).
    Rows { key: String, index: usize, parts: usize },
    /// The transpose of the stored matrix (OpenCLIP's `text_projection`).
    Transposed(String),
}

/// Translates the names a model asks for into where a checkpoint stores them.
pub struct KeyMap(Box<dyn Fn(&str) -> Stored + Send + Sync>);

impl KeyMap {
    /// Names are stored as asked (diffusers-layout files).
    pub fn identity() -> Self {
        Self(Box::new(|name| Stored::Key(name.to_string())))
    }

    pub fn new(locate: impl Fn(&str) -> Stored + Send + Sync + 'static) -> Self {
        Self(Box::new(locate))
    }

    pub fn locate(&self, name: &str) -> Stored {
        (self.0)(name)
    }
}

/// The var-builder backend: loads through the key map, fuses LoRA updates, and records each
/// stored name it hands out.
struct Tracking {
    checkpoint: Arc<Checkpoint>,
    map: KeyMap,
    lora: Option<(Arc<LoraSet>, Component)>,
    narrow: Option<DType>,
}

impl Tracking {
    fn stored(&self, name: &str, shape: &Shape, device: &Device) -> candle_core::Result<Tensor> {
        let checkpoint = &self.checkpoint;
        let mismatch = |stored: &[usize]| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {stored:?}, the config implies {:?}",
                shape.dims()
            ))
        };
        match self.map.locate(name) {
            Stored::Key(key) => {
                let tensor = checkpoint.load(&key, device)?;
                let dims = tensor.dims();
                let squeezable = dims.len() > shape.rank()
                    && dims[..shape.rank()] == *shape.dims()
                    && dims[shape.rank()..].iter().all(|&d| d == 1);
                if tensor.shape() == shape {
                    Ok(tensor)
                } else if squeezable {
                    tensor.reshape(shape)
                } else {
                    Err(mismatch(dims))
                }
            }
            Stored::Rows { key, index, parts } => {
                let fused = checkpoint.load(&key, device)?;
                let rows = fused.dim(0)?;
                if !rows.is_multiple_of(parts) {
                    return Err(mismatch(fused.dims()));
                }
                let part = fused.narrow(0, index * rows / parts, rows / parts)?;
                if part.shape() != shape {
                    return Err(mismatch(part.dims()));
                }
                part.contiguous()
            }
            Stored::Transposed(key) => {
                let tensor = checkpoint.load(&key, device)?;
                if tensor.rank() != 2 {
                    return Err(mismatch(tensor.dims()));
                }
                let transposed = tensor.t()?.contiguous()?;
                if transposed.shape() != shape {
                    return Err(mismatch(transposed.dims()));
                }
                Ok(transposed)
            }
        }
    }

    fn exists(&self, name: &str) -> bool {
        match self.map.locate(name) {
            Stored::Key(key) | Stored::Rows { key, .. } | Stored::Transposed(key) => self.checkpoint.contains(&key),
        }
    }
}

impl SimpleBackend for Tracking {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.exists(name) {
            return Err(candle_core::Error::Msg(format!("missing tensor `{name}`")));
        }
        let tensor = self.stored(name, &shape, device)?;
        let tensor = match &self.lora {
            Some((set, component)) => set.fuse_into(*component, name, tensor)?,
            None => tensor,
        };
        tensor.to_dtype(crate::nn::precision::stored_dtype(&shape, dtype, self.narrow))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        // Only called for tensors of unknown shape, which our models never ask for.
        let shape = self.checkpoint.shape(name).map(|s| Shape::from(s.to_vec())).unwrap_or(Shape::from(()));
        self.get(shape, name, candle_nn::Init::Const(0.), dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.exists(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(
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
    fn key_maps_slice_transpose_and_squeeze() {
        let dir = tempfile::tempdir().unwrap();
        let fused = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((6, 2)).unwrap();
        let conv = Tensor::arange(0f32, 4., &Device::Cpu).unwrap().reshape((2, 2, 1, 1)).unwrap();
        let path = write(dir.path(), &[("fused", fused.clone()), ("conv", conv)], None);
        let checkpoint = Checkpoint::open_files(vec![path]).unwrap();
        let map = KeyMap::new(|name| match name {
            "k" => Stored::Rows { key: "fused".into(), index: 1, parts: 3 },
            "t" => Stored::Transposed("fused".into()),
            other => Stored::Key(other.into()),
        });
        let vb = checkpoint.var_builder_with(map, None, None, DType::F32, &Device::Cpu);
        let k = vb.get((2, 2), "k").unwrap();
        assert_eq!(k.to_vec2::<f32>().unwrap(), vec![vec![4., 5.], vec![6., 7.]]);
        assert_eq!(vb.get((2, 6), "t").unwrap().to_vec2::<f32>().unwrap()[1], vec![1., 3., 5., 7., 9., 11.]);
        assert_eq!(vb.get((2, 2), "conv").unwrap().dims(), &[2, 2]);
        let err = vb.get((3, 2), "k").unwrap_err().to_string();
        assert!(err.contains("shape [2, 2]"), "{err}");
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
