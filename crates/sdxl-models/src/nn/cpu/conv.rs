//! Convolutions on OpenBLAS: banded im2col, where a band of output rows at a time is unfolded
//! into a bounded buffer and multiplied straight into the NCHW output, so memory stays flat at
//! any image size (a full im2col of a 2048² VAE layer would take tens of GB); and 3×3 layers
//! with enough output tiles by Winograd ([`super::winograd`]).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::openblas::sgemm;
use super::{winograd, with_data, BAND_ELEMENTS};

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
    let kernels = with_data(weight, |weight| winograd::TransformedKernels::new(weight, c_out, c_in))?;
    let bias = bias.to_vec1::<f32>()?;
    let layer = winograd::Winograd { c_in, c_out, h, w, padding, upsample, kernels: kernels.values(), bias: &bias };
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

pub(super) struct ConvShape {
    pub(super) c_in: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl ConvShape {
    pub(super) fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }

    pub(super) fn out_w(&self) -> usize {
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
