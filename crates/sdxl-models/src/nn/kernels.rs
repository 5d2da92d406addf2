//! The heavy kernels: matrix products, convolutions and attention. On the CPU in f32, with
//! the `openblas` feature, they run on OpenBLAS's sgemm ([`super::cpu`]); on a CUDA device in
//! f16/bf16, with the `flash-attn` feature, attention runs on flash attention v2; otherwise, and
//! for other dtypes and devices, on candle's own ops (cuBLAS on a CUDA device).

use candle_core::{DType, Tensor};

/// `a · bᵀ` for `a` `[M, K]` and `b` `[N, K]` (a weight as torch stores it): `[M, N]`.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "openblas")]
    if super::cpu::applies(&[a, b]) {
        return super::cpu::matmul_nt(a, b);
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
    #[cfg(feature = "openblas")]
    if super::cpu::applies(&[x, weight, bias]) {
        return super::cpu::conv2d(x, weight, bias, stride, padding);
    }
    x.conv2d(weight, padding, stride, 1, 1)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

/// `softmax(q · kᵀ · scale) · v` per head, for `q` `[BH, N, d]` and `k`, `v` `[BH, M, d]`;
/// the softmax runs in f32 whatever the compute dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    #[cfg(feature = "openblas")]
    if super::cpu::applies(&[q, k, v]) {
        return super::cpu::attention(q, k, v, scale as f32);
    }
    let dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    probs.matmul(v)
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
