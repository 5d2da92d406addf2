//! A component's weights: a [`Checkpoint`] in some key layout, with LoRA updates fused as the
//! tensors load and matrices kept narrow where asked, or made-up values for benchmarks.
//!
//! A model is built from a [`candle_nn::VarBuilder`] over [`ComponentWeights`]; the names it
//! asks for are diffusers' names; a [`KeyMap`] says where each one is stored in a checkpoint of
//! another layout (see [`crate::sgm`]), and a [`LoraSet`] adds low-rank updates to the weights
//! as they load. Stored f16, bf16 or f32 tensors are converted to the compute dtype one at a
//! time.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub use crate::checkpoint::Checkpoint;
pub use crate::key_map::{KeyMap, Stored};
use crate::lora::{Component, LoraSet};
use crate::random_weights::RandomValues;
use crate::{Error, Result};

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
        tracked_var_builder(checkpoint, map, lora, self.narrow, dtype, device)
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

/// A var builder over `checkpoint` that finds each requested name through `map`, fuses
/// `lora`'s low-rank updates that target the component's weights, and converts tensors to
/// `dtype` on `device` (matrices to `narrow`, where given).
pub fn tracked_var_builder(
    checkpoint: &Arc<Checkpoint>,
    map: KeyMap,
    lora: Option<(Arc<LoraSet>, Component)>,
    narrow: Option<DType>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = Tracking { checkpoint: checkpoint.clone(), map, lora, narrow };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
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
    use crate::checkpoint::tests::write;

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
        let vb = tracked_var_builder(&checkpoint, map, None, None, DType::F32, &Device::Cpu);
        let k = vb.get((2, 2), "k").unwrap();
        assert_eq!(k.to_vec2::<f32>().unwrap(), vec![vec![4., 5.], vec![6., 7.]]);
        assert_eq!(vb.get((2, 6), "t").unwrap().to_vec2::<f32>().unwrap()[1], vec![1., 3., 5., 7., 9., 11.]);
        assert_eq!(vb.get((2, 2), "conv").unwrap().dims(), &[2, 2]);
        let err = vb.get((3, 2), "k").unwrap_err().to_string();
        assert!(err.contains("shape [2, 2]"), "{err}");
    }
}
