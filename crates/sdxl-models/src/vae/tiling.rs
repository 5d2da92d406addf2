//! Decoding in overlapping tiles, as diffusers' `AutoencoderKL.tiled_decode` does after
//! `enable_tiling()`: the latents are cut into tiles of `sample_size / f` latent pixels
//! (128 for SDXL: 1024² images) overlapping by a quarter, each tile is decoded on its own,
//! and neighbours are cross-faded over a quarter of a tile. Peak memory is then that of one
//! 1024² decode whatever the image size; the output equals diffusers' tiled output.
//!
//! diffusers blends in place and in raster order, so a tile's top edge is blended with the
//! tile above *after* that tile was itself blended with its own neighbours; this follows the
//! same order.

use candle_core::Tensor;

use crate::Result;

/// Fraction of a tile shared with each neighbour (diffusers' `tile_overlap_factor`).
const OVERLAP: f64 = 0.25;

/// One decoded tile: `[B, C, h, w]` as a flat buffer, `planes` = `B · C`.
struct Tile {
    data: Vec<f32>,
    planes: usize,
    h: usize,
    w: usize,
}

impl Tile {
    fn at(&self, plane: usize, y: usize, x: usize) -> f32 {
        self.data[(plane * self.h + y) * self.w + x]
    }
}

/// Where the tiles start, along one latent axis of `len`: every `stride` (diffusers'
/// `range(0, len, overlap_size)`).
fn starts(len: usize, stride: usize) -> impl Iterator<Item = usize> {
    (0..len).step_by(stride.max(1))
}

/// Decodes `z` (`[B, L, h, w]`, after the post-quant convolution) tile by tile with `decode`;
/// `tile_latent` and `tile_sample` are the tile's size in latent and image pixels.
pub(super) fn decode_tiled(
    z: &Tensor,
    tile_latent: usize,
    tile_sample: usize,
    decode: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = z.dims4()?;
    let stride = (tile_latent as f64 * (1.0 - OVERLAP)) as usize;
    let blend = (tile_sample as f64 * OVERLAP) as usize;
    let keep = tile_sample - blend;

    let mut rows: Vec<Vec<Tile>> = Vec::new();
    for top in starts(h, stride) {
        let mut row = Vec::new();
        for left in starts(w, stride) {
            let latent = z.narrow(2, top, tile_latent.min(h - top))?.narrow(3, left, tile_latent.min(w - left))?;
            let decoded = decode(&latent)?;
            let (b, c, th, tw) = decoded.dims4()?;
            row.push(Tile { data: decoded.flatten_all()?.to_vec1::<f32>()?, planes: b * c, h: th, w: tw });
        }
        rows.push(row);
    }
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            if i > 0 {
                let (above, current) = rows.split_at_mut(i);
                blend_vertical(&above[i - 1][j], &mut current[0][j], blend);
            }
            if j > 0 {
                let (left, current) = rows[i].split_at_mut(j);
                blend_horizontal(&left[j - 1], &mut current[0], blend);
            }
        }
    }
    let (batch, channels) = (z.dim(0)?, rows[0][0].planes / z.dim(0)?.max(1));
    let (height, width, data) = assemble(&rows, keep);
    Ok(Tensor::from_vec(data, (batch, channels, height, width), z.device())?)
}

/// diffusers' weights for line `k` of a cross-fade over `extent` lines: the old tile's
/// `1 − k/extent` and the new tile's `k/extent`, worked out in f64 and applied in f32.
fn weights(k: usize, extent: usize) -> (f32, f32) {
    let t = k as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

/// Cross-fades the top `extent` rows of `tile` with the bottom rows of `above`.
fn blend_vertical(above: &Tile, tile: &mut Tile, extent: usize) {
    let extent = extent.min(above.h).min(tile.h);
    for plane in 0..tile.planes {
        for y in 0..extent {
            let (old, new) = weights(y, extent);
            for x in 0..tile.w {
                let value = &mut tile.data[(plane * tile.h + y) * tile.w + x];
                *value = above.at(plane, above.h - extent + y, x) * old + *value * new;
            }
        }
    }
}

/// Cross-fades the left `extent` columns of `tile` with the right columns of `left`.
fn blend_horizontal(left: &Tile, tile: &mut Tile, extent: usize) {
    let extent = extent.min(left.w).min(tile.w);
    for plane in 0..tile.planes {
        for y in 0..tile.h {
            for x in 0..extent {
                let (old, new) = weights(x, extent);
                let value = &mut tile.data[(plane * tile.h + y) * tile.w + x];
                *value = left.at(plane, y, left.w - extent + x) * old + *value * new;
            }
        }
    }
}

/// The top-left `keep × keep` of every tile (less where a tile is smaller), side by side:
/// `(height, width, [planes, height, width])`.
fn assemble(rows: &[Vec<Tile>], keep: usize) -> (usize, usize, Vec<f32>) {
    let height: usize = rows.iter().map(|row| row[0].h.min(keep)).sum();
    let width: usize = rows[0].iter().map(|tile| tile.w.min(keep)).sum();
    let planes = rows[0][0].planes;
    let mut out = vec![0f32; planes * height * width];
    let mut top = 0;
    for row in rows {
        let mut left = 0;
        for tile in row {
            let (th, tw) = (tile.h.min(keep), tile.w.min(keep));
            for plane in 0..planes {
                for y in 0..th {
                    let src = &tile.data[(plane * tile.h + y) * tile.w..][..tw];
                    out[(plane * height + top + y) * width + left..][..tw].copy_from_slice(src);
                }
            }
            left += tw;
        }
        top += row[0].h.min(keep);
    }
    (height, width, out)
}
