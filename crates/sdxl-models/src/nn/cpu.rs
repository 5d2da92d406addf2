//! f32 CPU kernels on OpenBLAS's `sgemm`, which runs SDXL's matrix shapes several times faster
//! than candle's own GEMM (see docs/performance.md).
//!
//! - Convolutions are banded im2col: a band of output rows at a time is unfolded into a
//!   bounded buffer and multiplied straight into the NCHW output, so memory stays flat at any
//!   image size (a full im2col of a 2048² VAE layer would take tens of GB).
//! - Attention runs per head and per block of query rows, with the softmax in between: the
//!   whole score matrix is never held.
//! - OpenBLAS is loaded at run time; where it is missing, or `SDXL_OPENBLAS=off`, the
//!   dispatcher ([`super::kernels`]) runs candle's ops instead.

use std::os::raw::c_int;
use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

mod winograd;

use super::math::{self, with_avx2};

type Sgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

/// OpenBLAS, loaded at run time so that a machine without it still runs (on candle's kernels).
struct OpenBlas {
    sgemm: Sgemm,
    _library: libloading::Library,
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The names the system's OpenBLAS is loaded by, in order.
const LIBRARY_NAMES: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

/// `SDXL_OPENBLAS=off` keeps OpenBLAS unloaded even where it is installed, so that the f32
/// kernels run on candle's ops: to compare the two paths, or to test the fallback.
const SWITCH: &str = "SDXL_OPENBLAS";

/// Whether `SDXL_OPENBLAS=off` is set.
fn switched_off() -> bool {
    std::env::var_os(SWITCH).is_some_and(|v| v == "off")
}

/// The system's OpenBLAS, or `None` when it cannot be loaded or `SDXL_OPENBLAS=off`.
///
/// Unless the user chose one, `OPENBLAS_CORETYPE` is set from the CPU's features before
/// loading (OpenBLAS reads it as it initialises): distributions' OpenBLAS builds fall back to
/// SSE3 kernels on CPU models newer than they know, several times slower. OpenBLAS threads
/// each product itself (measured faster than splitting products across rayon's threads).
fn openblas() -> Option<&'static OpenBlas> {
    static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();
    OPENBLAS
        .get_or_init(|| {
            if switched_off() {
                return None;
            }
            if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
                if let Some(core) = core_type() {
                    std::env::set_var("OPENBLAS_CORETYPE", core);
                }
            }
            // OpenBLAS's idle threads spin (yielding) for about 2²⁸ cycles after each product,
            // taking cores from the element-wise work between products; 2⁴ makes them sleep
            // at once (waking costs microseconds, a product milliseconds).
            if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() {
                std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "4");
            }
            LIBRARY_NAMES.iter().find_map(|name| {
                // SAFETY: loading OpenBLAS runs its initialiser, which only reads the
                // environment and sizes its buffers.
                let library = unsafe { libloading::Library::new(name) }.ok()?;
                // SAFETY: `cblas_sgemm` has the C signature `Sgemm` declares.
                let sgemm = *unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") }.ok()?;
                Some(OpenBlas { sgemm, _library: library })
            })
        })
        .as_ref()
}

/// OpenBLAS's name for the best kernels this CPU runs.
fn core_type() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            return Some("SkylakeX");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some("Haswell");
        }
    }
    None
}

/// Floats per unfolded band of a convolution, and per block of attention scores (32 MB):
/// wide enough for GEMM efficiency, small enough to stay near the caches.
const BAND_ELEMENTS: usize = 8 << 20;

/// Whether these tensors take the OpenBLAS path: f32, on the CPU, with OpenBLAS installed.
pub fn applies(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu()) && openblas().is_some()
}

/// Row-major `C = alpha · A · op(B)`, `C` `[m, n]` with row stride `ldc`; `op` transposes `B`
/// when asked. The slices are checked to hold every element the call reads or writes.
fn sgemm(
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    let (a_rows, a_cols) = (m, k);
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    assert!(a_cols <= lda && b_cols <= ldb && n <= ldc, "sgemm: leading dimension too small");
    assert!(a_rows == 0 || a.len() >= (a_rows - 1) * lda + a_cols, "sgemm: A too short");
    assert!(b_rows == 0 || b.len() >= (b_rows - 1) * ldb + b_cols, "sgemm: B too short");
    assert!(c.len() >= (m - 1) * ldc + n, "sgemm: C too short");
    let int = |v: usize| c_int::try_from(v).expect("sgemm: dimension exceeds the BLAS integer range");
    let openblas = openblas().expect("sgemm runs only where `applies` found OpenBLAS");
    // SAFETY: the assertions above keep every access of the row-major call inside the slices.
    unsafe {
        (openblas.sgemm)(
            ROW_MAJOR,
            NO_TRANS,
            if trans_b { TRANS } else { NO_TRANS },
            int(m),
            int(n),
            int(k),
            alpha,
            a.as_ptr(),
            int(lda),
            b.as_ptr(),
            int(ldb),
            0.0,
            c.as_mut_ptr(),
            int(ldc),
        )
    }
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

/// `a` `[M, K]` · `b`ᵀ, `b` `[N, K]`.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (n, k2) = b.dims2()?;
    if k != k2 {
        return Err(candle_core::Error::Msg(format!("matmul: inner dimensions {k} and {k2} differ")));
    }
    let mut out = vec![0f32; m * n];
    with_data(a, |a| with_data(b, |b| sgemm(true, (m, n, k), 1.0, (a, k), (b, k), (&mut out, n))))??;
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// Convolution plus bias; see the module comment.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (batch, c_in, h, w) = x.dims4()?;
    let (c_out, c_in2, kh, kw) = weight.dims4()?;
    if c_in != c_in2 || kh != kw || h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
        return Err(candle_core::Error::Msg(format!(
            "conv2d: input {:?} does not fit kernel {:?}",
            x.dims(),
            weight.dims()
        )));
    }
    let shape = ConvShape { c_in, h, w, k: kh, stride, padding };
    let (out_h, out_w) = (shape.out_h(), shape.out_w());
    if kh == 3 && stride == 1 && winograd::worthwhile(c_in, c_out, out_h, out_w) {
        return winograd_conv2d(x, weight, bias, padding, false, None, None);
    }
    let plane = out_h * out_w;
    let mut out = vec![0f32; batch * c_out * plane];
    with_data(x, |x| {
        with_data(weight, |weight| {
            for (input, output) in x.chunks_exact(c_in * h * w).zip(out.chunks_exact_mut(c_out * plane)) {
                shape.run(input, weight, c_out, output);
            }
        })
    })??;
    let bias = bias.to_vec1::<f32>()?;
    out.par_chunks_mut(plane).enumerate().for_each(|(i, plane)| plane.iter_mut().for_each(|v| *v += bias[i % c_out]));
    Tensor::from_vec(out, (batch, c_out, out_h, out_w), &Device::Cpu)
}

/// Whether [`winograd_conv2d`] takes this 3×3 stride-1 convolution of `x` (after 2×
/// upsampling when `upsample`): enough output tiles to beat im2col.
pub fn winograd_applies(x: &Tensor, weight: &Tensor, padding: usize, upsample: bool) -> bool {
    let (Ok((_, c_in, h, w)), Ok((c_out, c_in2, 3, 3))) = (x.dims4(), weight.dims4()) else {
        return false;
    };
    let scale = if upsample { 2 } else { 1 };
    let (in_h, in_w) = (scale * h, scale * w);
    c_in == c_in2
        && in_h + 2 * padding >= 3
        && in_w + 2 * padding >= 3
        && winograd::worthwhile(c_in, c_out, in_h + 2 * padding - 2, in_w + 2 * padding - 2)
}

/// A 3×3 stride-1 convolution plus bias by Winograd's F(4×4, 3×3), of `x` after nearest 2×
/// upsampling when `upsample`, and after `silu(x · scale + shift)` per (image, channel) when
/// `affine` (`[B · Cin]` each) is given; neither intermediate is stored. `residual` (of the
/// output's shape) is added to the result as `residual + (conv + bias)`, as a ResNet block's
/// skip connection, without a separate sum tensor.
pub fn winograd_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    upsample: bool,
    affine: Option<(&[f32], &[f32])>,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (batch, c_in, h, w) = x.dims4()?;
    let (c_out, _, _, _) = weight.dims4()?;
    let kernels = with_data(weight, |weight| winograd::transform_kernels(weight, c_out, c_in))?;
    let bias = bias.to_vec1::<f32>()?;
    let layer = winograd::Winograd { c_in, c_out, h, w, padding, upsample, kernels: &kernels, bias: &bias };
    let (out_h, out_w) = (layer.out_h(), layer.out_w());
    let mut out = match residual {
        Some(residual) => {
            if residual.dims() != [batch, c_out, out_h, out_w] {
                return Err(candle_core::Error::Msg(format!(
                    "winograd: residual of shape {:?}, the output is {:?}",
                    residual.dims(),
                    [batch, c_out, out_h, out_w]
                )));
            }
            with_data(residual, <[f32]>::to_vec)?
        }
        None => vec![0f32; batch * c_out * out_h * out_w],
    };
    // scratch kept per thread, like the im2col band
    thread_local!(static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) });
    with_data(x, |x| {
        SCRATCH.with_borrow_mut(|(tiles, products)| {
            let images = x.chunks_exact(c_in * h * w).zip(out.chunks_exact_mut(c_out * out_h * out_w));
            for (b, (input, output)) in images.enumerate() {
                let prologue = affine.map(|(scale, shift)| winograd::Prologue {
                    scale: &scale[b * c_in..][..c_in],
                    shift: &shift[b * c_in..][..c_in],
                });
                layer.run(input, prologue.as_ref(), output, tiles, products);
            }
        })
    })?;
    Tensor::from_vec(out, (batch, c_out, out_h, out_w), &Device::Cpu)
}

struct ConvShape {
    c_in: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl ConvShape {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }

    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k) / self.stride + 1
    }

    /// One image: `input` `[Cin, H, W]`, `output` `[Cout, H', W']`.
    fn run(&self, input: &[f32], weight: &[f32], c_out: usize, output: &mut [f32]) {
        let (out_h, out_w) = (self.out_h(), self.out_w());
        let plane = out_h * out_w;
        if self.k == 1 && self.stride == 1 && self.padding == 0 {
            sgemm(false, (c_out, plane, self.c_in), 1.0, (weight, self.c_in), (input, plane), (output, plane));
            return;
        }
        let depth = self.c_in * self.k * self.k;
        let band_rows = (BAND_ELEMENTS / (depth * out_w)).clamp(1, out_h);
        // The unfolded band is scratch space, kept per thread: a fresh 32 MB buffer per
        // convolution would be paid in page faults.
        thread_local!(static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
        COLUMNS.with_borrow_mut(|columns| self.run_bands(input, weight, c_out, output, band_rows, columns));
    }

    fn run_bands(
        &self,
        input: &[f32],
        weight: &[f32],
        c_out: usize,
        output: &mut [f32],
        band_rows: usize,
        columns: &mut Vec<f32>,
    ) {
        let (out_h, out_w) = (self.out_h(), self.out_w());
        let plane = out_h * out_w;
        let depth = self.c_in * self.k * self.k;
        columns.resize(columns.len().max(depth * band_rows * out_w), 0.0);
        for first in (0..out_h).step_by(band_rows) {
            let rows = band_rows.min(out_h - first);
            let width = rows * out_w;
            let columns = &mut columns[..depth * width];
            columns.par_chunks_mut(width).enumerate().for_each(|(row, dst)| self.unfold(input, row, first, dst));
            let band = &mut output[first * out_w..];
            sgemm(false, (c_out, width, depth), 1.0, (weight, depth), (columns, width), (band, plane));
        }
    }

    /// Row `row` of the im2col matrix (input channel `c`, kernel offset `ky`, `kx`) for the
    /// output rows starting at `first`: the input pixel each output position reads, 0 outside.
    fn unfold(&self, input: &[f32], row: usize, first: usize, dst: &mut [f32]) {
        let (c, ky, kx) = (row / (self.k * self.k), (row / self.k) % self.k, row % self.k);
        let out_w = self.out_w();
        let channel = &input[c * self.h * self.w..(c + 1) * self.h * self.w];
        for (i, dst_row) in dst.chunks_exact_mut(out_w).enumerate() {
            let iy = ((first + i) * self.stride + ky) as isize - self.padding as isize;
            if iy < 0 || iy >= self.h as isize {
                dst_row.fill(0.0);
                continue;
            }
            let src = &channel[iy as usize * self.w..(iy as usize + 1) * self.w];
            if self.stride == 1 {
                // output x reads input x + kx - padding: zero edges around one shifted copy
                let shift = kx as isize - self.padding as isize;
                let first_valid = (-shift).clamp(0, out_w as isize) as usize;
                let end_valid = (self.w as isize - shift).clamp(first_valid as isize, out_w as isize) as usize;
                dst_row[..first_valid].fill(0.0);
                let start = (first_valid as isize + shift) as usize;
                dst_row[first_valid..end_valid].copy_from_slice(&src[start..start + end_valid - first_valid]);
                dst_row[end_valid..].fill(0.0);
            } else {
                for (ox, value) in dst_row.iter_mut().enumerate() {
                    let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                    *value = if ix >= 0 && (ix as usize) < self.w { src[ix as usize] } else { 0.0 };
                }
            }
        }
    }
}

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

/// Whether the kernels should run on OpenBLAS here: the library is installed (looked up
/// directly, not through [`openblas`], so that a loader that failed silently fails the tests
/// instead of skipping the path) and not switched off with `SDXL_OPENBLAS=off`. Asserts that
/// [`openblas`] agrees.
#[cfg(test)]
pub(crate) fn openblas_expected() -> bool {
    // first, so that OpenBLAS initialises with the environment `openblas` sets
    let loaded = openblas().is_some();
    let installed = LIBRARY_NAMES.iter().any(|name| {
        // SAFETY: as in `openblas`; the symbol is only looked up, not called
        unsafe { libloading::Library::new(name) }
            .is_ok_and(|library| unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") }.is_ok())
    });
    let expected = installed && !switched_off();
    assert_eq!(
        loaded,
        expected,
        "OpenBLAS installed: {installed}, {SWITCH}=off: {}, but the loader found it: {loaded}",
        switched_off()
    );
    expected
}

// These tests run the dispatcher ([`super::kernels`]) on whichever path this machine takes:
// OpenBLAS's kernels where the library is installed (as CI does), candle's ops where it is not
// or `SDXL_OPENBLAS=off`. Either way the result is held to a direct sum in f64, and the path
// taken is the one expected.
#[cfg(test)]
mod tests {
    use super::super::kernels;
    use super::*;

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
            assert!(
                values(ours) == values(&openblas_kernel().unwrap()),
                "the dispatcher did not run the OpenBLAS kernel"
            );
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
        let input =
            |o: usize, offset: usize, size: usize| (o * stride + offset).checked_sub(padding).filter(|&i| i < size);
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
                    weights
                        .push(scale * query.iter().zip(key).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>());
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
            let (x, weight, bias) =
                (random(&[2, c_in, h, w], 3), random(&[c_out, c_in, k, k], 4), random(&[c_out], 10));
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
            let (x, weight, bias) =
                (random(&[2, c_in, h, w], 8), random(&[c_out, c_in, 3, 3], 9), random(&[c_out], 10));
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
}
