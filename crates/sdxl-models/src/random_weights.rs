//! Made-up weights for timing the full-size architectures without files: speed does not
//! depend on weight values.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// The var-builder backend of [`ComponentWeights::random`]: uniform values in ±0.02 from a
/// per-tensor xorshift generator, filled in parallel.
pub(crate) struct RandomValues {
    pub(crate) narrow: Option<DType>,
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
