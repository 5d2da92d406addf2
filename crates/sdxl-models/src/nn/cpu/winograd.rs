//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each 4×4 block of output is computed from a 6×6 block of input with 36 multiplications
//! per input/output channel pair instead of 144: the input tiles and the kernels are moved
//! into a transformed space (`Bᵀ d B`, `G g Gᵀ`), where the convolution becomes 36 independent
//! matrix products `[Cout × Cin] · [Cin × tiles]` (OpenBLAS), and the products are moved back
//! (`Aᵀ m A`). 3×3 convolutions are 94 % of the VAE's work and a quarter of the UNet's, so
//! this is the single largest saving on the CPU. The transforms add rounding error of order
//! 1e-6 relative in f32, far below what a u8 pixel resolves.
//!
//! Layouts are chosen so that every product reads and writes plain row-major matrices with a
//! leading dimension: kernels as `[Cout][36][Cin]`, input tiles as `[Cin][36][tiles]`,
//! products as `[Cout][36][tiles]`; the transforms then run in parallel over channels.

use std::sync::Mutex;

use rayon::prelude::*;

use super::math::{self, with_avx2};
use super::openblas::sgemm;

/// Output tile edge, input tile edge, and positions per transformed tile.
const OUT: usize = 4;
const IN: usize = 6;
const POSITIONS: usize = IN * IN;

/// Floats of transformed input (or products) per chunk of tile rows: enough tiles for
/// efficient products, few enough that the chunk stays near the caches.
const CHUNK_ELEMENTS: usize = 4 << 20;

/// Whether Winograd beats im2col for this layer. With few tiles per image the products are
/// too thin and transforming the kernels dominates (the UNet's 16×16 level).
pub(super) fn worthwhile(c_in: usize, c_out: usize, out_h: usize, out_w: usize) -> bool {
    let tiles = out_h.div_ceil(OUT) * out_w.div_ceil(OUT);
    tiles >= 64 && c_in >= 8 && c_out >= 8
}

/// One image: `input` `[Cin, H, W]`, `weight` `[Cout, Cin, 3, 3]` → `output` `[Cout, H', W']`
/// with `H' = 2H + 2·padding − 2` when `upsample`, else `H + 2·padding − 2`.
///
/// What would be separate passes over the input before the convolution is applied as each
/// input line is read (see [`Prologue`]), so the pre-processed input is never stored: a
/// 2048² VAE layer's would be gigabytes.
pub(super) struct Winograd<'a> {
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
    pub padding: usize,
    /// Nearest-neighbour 2× upsampling of the input first (diffusers' `Upsample2D`).
    pub upsample: bool,
    /// Transformed kernels, `[Cout][36][Cin]`.
    pub kernels: &'a [f32],
    /// `[Cout]`, added to the output.
    pub bias: &'a [f32],
}

/// The buffer of the last call's transformed kernels, kept for the next. A 640-channel layer's
/// are 59 MB: freed, the allocator hands that back to the system, and the next layer faults it
/// in again page by page, which was 7 % of an f32 UNet step at 512². One buffer for the
/// process (the largest layer's, 236 MB at the 1024² UNet's 1280-channel level, which every
/// call of that layer needed anyway); a call that finds it in use allocates its own.
static KERNELS: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// Transformed kernels, `[Cout][36][Cin]`, in the kept buffer where it is free.
pub(super) struct TransformedKernels(Vec<f32>);

impl TransformedKernels {
    /// Transforms `weight` `[Cout, Cin, 3, 3]` (`G g Gᵀ` per channel pair).
    pub(super) fn new(weight: &[f32], c_out: usize, c_in: usize) -> Self {
        let mut buffer = KERNELS.try_lock().map(|mut kept| std::mem::take(&mut *kept)).unwrap_or_default();
        let len = c_out * POSITIONS * c_in;
        // every element is written below: only growth needs filling
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        buffer.truncate(len);
        transform_kernels(weight, c_in, &mut buffer);
        Self(buffer)
    }

    pub(super) fn values(&self) -> &[f32] {
        &self.0
    }
}

impl Drop for TransformedKernels {
    fn drop(&mut self) {
        if let Ok(mut kept) = KERNELS.try_lock() {
            if kept.capacity() < self.0.capacity() {
                *kept = std::mem::take(&mut self.0);
            }
        }
    }
}

/// Transforms `weight` `[Cout, Cin, 3, 3]` into `kernels` `[Cout][36][Cin]`.
fn transform_kernels(weight: &[f32], c_in: usize, kernels: &mut [f32]) {
    kernels.par_chunks_mut(POSITIONS * c_in).enumerate().for_each(|(k, dst)| {
        for c in 0..c_in {
            let g = &weight[(k * c_in + c) * 9..][..9];
            // G · g: 6×3, then (G · g) · Gᵀ: 6×6
            let mut gg = [[0f32; 3]; IN];
            for col in 0..3 {
                let column = filter_transform([g[col], g[3 + col], g[6 + col]]);
                for (row, value) in column.into_iter().enumerate() {
                    gg[row][col] = value;
                }
            }
            for (row, values) in gg.iter().enumerate() {
                for (col, value) in filter_transform(*values).into_iter().enumerate() {
                    dst[(row * IN + col) * c_in + c] = value;
                }
            }
        }
    });
}

/// Per input channel `c`, `silu(x · scale[c] + shift[c])` (a group norm and SiLU) before the
/// convolution; `[Cin]` each.
pub(super) struct Prologue<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
}

impl Winograd<'_> {
    /// The convolution's input size (after upsampling).
    fn in_h(&self) -> usize {
        if self.upsample {
            2 * self.h
        } else {
            self.h
        }
    }

    fn in_w(&self) -> usize {
        if self.upsample {
            2 * self.w
        } else {
            self.w
        }
    }

    pub fn out_h(&self) -> usize {
        self.in_h() + 2 * self.padding - 2
    }

    pub fn out_w(&self) -> usize {
        self.in_w() + 2 * self.padding - 2
    }

    /// Convolves one image; `tiles` and `products` are reusable scratch space.
    pub fn run(
        &self,
        input: &[f32],
        prologue: Option<&Prologue>,
        output: &mut [f32],
        tiles: &mut Vec<f32>,
        products: &mut Vec<f32>,
    ) {
        let (tiles_h, tiles_w) = (self.out_h().div_ceil(OUT), self.out_w().div_ceil(OUT));
        let rows_per_chunk = (CHUNK_ELEMENTS / (POSITIONS * self.c_in.max(self.c_out) * tiles_w)).clamp(1, tiles_h);
        let chunk_tiles = rows_per_chunk * tiles_w;
        tiles.resize(tiles.len().max(self.c_in * POSITIONS * chunk_tiles), 0.0);
        products.resize(products.len().max(self.c_out * POSITIONS * chunk_tiles), 0.0);
        for first_row in (0..tiles_h).step_by(rows_per_chunk) {
            let rows = rows_per_chunk.min(tiles_h - first_row);
            let n = rows * tiles_w;
            let tiles = &mut tiles[..self.c_in * POSITIONS * n];
            let products = &mut products[..self.c_out * POSITIONS * n];
            tiles.par_chunks_mut(POSITIONS * n).enumerate().for_each(|(c, dst)| {
                let channel = &input[c * self.h * self.w..][..self.h * self.w];
                let affine = prologue.map(|p| (p.scale[c], p.shift[c]));
                with_avx2(
                    #[inline(always)]
                    || self.transform_input(channel, affine, first_row, rows, tiles_w, dst),
                );
            });
            for position in 0..POSITIONS {
                sgemm(
                    false,
                    (self.c_out, n, self.c_in),
                    1.0,
                    (&self.kernels[position * self.c_in..], POSITIONS * self.c_in),
                    (&tiles[position * n..], POSITIONS * n),
                    (&mut products[position * n..], POSITIONS * n),
                );
            }
            let plane = self.out_h() * self.out_w();
            output.par_chunks_mut(plane).zip(products.par_chunks(POSITIONS * n)).zip(self.bias).for_each(
                |((out, products), &bias)| {
                    with_avx2(
                        #[inline(always)]
                        || self.transform_output(products, bias, first_row, rows, tiles_w, out),
                    )
                },
            );
        }
    }

    /// `Bᵀ d B` for every tile of one input channel in tile rows `first_row..first_row + rows`,
    /// written to `dst` `[36][tiles]`. Both passes run across a whole row of tiles at once
    /// ([`map_lanes`]): each input line is first split into its four column phases
    /// (`phase[c][t]` = column `4t + c`), which makes "column `j` of every tile" a plain slice.
    #[inline(always)]
    fn transform_input(
        &self,
        channel: &[f32],
        affine: Option<(f32, f32)>,
        first_row: usize,
        rows: usize,
        tiles_w: usize,
        dst: &mut [f32],
    ) {
        let (in_h, in_w) = (self.in_h(), self.in_w());
        let n = rows * tiles_w;
        let stride = tiles_w + 1;
        let mut phases = vec![0f32; OUT * stride];
        // one input line with its padding; zero beyond the image
        let mut padded = vec![0f32; OUT * stride];
        // lines[y][j]: element j of line y of each tile after the row transform, `[6][6][tiles_w]`
        let mut lines = vec![0f32; IN * IN * tiles_w];
        let mut transformed = vec![0f32; IN * tiles_w];
        for row in 0..rows {
            let top = ((first_row + row) * OUT) as isize - self.padding as isize;
            for (y, line) in lines.chunks_exact_mut(IN * tiles_w).enumerate() {
                let iy = top + y as isize;
                if iy < 0 || iy >= in_h as isize {
                    line.fill(0.0);
                    continue;
                }
                // padded column x is input column x − padding (zero padding is not activated)
                let source_row = if self.upsample { iy as usize / 2 } else { iy as usize };
                let src = &channel[source_row * self.w..][..self.w];
                let count = in_w.min(padded.len() - self.padding);
                let dst = &mut padded[self.padding..self.padding + count];
                match (self.upsample, affine) {
                    (false, None) => dst.copy_from_slice(&src[..count]),
                    (false, Some((scale, shift))) => {
                        for (d, &x) in dst.iter_mut().zip(src) {
                            *d = math::silu(x * scale + shift);
                        }
                    }
                    (true, _) => {
                        for (pair, &x) in dst.chunks_mut(2).zip(src) {
                            let value = affine.map_or(x, |(scale, shift)| math::silu(x * scale + shift));
                            pair.fill(value);
                        }
                    }
                }
                let (p0, rest) = phases.split_at_mut(stride);
                let (p1, rest) = rest.split_at_mut(stride);
                let (p2, p3) = rest.split_at_mut(stride);
                for (t, quad) in padded.chunks_exact(OUT).enumerate() {
                    (p0[t], p1[t], p2[t], p3[t]) = (quad[0], quad[1], quad[2], quad[3]);
                }
                let d = std::array::from_fn(|j| &phases[(j % OUT) * stride + j / OUT..][..tiles_w]);
                map_lanes(d, line, input_transform);
            }
            let base = row * tiles_w;
            for j in 0..IN {
                let d = std::array::from_fn(|y| &lines[(y * IN + j) * tiles_w..][..tiles_w]);
                map_lanes(d, &mut transformed, input_transform);
                for (i, values) in transformed.chunks_exact(tiles_w).enumerate() {
                    dst[(i * IN + j) * n + base..][..tiles_w].copy_from_slice(values);
                }
            }
        }
    }

    /// `Aᵀ m A` (+ `bias`) for every tile of one output channel, from `products` `[36][tiles]`,
    /// added to the output plane (zeros, or a residual to sum in); vectorised across each row
    /// of tiles like the input transform.
    #[inline(always)]
    fn transform_output(
        &self,
        products: &[f32],
        bias: f32,
        first_row: usize,
        rows: usize,
        tiles_w: usize,
        out: &mut [f32],
    ) {
        let n = rows * tiles_w;
        let (out_h, out_w) = (self.out_h(), self.out_w());
        // columns[j][ii]: line ii of each tile after the column transform, `[6][4][tiles_w]`
        let mut columns = vec![0f32; IN * OUT * tiles_w];
        // pixel jj of line ii of each tile, `[4][tiles_w]`
        let mut pixels = vec![0f32; OUT * tiles_w];
        for row in 0..rows {
            let base = row * tiles_w;
            for (j, column) in columns.chunks_exact_mut(OUT * tiles_w).enumerate() {
                let m = std::array::from_fn(|i| &products[(i * IN + j) * n + base..][..tiles_w]);
                map_lanes(m, column, output_transform);
            }
            let top = (first_row + row) * OUT;
            for ii in 0..OUT.min(out_h - top) {
                let c = std::array::from_fn(|j| &columns[(j * OUT + ii) * tiles_w..][..tiles_w]);
                map_lanes(c, &mut pixels, output_transform);
                let line = &mut out[(top + ii) * out_w..][..out_w];
                // the last tile may reach past the image's right edge
                for (tx, tile) in line.chunks_mut(OUT).enumerate() {
                    for (jj, pixel) in tile.iter_mut().enumerate() {
                        *pixel += pixels[jj * tiles_w + tx] + bias;
                    }
                }
            }
        }
    }
}

/// `outputs[k][t] = f(inputs[0][t], …, inputs[5][t])[k]` for every `t`, `outputs` `[N][len]`.
/// Eight lanes at a time through fixed-size arrays, which LLVM turns into vector code (the
/// same loop over slices stays scalar).
#[inline(always)]
fn map_lanes<const N: usize>(inputs: [&[f32]; IN], outputs: &mut [f32], f: impl Fn([f32; IN]) -> [f32; N]) {
    const LANES: usize = 8;
    let len = inputs[0].len();
    assert!(inputs.iter().all(|input| input.len() == len) && outputs.len() == N * len);
    let whole = len - len % LANES;
    for start in (0..whole).step_by(LANES) {
        let x: [[f32; LANES]; IN] = std::array::from_fn(|j| inputs[j][start..start + LANES].try_into().unwrap());
        let mut y = [[0f32; LANES]; N];
        for lane in 0..LANES {
            let r = f(std::array::from_fn(|j| x[j][lane]));
            for k in 0..N {
                y[k][lane] = r[k];
            }
        }
        for (k, values) in y.iter().enumerate() {
            outputs[k * len + start..][..LANES].copy_from_slice(values);
        }
    }
    for t in whole..len {
        let r = f(std::array::from_fn(|j| inputs[j][t]));
        for k in 0..N {
            outputs[k * len + t] = r[k];
        }
    }
}

/// `G · g` for one column (or row) of a 3×3 kernel.
fn filter_transform([g0, g1, g2]: [f32; 3]) -> [f32; IN] {
    [
        g0 / 4.0,
        -(g0 + g1 + g2) / 6.0,
        -(g0 - g1 + g2) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    ]
}

/// `Bᵀ · d` for one column (or row) of a 6×6 input tile.
#[inline(always)]
fn input_transform([d0, d1, d2, d3, d4, d5]: [f32; IN]) -> [f32; IN] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ · m` for one column (or row) of a 6×6 product tile.
#[inline(always)]
fn output_transform([m0, m1, m2, m3, m4, m5]: [f32; IN]) -> [f32; OUT] {
    let (sum12, diff12, sum34, diff34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + sum12 + sum34, diff12 + 2.0 * diff34, sum12 + 4.0 * sum34, diff12 + 8.0 * diff34 + m5]
}
