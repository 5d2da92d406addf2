//! The CPU kernels at SDXL's shapes, each beside the path it replaces: the int8 matrix product
//! against the f32 one, the Winograd convolution against candle's, and the fused attention
//! against candle's composed one; and the text encoders' few-row products on packed panels
//! against `sgemm`. Shapes are the 1024² UNet's and the 512² VAE's, cut in the token
//! dimension so that a run takes minutes, not hours.
//!
//!     cargo bench -p sdxl-models --bench kernels
//!
//! The f32 products and Winograd run on OpenBLAS where the library is installed (the default
//! `openblas` feature loads it at run time); without it Winograd is left out.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sdxl_models::nn::kernels::{self, Int8Matrix, PanelMatrix};

fn random(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("a random tensor")
}

/// `[M, K] · [N, K]ᵀ`: the transformer blocks' projections and feed-forward layers at 1024²
/// (M = 1024 tokens at the 1280-channel level, 4096 at the 640-channel level).
fn matmul(c: &mut Criterion) {
    let shapes = [(1024, 1280, 10240), (1024, 5120, 1280), (4096, 640, 5120), (4096, 2560, 640)];
    let mut group = c.benchmark_group("matmul_nt");
    group.sample_size(10);
    for (m, k, n) in shapes {
        let x = random(&[m, k]);
        let w = random(&[n, k]);
        let int8 = Int8Matrix::quantize(&w).expect("quantize");
        let id = format!("{m}x{k}x{n}");
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_with_input(BenchmarkId::new("f32", &id), &(), |b, _| {
            b.iter(|| kernels::matmul_nt(&x, &w).expect("f32 product"))
        });
        group.bench_with_input(BenchmarkId::new("int8", &id), &(), |b, _| {
            b.iter(|| int8.matmul_nt(&x).expect("int8 product"))
        });
    }
    group.finish();
}

/// The text encoders' products: 77 tokens, OpenCLIP-bigG's and CLIP-L's layers.
fn matmul_few_rows(c: &mut Criterion) {
    let shapes = [(77, 1280, 1280), (77, 1280, 5120), (77, 5120, 1280), (77, 768, 3072), (77, 3072, 768)];
    let mut group = c.benchmark_group("matmul_few_rows");
    group.sample_size(20);
    for (m, k, n) in shapes {
        let x = random(&[m, k]);
        let w = random(&[n, k]);
        let data = w.flatten_all().and_then(|w| w.to_vec1::<f32>()).expect("weights");
        let panels = PanelMatrix::pack(&data, n, k, None);
        let xs = x.flatten_all().and_then(|x| x.to_vec1::<f32>()).expect("input");
        let id = format!("{m}x{k}x{n}");
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_with_input(BenchmarkId::new("f32", &id), &(), |b, _| {
            b.iter(|| kernels::matmul_nt(&x, &w).expect("f32 product"))
        });
        group.bench_with_input(BenchmarkId::new("panels", &id), &(), |b, _| b.iter(|| panels.matmul_nt(&xs, m, None)));
    }
    group.finish();
}

/// The VAE decoder's 3×3 convolutions at 512² output (the 512-channel level at 128², and the
/// 256-channel level at 256²), cut to a band of rows.
fn conv3x3(c: &mut Criterion) {
    let shapes = [(512, 512, 32, 128), (256, 256, 64, 256)];
    let mut group = c.benchmark_group("conv3x3");
    group.sample_size(10);
    for (cin, cout, h, w) in shapes {
        let x = random(&[1, cin, h, w]);
        let weight = random(&[cout, cin, 3, 3]);
        let bias = random(&[cout]);
        let id = format!("{cin}to{cout}_{h}x{w}");
        group.throughput(Throughput::Elements((2 * cin * cout * 9 * h * w) as u64));
        group.bench_with_input(BenchmarkId::new("candle", &id), &(), |b, _| {
            b.iter(|| x.conv2d(&weight, 1, 1, 1, 1).and_then(|y| y.broadcast_add(&bias.reshape((1, (), 1, 1))?)))
        });
        if !kernels::winograd_applies(&x, &weight, &bias, 1, false, None) {
            eprintln!("conv3x3/{id}: Winograd does not apply here (no OpenBLAS?)");
            continue;
        }
        group.bench_with_input(BenchmarkId::new("winograd", &id), &(), |b, _| {
            b.iter(|| kernels::winograd_conv2d(&x, &weight, &bias, 1, false, None, None).expect("winograd"))
        });
    }
    group.finish();
}

/// Self-attention of the 640-channel level at 1024² (4096 tokens, 10 heads of 64), cut to 2
/// heads, and cross-attention to the 77 prompt tokens.
fn attention(c: &mut Criterion) {
    let shapes = [(2, 4096, 4096, 64), (10, 4096, 77, 64)];
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for (heads, n, m, d) in shapes {
        let q = random(&[heads, n, d]);
        let k = random(&[heads, m, d]);
        let v = random(&[heads, m, d]);
        let scale = 1.0 / (d as f64).sqrt();
        let id = format!("{heads}h_{n}x{m}x{d}");
        group.throughput(Throughput::Elements((4 * heads * n * m * d) as u64));
        group.bench_with_input(BenchmarkId::new("fused", &id), &(), |b, _| {
            b.iter(|| kernels::attention(&q, &k, &v, scale).expect("attention"))
        });
        group.bench_with_input(BenchmarkId::new("composed", &id), &(), |b, _| {
            b.iter(|| composed_attention(&q, &k, &v, scale).expect("attention"))
        });
    }
    group.finish();
}

/// Attention as candle's ops compose it: the whole score matrix, then softmax, then `· v`.
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.matmul(v)
}

criterion_group!(benches, matmul, matmul_few_rows, conv3x3, attention);
criterion_main!(benches);
