//! Attention on OpenBLAS, per head and per block of query rows with the softmax in between:
//! the whole score matrix is never held.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::math::{self, with_avx2};
use super::openblas::sgemm;
use super::{with_data, BAND_ELEMENTS};

/// Attention per head and block of query rows; see the module comment.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let (heads_k, m, d_k) = k.dims3()?;
    if heads != heads_k || d != d_k || v.dims() != k.dims() {
        return Err(candle_core::Error::Msg(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let block = (BAND_ELEMENTS / m.max(1)).clamp(1, n.max(1));
    let mut out = vec![0f32; heads * n * d];
    let mut scores = vec![0f32; block * m];
    with_data(q, |q| {
        with_data(k, |k| {
            with_data(v, |v| {
                for head in 0..heads {
                    let (q, k, v) = (&q[head * n * d..], &k[head * m * d..], &v[head * m * d..]);
                    let out = &mut out[head * n * d..(head + 1) * n * d];
                    for first in (0..n).step_by(block) {
                        let rows = block.min(n - first);
                        let scores = &mut scores[..rows * m];
                        sgemm(true, (rows, m, d), scale, (&q[first * d..], d), (k, d), (scores, m));
                        scores.par_chunks_mut(m).for_each(|row| {
                            with_avx2(
                                #[inline(always)]
                                || softmax_in_place(row),
                            )
                        });
                        sgemm(false, (rows, d, m), 1.0, (scores, m), (v, d), (&mut out[first * d..], d));
                    }
                }
            })
        })
    })???;
    Tensor::from_vec(out, (heads, n, d), &Device::Cpu)
}

/// `x ← exp(x − max) / Σ exp(x − max)`.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    // separate passes, each of which vectorises
    let max = math::max(row);
    for x in row.iter_mut() {
        *x = math::exp(*x - max);
    }
    let sum = math::sum_by_runs(row, |v| v) as f32;
    for x in row.iter_mut() {
        *x /= sum;
    }
}
