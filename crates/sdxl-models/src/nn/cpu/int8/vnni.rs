//! Int8 products on AVX-512 VNNI (`vpdpbusd`): weights in int8 with one scale per output
//! channel, activations in int8 with one scale per token (row), int32 sums, scales applied in
//! f32 as the tile is stored.
//!
//! candle's own quantized product takes a repacked path on these CPUs that measured only
//! 1.1–1.2× the f32 sgemm's speed at the UNet's shapes (and keeps a second copy of the
//! weights); this one packs the weights once, in the layout the instruction reads.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so activations are stored as `q + 128`
//! (1..=255) and each output subtracts `128 · Σₖ w` (kept per output channel).
//! Layout: output channels in panels of 16; a panel holds, for each group of 4 inputs, the 16
//! channels' 4 weights (64 bytes, one register).

use rayon::prelude::*;

/// Output channels per panel: one 512-bit register of int32 sums.
const PANEL: usize = 16;
/// Rows (tokens) and panels per register tile: 12 × 2 × 16 sums in 24 of the 32 registers,
/// so each weight register loaded feeds 12 multiply-adds.
const TILE_ROWS: usize = 12;
const TILE_PANELS: usize = 2;
/// Rows per parallel task, and panels per pass over them (128 channels: their weights stay
/// in L2 while the task's rows are read against them).
const TASK_ROWS: usize = 3 * TILE_ROWS;
const CHUNK_PANELS: usize = 8;
/// The offset that makes the activations unsigned.
const OFFSET: i32 = 128;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A weight matrix `[out, in]` packed for the kernel.
#[derive(Debug, Clone)]
pub struct Packed {
    out_dim: usize,
    in_dim: usize,
    /// `in_dim` rounded up to a group of 4 (the padding weights are zero).
    groups_dim: usize,
    /// `[panels][groups_dim / 4][16][4]`.
    weights: Vec<i8>,
    /// Per output channel, padded to whole panels (zero there).
    scales: Vec<f32>,
    /// `128 · Σₖ w` per output channel, padded like `scales`.
    offsets: Vec<i32>,
}

/// Symmetric int8 quantization of one row: the scale and the values in -127..=127.
fn quantize_row(row: &[f32], out: impl FnMut(usize, i8)) -> f32 {
    let largest = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = largest / 127.0;
    let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
    let mut out = out;
    for (k, v) in row.iter().enumerate() {
        out(k, (v * inverse).round().clamp(-127.0, 127.0) as i8);
    }
    scale
}

impl Packed {
    /// Quantizes `weight` (`[out_dim, in_dim]`, row-major) per output channel.
    pub fn quantize(weight: &[f32], out_dim: usize, in_dim: usize) -> Self {
        let groups_dim = in_dim.div_ceil(4) * 4;
        let panels = out_dim.div_ceil(PANEL);
        let panel_len = groups_dim * PANEL;
        let mut weights = vec![0i8; panels * panel_len];
        let mut scales = vec![0f32; panels * PANEL];
        let mut offsets = vec![0i32; panels * PANEL];
        for n in 0..out_dim {
            let (panel, lane) = (n / PANEL, n % PANEL);
            let base = panel * panel_len + lane * 4;
            let mut sum = 0i32;
            scales[n] = quantize_row(&weight[n * in_dim..(n + 1) * in_dim], |k, q| {
                weights[base + (k / 4) * PANEL * 4 + k % 4] = q;
                sum += q as i32;
            });
            offsets[n] = OFFSET * sum;
        }
        Self { out_dim, in_dim, groups_dim, weights, scales, offsets }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The f32 matrix the packed one stands for, `[out_dim, in_dim]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let panel_len = self.groups_dim * PANEL;
        let mut out = vec![0f32; self.out_dim * self.in_dim];
        for n in 0..self.out_dim {
            let base = (n / PANEL) * panel_len + (n % PANEL) * 4;
            for k in 0..self.in_dim {
                out[n * self.in_dim + k] = self.weights[base + (k / 4) * PANEL * 4 + k % 4] as f32 * self.scales[n];
            }
        }
        out
    }

    /// `x · Wᵀ` for `x` `[rows, in_dim]` row-major: `[rows, out_dim]`. Only where [`available`].
    pub fn matmul_nt(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(available(), "the AVX-512 VNNI kernel called on a CPU without it");
        let (activations, row_scales) = self.quantize_activations(x, rows);
        let mut out = vec![0f32; rows * self.out_dim];
        out.par_chunks_mut(TASK_ROWS * self.out_dim).enumerate().for_each(|(task, out)| {
            let first = task * TASK_ROWS;
            let count = out.len() / self.out_dim;
            let acts = &activations[first * self.groups_dim..(first + count) * self.groups_dim];
            // SAFETY: `available()` holds (asserted above), and the slices cover the tiles.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                self.task(acts, &row_scales[first..first + count], out)
            };
        });
        out
    }

    /// Each row's `q + 128` (padded to `groups_dim` with 128, a zero) and its scale.
    fn quantize_activations(&self, x: &[f32], rows: usize) -> (Vec<u8>, Vec<f32>) {
        let mut activations = vec![OFFSET as u8; rows * self.groups_dim];
        let mut scales = vec![0f32; rows];
        activations.par_chunks_mut(self.groups_dim).zip(scales.par_iter_mut()).enumerate().for_each(
            |(m, (dst, scale))| {
                *scale =
                    quantize_row(&x[m * self.in_dim..(m + 1) * self.in_dim], |k, q| dst[k] = (q as i32 + OFFSET) as u8);
            },
        );
        (activations, scales)
    }

    /// One task's rows against every panel, a chunk of panels at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn task(&self, acts: &[u8], row_scales: &[f32], out: &mut [f32]) {
        let panels = self.out_dim.div_ceil(PANEL);
        let rows = row_scales.len();
        for chunk in (0..panels).step_by(CHUNK_PANELS) {
            let chunk_end = (chunk + CHUNK_PANELS).min(panels);
            for row in (0..rows).step_by(TILE_ROWS) {
                let tile_rows = (rows - row).min(TILE_ROWS);
                let mut panel = chunk;
                while panel < chunk_end {
                    let tile_panels = (chunk_end - panel).min(TILE_PANELS);
                    let tile = Tile {
                        acts: acts.as_ptr().add(row * self.groups_dim),
                        groups_dim: self.groups_dim,
                        weights: self.weights.as_ptr().add(panel * self.groups_dim * PANEL),
                        scales: self.scales.as_ptr().add(panel * PANEL),
                        offsets: self.offsets.as_ptr().add(panel * PANEL),
                        row_scales: row_scales.as_ptr().add(row),
                        out: out.as_mut_ptr().add(row * self.out_dim + panel * PANEL),
                        out_stride: self.out_dim,
                        columns: self.out_dim - panel * PANEL,
                    };
                    match (tile_rows, tile_panels) {
                        (TILE_ROWS, 2) => tile.run::<TILE_ROWS, 2>(),
                        (TILE_ROWS, _) => tile.run::<TILE_ROWS, 1>(),
                        (r, p) => tile.run_rows(r, p),
                    }
                    panel += tile_panels;
                }
            }
        }
    }
}

/// One register tile: up to 12 rows × 2 panels, over the whole input dimension.
#[cfg(target_arch = "x86_64")]
struct Tile {
    acts: *const u8,
    groups_dim: usize,
    weights: *const i8,
    scales: *const f32,
    offsets: *const i32,
    row_scales: *const f32,
    out: *mut f32,
    out_stride: usize,
    /// Output columns from this tile's first to the matrix's last (a tail panel is cut).
    columns: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// The row-tail tiles, by their row count.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_rows(&self, rows: usize, panels: usize) {
        macro_rules! by_rows {
            ($($r:literal)*) => {
                match (rows, panels) {
                    $(($r, 2) => self.run::<$r, 2>(), ($r, _) => self.run::<$r, 1>(),)*
                    _ => unreachable!("a tile has 1–12 rows"),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run<const ROWS: usize, const PANELS: usize>(&self) {
        use std::arch::x86_64::*;
        let panel_len = self.groups_dim * PANEL;
        let mut sums = [[_mm512_setzero_si512(); PANELS]; ROWS];
        for group in 0..self.groups_dim / 4 {
            let mut w = [_mm512_setzero_si512(); PANELS];
            for (p, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(self.weights.add(p * panel_len + group * PANEL * 4) as *const _);
            }
            for (r, sums) in sums.iter_mut().enumerate() {
                let a = (self.acts.add(r * self.groups_dim + group * 4) as *const i32).read_unaligned();
                let a = _mm512_set1_epi32(a);
                for (s, w) in sums.iter_mut().zip(&w) {
                    *s = _mm512_dpbusd_epi32(*s, a, *w);
                }
            }
        }
        for (r, sums) in sums.iter().enumerate() {
            let row_scale = _mm512_set1_ps(*self.row_scales.add(r));
            for (p, s) in sums.iter().enumerate() {
                let offsets = _mm512_loadu_si512(self.offsets.add(p * PANEL) as *const _);
                let scales = _mm512_mul_ps(_mm512_loadu_ps(self.scales.add(p * PANEL)), row_scale);
                let value = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(*s, offsets)), scales);
                let valid = self.columns.saturating_sub(p * PANEL).min(PANEL);
                let mask: __mmask16 = if valid == PANEL { !0 } else { (1u16 << valid) - 1 };
                _mm512_mask_storeu_ps(self.out.add(r * self.out_stride + p * PANEL), mask, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 * 0.618 + seed).sin() * 1.7).tanh()).collect()
    }

    /// The same integer sums and scalings, one element at a time.
    fn reference(packed: &Packed, x: &[f32], rows: usize) -> Vec<f32> {
        let (acts, row_scales) = packed.quantize_activations(x, rows);
        let panel_len = packed.groups_dim * PANEL;
        let mut out = vec![0f32; rows * packed.out_dim];
        for m in 0..rows {
            for n in 0..packed.out_dim {
                let base = (n / PANEL) * panel_len + (n % PANEL) * 4;
                let sum: i32 = (0..packed.groups_dim)
                    .map(|k| {
                        acts[m * packed.groups_dim + k] as i32
                            * packed.weights[base + (k / 4) * PANEL * 4 + k % 4] as i32
                    })
                    .sum();
                out[m * packed.out_dim + n] = (sum - packed.offsets[n]) as f32 * (packed.scales[n] * row_scales[m]);
            }
        }
        out
    }

    #[test]
    fn the_kernel_computes_the_integer_product_exactly() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the kernel is not run");
            return;
        }
        // Tails in every direction: rows not a multiple of 12 or 32, channels not of 16 or
        // 32, inputs not of 4.
        for (rows, in_dim, out_dim) in [(70, 646, 40), (12, 64, 32), (1, 3, 1), (37, 320, 150)] {
            let x = values(rows * in_dim, 0.3);
            let packed = Packed::quantize(&values(out_dim * in_dim, 1.1), out_dim, in_dim);
            assert_eq!(packed.matmul_nt(&x, rows), reference(&packed, &x, rows), "{rows}×{in_dim}×{out_dim}");
        }
    }

    #[test]
    fn zero_rows_and_channels_give_zeros() {
        let packed = Packed::quantize(&[0.0; 8], 2, 4);
        assert_eq!(packed.dequantize(), vec![0.0; 8]);
        if available() {
            assert_eq!(packed.matmul_nt(&[0.0, 1.0, 2.0, 3.0], 1), vec![0.0, 0.0]);
        }
    }
}
