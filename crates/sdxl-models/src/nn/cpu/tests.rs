//! The OpenBLAS kernels through the dispatcher ([`crate::nn::kernels`]), on whichever path this
//! machine takes: OpenBLAS's kernels where the library is installed (as CI does), candle's ops
//! where it is not or `SDXL_OPENBLAS=off`. Either way the result is held to a direct sum in
//! f64, and the path taken is the one expected.

use candle_core::{Device, Tensor};

use super::attention::attention;
use super::conv::{conv2d, ConvShape};
use super::openblas::{applies, matmul_nt, openblas_expected};
use super::winograd;
use crate::nn::kernels;
/// Max absolute difference from the f64 reference: dot products of up to 160 terms in [-1, 1].
const MATMUL_ATOL: f32 = 1e-3;
/// Max absolute difference from the f64 reference: sums of up to 37 terms in [-1, 1].
const CONV_ATOL: f32 = 1e-4;
/// Max difference from the f64 reference relative to the output's largest value: Winograd's
/// F(4×4, 3×3) rounds more than a direct sum (about 1e-5 here), far below a u8 pixel step.
const WINOGRAD_RTOL: f32 = 3e-5;
/// Max absolute difference from the f64 reference: a softmax-weighted mean of values in [-1, 1].
const ATTENTION_ATOL: f32 = 1e-5;

/// Deterministic values in [-1, 1] that differ per `seed`.
fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| ((i as f32 + 0.5) * 0.7548 + seed as f32 * 1.37).sin()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Asserts that the dispatcher took the path this machine should: on OpenBLAS, `ours` is
/// the very bits of calling the OpenBLAS kernel directly.
fn assert_path(inputs: &[&Tensor], ours: &Tensor, openblas_kernel: impl FnOnce() -> candle_core::Result<Tensor>) {
    let expected = openblas_expected();
    assert_eq!(applies(inputs), expected, "the dispatcher's choice of OpenBLAS");
    if expected {
        assert!(values(ours) == values(&openblas_kernel().unwrap()), "the dispatcher did not run the OpenBLAS kernel");
    }
}

/// `a` `[M, K]` · `b`ᵀ (`b` `[N, K]`) by direct sums in f64.
fn reference_matmul_nt(a: &Tensor, b: &Tensor) -> Tensor {
    let ((m, k), (n, _)) = (a.dims2().unwrap(), b.dims2().unwrap());
    let (a, b) = (values(a), values(b));
    let mut out = Vec::with_capacity(m * n);
    for row in 0..m {
        for col in 0..n {
            let (a, b) = (&a[row * k..][..k], &b[col * k..][..k]);
            out.push(a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>() as f32);
        }
    }
    Tensor::from_vec(out, (m, n), &Device::Cpu).unwrap()
}

/// Convolution of `x` `[B, Cin, H, W]` with `weight` `[Cout, Cin, k, k]`, plus `bias`, by
/// direct sums in f64.
fn reference_conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Tensor {
    let (batch, c_in, h, w) = x.dims4().unwrap();
    let (c_out, _, k, _) = weight.dims4().unwrap();
    let shape = ConvShape { c_in, h, w, k, stride, padding };
    let (out_h, out_w) = (shape.out_h(), shape.out_w());
    let (x, weight, bias) = (values(x), values(weight), values(bias));
    // the input row (or column) that output row `o` reads at kernel offset `offset`, if inside
    let input = |o: usize, offset: usize, size: usize| (o * stride + offset).checked_sub(padding).filter(|&i| i < size);
    let mut out = Vec::with_capacity(batch * c_out * out_h * out_w);
    for b in 0..batch {
        for o in 0..c_out {
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let mut sum = f64::from(bias[o]);
                    for c in 0..c_in {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (Some(iy), Some(ix)) = (input(oy, ky, h), input(ox, kx, w)) else { continue };
                                let pixel = x[((b * c_in + c) * h + iy) * w + ix];
                                sum += f64::from(pixel) * f64::from(weight[((o * c_in + c) * k + ky) * k + kx]);
                            }
                        }
                    }
                    out.push(sum as f32);
                }
            }
        }
    }
    Tensor::from_vec(out, (batch, c_out, out_h, out_w), &Device::Cpu).unwrap()
}

/// `softmax(q · kᵀ · scale) · v` per head by direct sums in f64.
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let ((heads, n, d), (_, m, _)) = (q.dims3().unwrap(), k.dims3().unwrap());
    let (q, k, v) = (values(q), values(k), values(v));
    let mut out = Vec::with_capacity(heads * n * d);
    for head in 0..heads {
        for row in 0..n {
            let query = &q[(head * n + row) * d..][..d];
            let mut weights = Vec::with_capacity(m);
            for key in k[head * m * d..][..m * d].chunks_exact(d) {
                weights.push(scale * query.iter().zip(key).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>());
            }
            let max = weights.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            weights.iter_mut().for_each(|w| *w = (*w - max).exp());
            let total: f64 = weights.iter().sum();
            for e in 0..d {
                let mean = (0..m).map(|j| weights[j] * f64::from(v[(head * m + j) * d + e])).sum::<f64>() / total;
                out.push(mean as f32);
            }
        }
    }
    Tensor::from_vec(out, (heads, n, d), &Device::Cpu).unwrap()
}

#[test]
fn matmul_matches_direct_sums() {
    for (m, n, k) in [(37, 23, 19), (301, 129, 160)] {
        let (a, b) = (random(&[m, k], 1), random(&[n, k], 2));
        let ours = kernels::matmul_nt(&a, &b).unwrap();
        let error = max_difference(&ours, &reference_matmul_nt(&a, &b));
        assert!(error < MATMUL_ATOL, "{m}x{n}x{k}: {error}");
        assert_path(&[&a, &b], &ours, || matmul_nt(&a, &b));
    }
}

#[test]
fn convolutions_match_direct_sums_for_every_shape_the_models_use() {
    // (Cin, Cout, H, W, k, stride, padding): 3×3 same, strided down-sampling with and
    // without padding, 1×1, and odd sizes.
    let cases = [(3, 5, 9, 7, 3, 1, 1), (4, 6, 10, 9, 3, 2, 1), (4, 6, 10, 9, 3, 2, 0), (6, 3, 5, 4, 1, 1, 0)];
    for (c_in, c_out, h, w, k, stride, padding) in cases {
        let case = (c_in, c_out, h, w, k, stride, padding);
        let (x, weight, bias) = (random(&[2, c_in, h, w], 3), random(&[c_out, c_in, k, k], 4), random(&[c_out], 10));
        let ours = kernels::conv2d(&x, &weight, &bias, stride, padding).unwrap();
        let error = max_difference(&ours, &reference_conv2d(&x, &weight, &bias, stride, padding));
        assert!(error < CONV_ATOL, "{case:?}: {error}");
        assert_path(&[&x, &weight, &bias], &ours, || conv2d(&x, &weight, &bias, stride, padding));
    }
}

#[test]
fn winograd_convolutions_match_direct_sums() {
    // (Cin, Cout, H, W, padding): odd sizes that leave partial tiles at the edges
    for (c_in, c_out, h, w, padding) in [(8, 9, 33, 35, 1), (9, 8, 38, 34, 0), (16, 12, 64, 61, 1)] {
        let case = (c_in, c_out, h, w, padding);
        let (out_h, out_w) = (h + 2 * padding - 2, w + 2 * padding - 2);
        assert!(winograd::worthwhile(c_in, c_out, out_h, out_w), "the case must take the Winograd path");
        let (x, weight, bias) = (random(&[2, c_in, h, w], 8), random(&[c_out, c_in, 3, 3], 9), random(&[c_out], 10));
        let ours = kernels::conv2d(&x, &weight, &bias, 1, padding).unwrap();
        let expected = reference_conv2d(&x, &weight, &bias, 1, padding);
        let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let relative = max_difference(&ours, &expected) / scale;
        assert!(relative < WINOGRAD_RTOL, "{case:?}: relative error {relative}");
        assert_path(&[&x, &weight, &bias], &ours, || conv2d(&x, &weight, &bias, 1, padding));
    }
}

#[test]
fn attention_matches_direct_sums() {
    let (q, k, v) = (random(&[3, 11, 8], 5), random(&[3, 7, 8], 6), random(&[3, 7, 8], 7));
    let ours = kernels::attention(&q, &k, &v, 0.35).unwrap();
    let error = max_difference(&ours, &reference_attention(&q, &k, &v, 0.35));
    assert!(error < ATTENTION_ATOL, "{error}");
    assert_path(&[&q, &k, &v], &ours, || attention(&q, &k, &v, 0.35));
}
