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
//! channels' 4 weights (64 bytes, one register). That is also the layout of an AMX tile's
//! right-hand operand, so where the CPU has AMX the same matrix runs on [`super::amx`]'s tiles,
//! to the same integer sums and the same floats.

use rayon::prelude::*;

/// Output channels per panel: one 512-bit register of int32 sums.
pub(super) const PANEL: usize = 16;
/// Inputs are padded to whole AMX tile rows (64 bytes), rows of activations to two tiles of
/// 16, and panels to pairs: [`super::amx`] then needs no tails (zero weights and `q = 0`
/// activations add nothing). SDXL's dimensions are multiples of 64 already.
const INPUT_ALIGN: usize = 64;
pub(super) const ROW_ALIGN: usize = 32;
const PANEL_ALIGN: usize = 2;
/// Rows (tokens) and panels per register tile: 12 × 2 × 16 sums in 24 of the 32 registers,
/// so each weight register loaded feeds 12 multiply-adds.
const TILE_ROWS: usize = 12;
const TILE_PANELS: usize = 2;
/// Rows per parallel task, and panels per pass over them (128 channels: their weights stay
/// in L2 while the task's rows are read against them).
const TASK_ROWS: usize = 3 * TILE_ROWS;
pub(super) const CHUNK_PANELS: usize = 8;
/// The offset that makes the activations unsigned.
pub(super) const OFFSET: i32 = 128;

/// Whether this CPU runs the kernel.
pub(super) fn available() -> bool {
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
    pub(super) out_dim: usize,
    in_dim: usize,
    /// `in_dim` rounded up to [`INPUT_ALIGN`] (the padding weights are zero).
    pub(super) groups_dim: usize,
    /// `[panels][groups_dim / 4][16][4]`, panels padded to [`PANEL_ALIGN`].
    pub(super) weights: Vec<i8>,
    /// Per output channel, padded to whole panels (zero there).
    pub(super) scales: Vec<f32>,
    /// `128 · Σₖ w` per output channel, padded like `scales`.
    pub(super) offsets: Vec<i32>,
}

/// A product's activations: each row's `q + 128`, rows padded to [`ROW_ALIGN`] with zeros
/// (128), and each row's scale.
pub(super) struct Activations {
    pub(super) values: Vec<u8>,
    pub(super) scales: Vec<f32>,
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

/// [`quantize_row`] for an activation row, 16 lanes at a time, written as `q + 128`; ties
/// round to even (the vector conversion's rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_activation_row(row: &[f32], dst: &mut [u8]) -> f32 {
    let largest = max_abs(row);
    quantize_scaled(row, if largest > 0.0 { 127.0 / largest } else { 0.0 }, dst);
    largest / 127.0
}

/// The first `count` of 16 lanes.
#[cfg(target_arch = "x86_64")]
fn lanes(count: usize) -> std::arch::x86_64::__mmask16 {
    if count >= 16 {
        !0
    } else {
        (1u16 << count) - 1
    }
}

/// The largest `|v|` of `row` (0 for none).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max_abs(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut largest = _mm512_setzero_ps();
    for k in (0..row.len()).step_by(16) {
        let v = _mm512_maskz_loadu_ps(lanes(row.len() - k), row.as_ptr().add(k));
        largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    }
    _mm512_reduce_max_ps(largest)
}

/// `round(v · inverse) + 128` of each value into `dst` (as long as `row`), ties to even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_scaled(row: &[f32], inverse: f32, dst: &mut [u8]) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() >= row.len());
    let inverse = _mm512_set1_ps(inverse);
    let offset = _mm512_set1_epi32(OFFSET);
    for k in (0..row.len()).step_by(16) {
        let mask = lanes(row.len() - k);
        let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(k));
        let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)), offset);
        _mm512_mask_cvtepi32_storeu_epi8(dst.as_mut_ptr().add(k) as *mut _, mask, q);
    }
}

/// Stores one register of int32 sums (16 channels of one row) as floats: `(sum − offset) ·
/// scale · row scale`, the first `valid` lanes. Both kernels end here, so they agree exactly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_sums(
    sums: std::arch::x86_64::__m512i,
    offsets: *const i32,
    scales: *const f32,
    row_scale: f32,
    out: *mut f32,
    valid: usize,
) {
    use std::arch::x86_64::*;
    if valid == 0 {
        return;
    }
    let offsets = _mm512_loadu_si512(offsets as *const _);
    let scales = _mm512_mul_ps(_mm512_loadu_ps(scales), _mm512_set1_ps(row_scale));
    let value = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums, offsets)), scales);
    _mm512_mask_storeu_ps(out, lanes(valid), value);
}

impl Packed {
    /// Quantizes `weight` (`[out_dim, in_dim]`, row-major) per output channel.
    pub fn quantize(weight: &[f32], out_dim: usize, in_dim: usize) -> Self {
        let groups_dim = in_dim.div_ceil(INPUT_ALIGN) * INPUT_ALIGN;
        let panels = out_dim.div_ceil(PANEL).div_ceil(PANEL_ALIGN) * PANEL_ALIGN;
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

    /// Padded panels: whole pairs.
    pub(super) fn panels(&self) -> usize {
        self.scales.len() / PANEL
    }

    /// `x · Wᵀ` for `x` `[rows, in_dim]` row-major: `[rows, out_dim]`. Only where [`available`];
    /// on AMX tiles where the CPU has them.
    pub fn matmul_nt(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(available(), "the AVX-512 VNNI kernel called on a CPU without it");
        let activations = self.quantize_activations(x, rows);
        let mut out = vec![0f32; rows * self.out_dim];
        self.matmul_quantized(&activations, &mut out);
        out
    }

    /// The product of quantized activations, on AMX tiles where the CPU has them, into `out`
    /// (`[rows, out_dim]`).
    pub(super) fn matmul_quantized(&self, activations: &Activations, out: &mut [f32]) {
        if super::amx::available() {
            super::amx::matmul_nt(self, activations, out);
        } else {
            self.matmul_nt_vnni(activations, out);
        }
    }

    /// The product on AVX-512 VNNI registers, into `out` (`[rows, out_dim]`).
    pub(super) fn matmul_nt_vnni(&self, activations: &Activations, out: &mut [f32]) {
        assert!(available(), "the AVX-512 VNNI kernel called on a CPU without it");
        out.par_chunks_mut(TASK_ROWS * self.out_dim).enumerate().for_each(|(task, out)| {
            let first = task * TASK_ROWS;
            let count = out.len() / self.out_dim;
            let acts = &activations.values[first * self.groups_dim..(first + count) * self.groups_dim];
            // SAFETY: `available()` holds (asserted above), and the slices cover the tiles.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                self.task(acts, &activations.scales[first..first + count], out)
            };
        });
    }

    /// Each row's `q + 128` (padded to `groups_dim` with 128, a zero) and its scale, rounded
    /// half to even.
    pub(super) fn quantize_activations(&self, x: &[f32], rows: usize) -> Activations {
        let padded_rows = rows.div_ceil(ROW_ALIGN) * ROW_ALIGN;
        let mut values = vec![OFFSET as u8; padded_rows * self.groups_dim];
        let mut scales = vec![0f32; rows];
        values.par_chunks_mut(self.groups_dim).zip(scales.par_iter_mut()).enumerate().for_each(|(m, (dst, scale))| {
            let row = &x[m * self.in_dim..(m + 1) * self.in_dim];
            // SAFETY: `Packed` exists only where `available()` holds.
            #[cfg(target_arch = "x86_64")]
            {
                *scale = unsafe { quantize_activation_row(row, dst) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (row, dst, scale);
        });
        Activations { values, scales }
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
            for (p, s) in sums.iter().enumerate() {
                let valid = self.columns.saturating_sub(p * PANEL);
                store_sums(
                    *s,
                    self.offsets.add(p * PANEL),
                    self.scales.add(p * PANEL),
                    *self.row_scales.add(r),
                    self.out.wrapping_add(r * self.out_stride + p * PANEL),
                    valid,
                );
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
        let acts = packed.quantize_activations(x, rows);
        let panel_len = packed.groups_dim * PANEL;
        let mut out = vec![0f32; rows * packed.out_dim];
        for m in 0..rows {
            for n in 0..packed.out_dim {
                let base = (n / PANEL) * panel_len + (n % PANEL) * 4;
                let sum: i32 = (0..packed.groups_dim)
                    .map(|k| {
                        acts.values[m * packed.groups_dim + k] as i32
                            * packed.weights[base + (k / 4) * PANEL * 4 + k % 4] as i32
                    })
                    .sum();
                out[m * packed.out_dim + n] = (sum - packed.offsets[n]) as f32 * (packed.scales[n] * acts.scales[m]);
            }
        }
        out
    }

    /// Tails in every direction: rows not a multiple of 12, 16 or 32, channels not of 16 or
    /// 32, inputs not of 4 or 64.
    const SHAPES: [(usize, usize, usize); 5] = [(70, 646, 40), (12, 64, 32), (1, 3, 1), (37, 320, 150), (64, 128, 64)];

    #[test]
    fn the_kernels_compute_the_integer_product_exactly() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the kernels are not run");
            return;
        }
        for (rows, in_dim, out_dim) in SHAPES {
            let x = values(rows * in_dim, 0.3);
            let packed = Packed::quantize(&values(out_dim * in_dim, 1.1), out_dim, in_dim);
            let exact = reference(&packed, &x, rows);
            let acts = packed.quantize_activations(&x, rows);
            let mut vnni = vec![f32::NAN; rows * out_dim];
            packed.matmul_nt_vnni(&acts, &mut vnni);
            assert_eq!(vnni, exact, "VNNI {rows}×{in_dim}×{out_dim}");
            if super::super::amx::available() {
                let mut amx = vec![f32::NAN; rows * out_dim];
                super::super::amx::matmul_nt(&packed, &acts, &mut amx);
                assert_eq!(amx, exact, "AMX {rows}×{in_dim}×{out_dim}");
            } else {
                eprintln!("no AMX here: its kernel is not run");
            }
            assert_eq!(packed.matmul_nt(&x, rows), exact);
        }
    }

    #[test]
    fn activations_quantize_like_the_scalar_rule_with_ties_to_even() {
        if !available() {
            return;
        }
        // 37 values (a masked tail); the largest is 127, so the values are their own scaled
        // values and these are exact ties: 62.5 → 62, 2.5 → 2, -0.5 → 0.
        let mut row: Vec<f32> = values(37, 0.7);
        row[0] = 127.0;
        row[3] = 62.5;
        row[4] = 2.5;
        row[5] = -0.5;
        let packed = Packed::quantize(&[0.0; 37], 1, 37);
        let acts = packed.quantize_activations(&row, 1);
        let largest = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(acts.scales[0], largest / 127.0);
        for (k, v) in row.iter().enumerate() {
            let q = (v * (127.0 / largest)).round_ties_even() as i32;
            assert_eq!(acts.values[k] as i32 - OFFSET, q, "value {k}: {v}");
        }
        assert_eq!(acts.values[3..6].iter().map(|&v| v as i32 - OFFSET).collect::<Vec<_>>(), [62, 2, 0]);
        assert!(acts.values[37..].iter().all(|&v| v as i32 == OFFSET), "the padding is zero");
        assert_eq!(acts.values.len(), ROW_ALIGN * 64);
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
