//! f32 products with few rows (the text encoders' 77 tokens) on weights packed once at load,
//! with AVX-512: `sgemm` repacks the whole weight matrix on every call, which at 77 rows
//! costs a third as much as the arithmetic, and wakes its own threads for each product.
//!
//! Layout: output channels in panels of 32 (two 512-bit registers); a panel holds, for each
//! input, its 32 channels' weights. A register tile is up to 12 rows × 32 channels of sums,
//! accumulated over the whole input in input order (a fused multiply-add per step).

use rayon::prelude::*;

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

    /// `x · Wᵀ + bias` for `x` `[rows, in_dim]` row-major: `[rows, out_dim]`. Only where
    /// [`available`].
    pub fn matmul_nt(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(available(), "the AVX-512 panel kernel called on a CPU without it");
        assert_eq!(x.len(), rows * self.in_dim, "panel product: input size");
        let mut out = vec![0f32; rows * self.out_dim];
        let panels = self.out_dim.div_ceil(PANEL);
        // Panels split among the threads, each streaming its share of the weights once.
        let per_task = panels.div_ceil(2 * rayon::current_num_threads()).max(1);
        let out_at = out.as_mut_ptr() as usize;
        (0..panels).into_par_iter().step_by(per_task).for_each(|first| {
            for panel in first..(first + per_task).min(panels) {
                for row in (0..rows).step_by(TILE_ROWS) {
                    let tile = Tile {
                        x: x[row * self.in_dim..].as_ptr(),
                        in_dim: self.in_dim,
                        weights: self.weights[panel * self.in_dim * PANEL..].as_ptr(),
                        bias: self.bias[panel * PANEL..].as_ptr(),
                        out: (out_at as *mut f32).wrapping_add(row * self.out_dim + panel * PANEL),
                        out_stride: self.out_dim,
                        columns: self.out_dim - panel * PANEL,
                    };
                    // SAFETY: `available()` holds (asserted above); each task writes only its
                    // own panels' columns of `out`, which outlives the loop, and the pointers
                    // stay within `x`, the weights and `out` for the tile's rows and columns.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        tile.run_rows((rows - row).min(TILE_ROWS))
                    };
                }
            }
        });
        out
    }
}

/// One register tile: up to 12 rows × 32 channels over the whole input.
struct Tile {
    x: *const f32,
    in_dim: usize,
    weights: *const f32,
    bias: *const f32,
    out: *mut f32,
    out_stride: usize,
    /// Output columns from this tile's first to the matrix's last (a tail panel is cut).
    columns: usize,
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
        let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
        for k in 0..self.in_dim {
            let w0 = _mm512_loadu_ps(self.weights.add(k * PANEL));
            let w1 = _mm512_loadu_ps(self.weights.add(k * PANEL + 16));
            for (r, sums) in sums.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*self.x.add(r * self.in_dim + k));
                sums[0] = _mm512_fmadd_ps(a, w0, sums[0]);
                sums[1] = _mm512_fmadd_ps(a, w1, sums[1]);
            }
        }
        let bias = [_mm512_loadu_ps(self.bias), _mm512_loadu_ps(self.bias.add(16))];
        for (r, sums) in sums.iter().enumerate() {
            for (half, s) in sums.iter().enumerate() {
                let valid = self.columns.saturating_sub(half * 16);
                if valid == 0 {
                    continue;
                }
                let mask: __mmask16 = if valid >= 16 { !0 } else { (1u16 << valid) - 1 };
                let value = _mm512_add_ps(*s, bias[half]);
                _mm512_mask_storeu_ps(self.out.add(r * self.out_stride + half * 16), mask, value);
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
    // not a multiple of 12, channels not of 16 or 32.
    #[test]
    fn the_panel_product_is_the_matrix_product() {
        if !available() {
            eprintln!("no AVX-512 here: the panel kernel is not run");
            return;
        }
        for (rows, in_dim, out_dim) in [(77, 96, 72), (12, 64, 32), (1, 3, 1), (25, 50, 17)] {
            let x = values(rows * in_dim, 0.3);
            let w = values(out_dim * in_dim, 1.1);
            let bias = values(out_dim, 2.3);
            let ours = PanelMatrix::pack(&w, out_dim, in_dim, Some(bias.clone())).matmul_nt(&x, rows);
            let unbiased = PanelMatrix::pack(&w, out_dim, in_dim, None).matmul_nt(&x, rows);
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
}
