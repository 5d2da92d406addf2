//! GEGLU's gate in f32: one vectorised pass over the projection (candle's version copies both
//! halves out and makes two more passes).

use candle_core::Tensor;
use rayon::prelude::*;

use super::math::{self, with_avx2};
use super::with_data;

/// `hidden · gelu(gate)` for `hidden, gate = projected.chunk(2, dim=-1)`.
pub fn geglu(projected: &Tensor) -> candle_core::Result<Tensor> {
    let width = *projected.dims().last().ok_or_else(|| candle_core::Error::Msg("geglu: a scalar".into()))?;
    let half = width / 2;
    let mut out = vec![0f32; projected.elem_count() / 2];
    with_data(projected, |values| {
        out.par_chunks_mut(half).zip(values.par_chunks(width)).for_each(|(out, row)| {
            with_avx2(
                #[inline(always)]
                || {
                    let (hidden, gate) = row.split_at(half);
                    for ((out, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
                        *out = h * math::gelu_erf(g);
                    }
                },
            )
        });
    })?;
    let mut dims = projected.dims().to_vec();
    *dims.last_mut().expect("at least one dimension") = half;
    Tensor::from_vec(out, dims, projected.device())
}
