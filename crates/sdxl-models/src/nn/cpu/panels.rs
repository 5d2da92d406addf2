//! f32 products with few rows (the text encoders' 77 tokens) on weights packed once at load,
//! with AVX-512: `sgemm` repacks the whole weight matrix on every call, which at 77 rows
//! costs a third as much as the arithmetic, and wakes its own threads for each product.
//!
//! Layout: output channels in panels of 32 (two 512-bit registers); a panel holds, for each
//! input, its 32 channels' weights. A register tile is up to 12 rows × 32 channels of sums,
//! accumulated over the whole input in input order (a fused multiply-add per step).

use rayon::prelude::*;

use super::math;
use crate::nn::Activation;

/// Output channels per panel.
const PANEL: usize = 32;
/// Rows per register tile: 12 × 2 sums in 24 of the 32 registers.
const TILE_ROWS: usize = 12;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A weight matrix `[out, in]` packed in panels.
#[derive(Debug, Clone)]
pub struct PanelMatrix {
    out_dim: usize,
    in_dim: usize,
    /// `[panels][in_dim][32]`, the last panel padded with zeros.
    weights: Vec<f32>,
    /// Added to each row of the product, padded like the panels (zeros when there is none).
    bias: Vec<f32>,
}

impl PanelMatrix {
    /// Packs `weight` (`[out_dim, in_dim]`, row-major), with the `bias` (`[out_dim]`) the
    /// product adds.
    pub fn pack(weight: &[f32], out_dim: usize, in_dim: usize, bias: Option<Vec<f32>>) -> Self {
        let panels = out_dim.div_ceil(PANEL);
        let mut bias = bias.unwrap_or_else(|| vec![0.0; out_dim]);
        bias.resize(panels * PANEL, 0.0);
        let mut weights = vec![0f32; panels * in_dim * PANEL];
        for n in 0..out_dim {
            let base = (n / PANEL) * in_dim * PANEL + n % PANEL;
            for (k, w) in weight[n * in_dim..(n + 1) * in_dim].iter().enumerate() {
                weights[base + k * PANEL] = *w;
            }
        }
        Self { out_dim, in_dim, weights, bias }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// `x · Wᵀ + bias` for `x` `[rows, in_dim]` row-major: `[rows, out_dim]`, then `then` on
    /// every value as it is stored. Only where [`available`].
    pub fn matmul_nt(&self, x: &[f32], rows: usize, then: Option<Activation>) -> Vec<f32> {
        assert!(available(), "the AVX-512 panel kernel called on a CPU without it");
        assert_eq!(x.len(), rows * self.in_dim, "panel product: input size");
        let mut out = vec![0f32; rows * self.out_dim];
        if rows == 0 || self.in_dim == 0 {
            let mut out = add_bias(out, &self.bias[..self.out_dim]);
            if let Some(activation) = then {
                math::activate_in_place(&mut out, activation);
            }
            return out;
        }
        // Tiles of equal height: 77 rows as 7 × 11, not 6 × 12 and a thin 5.
        let tile_rows = rows.div_ceil(rows.div_ceil(TILE_ROWS));

        let panels = self.out_dim.div_ceil(PANEL);
        // Panels split among the threads, each streaming its share of the weights once.
        let per_task = panels.div_ceil(rayon::current_num_threads()).max(1);
        // Blocks of equal length: 1280 inputs as 2 × 640, not 1024 and 256.
        let block = self.in_dim.div_ceil(self.in_dim.div_ceil(BLOCK));
        let out_at = out.as_mut_ptr() as usize;
        (0..panels).into_par_iter().step_by(per_task).for_each(|first| {
            let blocks: Vec<(usize, usize)> = (first..(first + per_task).min(panels))
                .flat_map(|panel| (0..self.in_dim).step_by(block).map(move |k0| (panel, k0)))
                .collect();
            for (i, &(panel, k0)) in blocks.iter().enumerate() {
                let len = block.min(self.in_dim - k0);
                // The next block's weights, fetched into L2 while this one is worked on: two
                // cache lines per input, one per step of the first row tiles.
                let (next, next_lines) = match blocks.get(i + 1) {
                    Some(&(p, k)) => (self.block_weights(p, k), 2 * block.min(self.in_dim - k)),
                    None => (std::ptr::null(), 0),
                };
                for (tile, row) in (0..rows).step_by(tile_rows).enumerate() {
                    let prefetch_from = (tile * len).min(next_lines);
                    let tile = Tile {
                        x: x[row * self.in_dim + k0..].as_ptr(),
                        x_stride: self.in_dim,
                        len,
                        weights: self.block_weights(panel, k0),
                        bias: self.bias[panel * PANEL..].as_ptr(),
                        out: (out_at as *mut f32).wrapping_add(row * self.out_dim + panel * PANEL),
                        out_stride: self.out_dim,
                        columns: self.out_dim - panel * PANEL,
                        first: k0 == 0,
                        last: k0 + len == self.in_dim,
                        then,
                        prefetch: next.wrapping_add(prefetch_from * 16),
                        prefetch_steps: (next_lines - prefetch_from).min(len),
                    };
                    // SAFETY: `available()` holds (asserted above); each task writes only its
                    // own panels' columns of `out`, which outlives the loop, and the pointers
                    // stay within the packed inputs, the weights and `out` for the tile's rows,
                    // inputs and columns (prefetches cannot fault).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        tile.run_rows((rows - row).min(tile_rows))
                    };
                }
            }
        });
        out
    }

    fn block_weights(&self, panel: usize, k0: usize) -> *const f32 {
        self.weights[(panel * self.in_dim + k0) * PANEL..].as_ptr()
    }
}

/// Inputs per block at most: a block's weights (128 KB) and its slice of the rows stay in L2
/// while every row tile passes over them (the whole input of the 5120-wide layers does not).
const BLOCK: usize = 1024;

/// The product of an empty input: the bias alone, per row.
fn add_bias(mut out: Vec<f32>, bias: &[f32]) -> Vec<f32> {
    for row in out.chunks_mut(bias.len().max(1)) {
        row.iter_mut().zip(bias).for_each(|(o, b)| *o = *b);
    }
    out
}

/// One register tile: up to 12 rows × 32 channels over one block of inputs.
struct Tile {
    /// The tile's first row at the block's first input.
    x: *const f32,
    /// Floats from one row to the next.
    x_stride: usize,
    /// Inputs in the block.
    len: usize,
    weights: *const f32,
    bias: *const f32,
    out: *mut f32,
    out_stride: usize,
    /// Output columns from this tile's first to the matrix's last (a tail panel is cut).
    columns: usize,
    /// The block starts the sums (else they continue from `out`) / ends them (then the bias is
    /// added). Either way the sums run in input order, as in one pass.
    first: bool,
    last: bool,
    /// Applied to the finished sums (in the last block).
    then: Option<Activation>,
    /// Cache lines to fetch, one per step for the first `prefetch_steps` steps.
    prefetch: *const f32,
    prefetch_steps: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    #[target_feature(enable = "avx512f")]
    unsafe fn run_rows(&self, rows: usize) {
        macro_rules! by_rows {
            ($($r:literal)*) => {
                match rows {
                    $($r => self.run::<$r>(),)*
                    _ => unreachable!("a tile has 1–12 rows"),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn run<const ROWS: usize>(&self) {
        use std::arch::x86_64::*;
        let masks: [__mmask16; 2] = std::array::from_fn(|half| {
            let valid = self.columns.saturating_sub(half * 16);
            if valid >= 16 {
                !0
            } else {
                (1u16 << valid) - 1
            }
        });
        let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
        if !self.first {
            for (r, sums) in sums.iter_mut().enumerate() {
                for (half, s) in sums.iter_mut().enumerate() {
                    *s = _mm512_maskz_loadu_ps(masks[half], self.out.add(r * self.out_stride + half * 16));
                }
            }
        }
        macro_rules! step {
            ($k:expr) => {{
                let w0 = _mm512_loadu_ps(self.weights.add($k * PANEL));
                let w1 = _mm512_loadu_ps(self.weights.add($k * PANEL + 16));
                let x = self.x.add($k);
                for (r, sums) in sums.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*x.add(r * self.x_stride));
                    sums[0] = _mm512_fmadd_ps(a, w0, sums[0]);
                    sums[1] = _mm512_fmadd_ps(a, w1, sums[1]);
                }
            }};
        }
        let fetched = self.prefetch_steps.min(self.len);
        for k in 0..fetched {
            step!(k);
            _mm_prefetch::<_MM_HINT_T1>(self.prefetch.wrapping_add(k * 16) as *const i8);
        }
        for k in fetched..self.len {
            step!(k);
        }
        let bias = [_mm512_maskz_loadu_ps(masks[0], self.bias), _mm512_maskz_loadu_ps(masks[1], self.bias.add(16))];
        for (r, sums) in sums.iter().enumerate() {
            for (half, s) in sums.iter().enumerate() {
                let value = if self.last { _mm512_add_ps(*s, bias[half]) } else { *s };
                _mm512_mask_storeu_ps(self.out.add(r * self.out_stride + half * 16), masks[half], value);
            }
        }
        if let (true, Some(activation)) = (self.last, self.then) {
            // While the tile's rows are in L1; compiled here for AVX-512, the same bits as
            // the unfused pass (no fused multiply-adds are formed without being asked for).
            for r in 0..ROWS {
                let row = std::slice::from_raw_parts_mut(self.out.add(r * self.out_stride), self.columns.min(PANEL));
                math::activate_in_place(row, activation);
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

    // Against the product summed in f64: f32 rounding only. Tails in every direction: rows
    // not a multiple of 12, channels not of 16 or 32, inputs in several blocks.
    #[test]
    fn the_panel_product_is_the_matrix_product() {
        if !available() {
            eprintln!("no AVX-512 here: the panel kernel is not run");
            return;
        }
        for (rows, in_dim, out_dim) in
            [(77, 96, 72), (12, 64, 32), (1, 3, 1), (25, 50, 17), (13, 2100, 45), (77, 1030, 64)]
        {
            let x = values(rows * in_dim, 0.3);
            let w = values(out_dim * in_dim, 1.1);
            let bias = values(out_dim, 2.3);
            let ours = PanelMatrix::pack(&w, out_dim, in_dim, Some(bias.clone())).matmul_nt(&x, rows, None);
            let unbiased = PanelMatrix::pack(&w, out_dim, in_dim, None).matmul_nt(&x, rows, None);
            for m in 0..rows {
                for n in 0..out_dim {
                    let exact: f64 = (0..in_dim).map(|k| x[m * in_dim + k] as f64 * w[n * in_dim + k] as f64).sum();
                    assert_eq!(ours[m * out_dim + n], unbiased[m * out_dim + n] + bias[n], "the bias is added last");
                    let (got, exact) = (ours[m * out_dim + n] as f64, exact + bias[n] as f64);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "{rows}×{in_dim}×{out_dim} at ({m}, {n}): {got} vs {exact}"
                    );
                }
            }
        }
    }

    // The activation applied as the sums are stored gives the bits of the separate pass.
    #[test]
    fn the_fused_activation_is_the_activation_of_the_product() {
        if !available() {
            eprintln!("no AVX-512 here: the panel kernel is not run");
            return;
        }
        let (rows, in_dim, out_dim) = (23, 1100, 45);
        let x = values(rows * in_dim, 0.7);
        let matrix = PanelMatrix::pack(&values(out_dim * in_dim, 1.9), out_dim, in_dim, Some(values(out_dim, 0.2)));
        let plain = matrix.matmul_nt(&x, rows, None);
        for activation in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh] {
            let mut expected = plain.clone();
            math::activate_in_place(&mut expected, activation);
            assert_eq!(matrix.matmul_nt(&x, rows, Some(activation)), expected, "{activation:?}");
            assert_ne!(expected, plain, "{activation:?} changed nothing");
        }
    }
}
