//! Every CPU-only kernel, reached through the dispatcher ([`super::kernels`]): each entry here
//! answers `None` where it does not apply (another dtype or device, OpenBLAS missing or built
//! out), and the dispatcher then runs candle's ops.
//!
//! - [`openblas`]: `sgemm`, loaded at run time (the `openblas` feature), under the matrix
//!   products, the banded-im2col and Winograd convolutions ([`conv`], [`winograd`]) and the
//!   blocked attention ([`attention`]).
//! - [`group_norm`] and [`geglu`]: fused element-wise passes, vectorised through [`math`].
//! - [`int8`]: the int8 weight matrices and convolutions of `--quantize int8` (our AVX-512
//!   VNNI and AMX kernels, else candle's quantized matmul for the matrices).
//! - [`panels`]: f32 products of few rows (the text encoders) on weights packed at load.

#[cfg(feature = "openblas")]
mod attention;
#[cfg(feature = "openblas")]
mod conv;
mod geglu;
mod group_norm;
mod int8;
pub(crate) mod math;
#[cfg(feature = "openblas")]
mod openblas;
mod panels;
#[cfg(all(test, feature = "openblas"))]
mod tests;
#[cfg(feature = "openblas")]
mod winograd;

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use super::Activation;

pub use int8::{ConvInput, Int8Conv, Int8Matrix};
pub use panels::PanelMatrix;

/// Floats per unfolded band of a convolution, and per block of attention scores (32 MB):
/// wide enough for GEMM efficiency, small enough to stay near the caches.
#[cfg(feature = "openblas")]
const BAND_ELEMENTS: usize = 8 << 20;

/// Sets the environment the CPU kernels' libraries read as they load; see
/// [`super::kernels::prepare_process`].
pub fn prepare_environment() {
    #[cfg(feature = "openblas")]
    openblas::prepare_environment();
}

/// Whether the OpenBLAS kernels take these tensors: f32, on the CPU, with OpenBLAS loaded.
pub fn blas_applies(tensors: &[&Tensor]) -> bool {
    #[cfg(feature = "openblas")]
    return openblas::applies(tensors);
    #[cfg(not(feature = "openblas"))]
    {
        let _ = tensors;
        false
    }
}

/// Whether the f32 element-wise kernels take these tensors.
fn f32_cpu(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// `a · bᵀ` on OpenBLAS.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Option<candle_core::Result<Tensor>> {
    #[cfg(feature = "openblas")]
    if openblas::applies(&[a, b]) {
        return Some(openblas::matmul_nt(a, b));
    }
    let _ = (a, b);
    None
}

/// A convolution plus bias on OpenBLAS.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Option<candle_core::Result<Tensor>> {
    #[cfg(feature = "openblas")]
    if openblas::applies(&[x, weight, bias]) {
        return Some(conv::conv2d(x, weight, bias, stride, padding));
    }
    let _ = (x, weight, bias, stride, padding);
    None
}

/// Whether [`winograd_conv2d`] takes this stride-1 convolution of `x` (after 2× upsampling
/// when `upsample`), adding `residual` if given.
pub fn winograd_applies(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    upsample: bool,
    residual: Option<&Tensor>,
) -> bool {
    #[cfg(feature = "openblas")]
    return openblas::applies(&[x, bias])
        && residual.is_none_or(|r| openblas::applies(&[r]))
        && conv::winograd_applies(x, weight, padding, upsample);
    #[cfg(not(feature = "openblas"))]
    {
        let _ = (x, weight, bias, padding, upsample, residual);
        false
    }
}

/// A 3×3 stride-1 convolution by Winograd with the fused prologue and epilogue described at
/// [`super::kernels::winograd_conv2d`]; only where [`winograd_applies`].
pub fn winograd_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    upsample: bool,
    affine: Option<(&[f32], &[f32])>,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "openblas")]
    return conv::winograd_conv2d(x, weight, bias, padding, upsample, affine, residual);
    #[cfg(not(feature = "openblas"))]
    {
        let _ = (x, weight, bias, padding, upsample, affine, residual);
        Err(candle_core::Error::Msg("the Winograd convolution needs a build with the `openblas` feature".into()))
    }
}

/// Whether a weight can be packed in panels: f32 on the CPU, where the kernel runs.
pub fn panels_apply(weight: &Tensor) -> bool {
    f32_cpu(&[weight]) && panels::available()
}

/// Packs an f32 `[N, K]` weight in panels, with its bias.
pub fn pack_panels(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<PanelMatrix> {
    let (n, k) = weight.dims2()?;
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != n) {
        return Err(candle_core::Error::Msg(format!("panel product: a bias of {n} expected")));
    }
    with_data(weight, |w| PanelMatrix::pack(w, n, k, bias))
}

/// `a · Wᵀ` on the panel kernel, then `then` on every value.
pub fn panels_matmul_nt(a: &Tensor, weight: &PanelMatrix, then: Option<Activation>) -> candle_core::Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (n, k2) = weight.dims();
    if k != k2 || !f32_cpu(&[a]) {
        return Err(candle_core::Error::Msg(format!("panel product: [{m}, {k}] f32 on the CPU expected for K = {k2}")));
    }
    let out = with_data(a, |a| weight.matmul_nt(a, m, then))?;
    Tensor::from_vec(out, (m, n), &candle_core::Device::Cpu)
}

/// Blocked attention on OpenBLAS.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Option<candle_core::Result<Tensor>> {
    #[cfg(feature = "openblas")]
    if openblas::applies(&[q, k, v]) {
        return Some(attention::attention(q, k, v, scale));
    }
    let _ = (q, k, v, scale);
    None
}

/// The fused group norm (and SiLU), for f32 on the CPU.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Option<candle_core::Result<Tensor>> {
    f32_cpu(&[x, weight, bias]).then(|| {
        let (gamma, beta) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        group_norm::group_norm(x, &gamma, &beta, groups, eps, silu)
    })
}

/// The group norm of `x` as a per-channel affine map, for f32 on the CPU.
pub fn group_norm_affine(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Option<candle_core::Result<(Vec<f32>, Vec<f32>)>> {
    f32_cpu(&[x, weight, bias]).then(|| {
        let (gamma, beta) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        group_norm::channel_affine(x, &gamma, &beta, groups, eps)
    })
}

/// `activation` over `x` in one vectorised pass, for f32 on the CPU.
pub fn activate(x: &Tensor, activation: Activation) -> Option<candle_core::Result<Tensor>> {
    f32_cpu(&[x]).then(|| {
        let mut values = with_data(x, <[f32]>::to_vec)?;
        values.par_chunks_mut(1 << 14).for_each(|chunk| {
            math::with_avx2(
                #[inline(always)]
                || math::activate_in_place(chunk, activation),
            )
        });
        Tensor::from_vec(values, x.dims(), x.device())
    })
}

/// GEGLU's gate in one pass, for f32 on the CPU.
pub fn geglu(projected: &Tensor) -> Option<candle_core::Result<Tensor>> {
    f32_cpu(&[projected]).then(|| geglu::geglu(projected))
}

/// Whether the OpenBLAS kernels should run here (the test helper of [`openblas`]); `false` in
/// a build without them.
#[cfg(test)]
pub(crate) fn openblas_expected() -> bool {
    #[cfg(feature = "openblas")]
    return openblas::openblas_expected();
    #[cfg(not(feature = "openblas"))]
    false
}

/// Runs `f` on the f32 elements of `t` (made contiguous first).
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("cpu kernel given a non-CPU tensor".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cpu kernel: not contiguous".into()))?;
    Ok(f(&data[start..end]))
}
