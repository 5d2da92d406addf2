//! The heavy kernels, one dispatcher for every device: matrix products (f32, narrow, int8),
//! convolutions, attention, group norm and GEGLU. On the CPU in f32 they run on the kernels under
//! [`super::cpu`] (OpenBLAS's sgemm where the `openblas` feature and the library are there;
//! fused element-wise passes); on a CUDA device in f16/bf16, with the `flash-attn` feature,
//! attention runs on flash attention v2; otherwise, and for other dtypes and devices, on
//! candle's own ops (cuBLAS on a CUDA device).

use candle_core::{DType, Tensor, D};

use super::cpu;
use super::Activation;

/// An int8 weight matrix for `x · Wᵀ` on the CPU (`--quantize int8`).
pub use super::cpu::Int8Matrix;
/// An f32 weight matrix packed for products with few rows on the CPU (the text encoders).
pub use super::cpu::PanelMatrix;
/// An int8 convolution on the CPU (`--quantize int8`), and how it reads its input.
pub use super::cpu::{ConvInput, Int8Conv};

/// Sets, before any thread starts, the environment the CPU kernels' libraries read as they
/// load (OpenBLAS's core type and thread timeout; see `nn/cpu/openblas.rs`). It writes the
/// process environment, which is only sound while no other thread runs: call it first thing
/// in `main`. Without it everything still works, possibly on slower OpenBLAS kernels.
pub fn prepare_process() {
    cpu::prepare_environment();
}

/// Whether [`pack_panels`] takes this weight: f32 on the CPU, where the kernel runs.
pub fn panels_apply(weight: &Tensor) -> bool {
    cpu::panels_apply(weight)
}

/// `weight` (`[N, K]`) packed for [`panels_matmul_nt`], with the `bias` (`[N]`) it adds;
/// only where [`panels_apply`].
pub fn pack_panels(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<PanelMatrix> {
    cpu::pack_panels(weight, bias)
}

/// `a · Wᵀ (+ bias)` for `a` `[M, K]` (f32 on the CPU) with a packed `W`: `[M, N]`, then
/// `then` applied as the sums are stored.
pub fn panels_matmul_nt(a: &Tensor, weight: &PanelMatrix, then: Option<Activation>) -> candle_core::Result<Tensor> {
    cpu::panels_matmul_nt(a, weight, then)
}

/// `activation` applied to every value of `x`.
pub fn activate(x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu::activate(x, activation) {
        return out;
    }
    match activation {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
    }
}

/// `a · bᵀ` for `a` `[M, K]` and `b` `[N, K]` (a weight as torch stores it): `[M, N]`.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu::matmul_nt(a, b) {
        return out;
    }
    a.matmul(&b.t()?)
}

/// A convolution of `x` `[B, Cin, H, W]` with `weight` `[Cout, Cin, k, k]`, plus `bias` `[Cout]`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu::conv2d(x, weight, bias, stride, padding) {
        return out;
    }
    x.conv2d(weight, padding, stride, 1, 1)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

/// Whether [`winograd_conv2d`] takes this stride-1 3×3 convolution of `x` (after 2×
/// upsampling when `upsample`, adding `residual` when given): f32 on the CPU with OpenBLAS,
/// and enough output tiles to beat im2col.
pub fn winograd_applies(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    upsample: bool,
    residual: Option<&Tensor>,
) -> bool {
    cpu::winograd_applies(x, weight, bias, padding, upsample, residual)
}

/// A 3×3 stride-1 convolution plus bias by Winograd's F(4×4, 3×3), of `x` after nearest 2×
/// upsampling when `upsample`, and after `silu(x · scale + shift)` per (image, channel) when
/// `affine` (`[B · Cin]` each) is given; neither intermediate is stored. `residual` (of the
/// output's shape) is added as `residual + (conv + bias)`, as a ResNet block's skip
/// connection, without a separate sum tensor. Only where [`winograd_applies`].
pub fn winograd_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    upsample: bool,
    affine: Option<(&[f32], &[f32])>,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    cpu::winograd_conv2d(x, weight, bias, padding, upsample, affine, residual)
}

/// `softmax(q · kᵀ · scale) · v` per head, for `q` `[BH, N, d]` and `k`, `v` `[BH, M, d]`;
/// the softmax runs in f32 whatever the compute dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu::attention(q, k, v, scale as f32) {
        return out;
    }
    let dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    probs.matmul(v)
}

/// `group_norm(x) · weight + bias` over `groups` groups of `x` `[B, C, ...]`, then SiLU when
/// `silu`. On the CPU in f32 one fused pass (candle's composed version makes several full
/// passes and temporaries, which dominate the VAE's large, shallow layers).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu::group_norm(x, weight, bias, groups, eps, silu) {
        return out;
    }
    let norm = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), x.dim(1)?, groups, eps)?;
    let y = candle_core::Module::forward(&norm, x)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

/// The group norm of `x` as a per-channel `x · scale + shift`: `(scale, shift)`, each
/// `[B · C]`, for a kernel to apply as it reads `x` ([`winograd_conv2d`]); `None` where the
/// fused kernel does not run (other dtypes and devices).
pub fn group_norm_affine(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
    cpu::group_norm_affine(x, weight, bias, groups, eps).transpose()
}

/// `hidden · gelu(gate)` for `hidden, gate = projected.chunk(2, dim=-1)` (GEGLU).
pub fn geglu(projected: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(out) = cpu::geglu(projected) {
        return out;
    }
    let half = projected.dim(D::Minus1)? / 2;
    let hidden = projected.narrow(D::Minus1, 0, half)?;
    let gate = projected.narrow(D::Minus1, half, half)?;
    hidden * gate.gelu_erf()?
}

/// Whether the OpenBLAS kernels should run on this machine (for tests that check which path
/// the dispatcher took).
#[cfg(test)]
pub(crate) fn openblas_expected() -> bool {
    cpu::openblas_expected()
}

/// Whether [`flash_attention`] runs for activations like `x` with heads of `head_dim`: f16 or
/// bf16 on a CUDA device, in a build with the `flash-attn` feature, for the head sizes the
/// kernels are compiled for.
pub fn flash_applies(x: &Tensor, head_dim: usize) -> bool {
    cfg!(feature = "flash-attn")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && head_dim.is_multiple_of(8)
        && head_dim <= 256
}

/// `softmax(q · kᵀ · scale) · v` for `q` `[B, N, H, d]` and `k`, `v` `[B, M, H, d]` (the layout
/// the projections produce, so no transpose is needed), by flash attention v2: `[B, N, H, d]`.
/// Only where [`flash_applies`].
#[cfg(feature = "flash-attn")]
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    candle_flash_attn::flash_attn(q, k, v, scale as f32, false)
}

#[cfg(not(feature = "flash-attn"))]
pub fn flash_attention(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> candle_core::Result<Tensor> {
    Err(candle_core::Error::Msg("flash attention needs a build with the `flash-attn` feature".into()))
}
