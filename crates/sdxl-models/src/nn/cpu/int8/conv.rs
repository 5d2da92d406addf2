//! Int8 convolutions (`--quantize int8`) as one packed int8 product ([`vnni::Packed`], on AMX
//! tiles where the CPU has them): the weights `[Cout, Cin, k, k]` become a `[Cout, k·k·Cin]`
//! matrix quantized per output channel, and each output pixel's `k × k × Cin` patch a row of
//! activations quantized with its own scale (what "per token" means for a convolution).
//!
//! The input is read once into pixels-by-channels order (the prologue: the group norm and
//! SiLU of a ResNet block, and 2× nearest upsampling, applied on the way, so neither is
//! stored), the patches are quantized straight from it into bytes, and the product's
//! pixels-by-channels output is turned back to `[B, Cout, H, W]` with the bias (and a skip
//! connection) added as it is written.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::super::{math, with_data};
use super::vnni::{self, Activations, Packed, OFFSET, ROW_ALIGN};

/// A convolution's weights in int8, with its bias and geometry.
#[derive(Debug, Clone)]
pub struct Int8Conv {
    packed: Packed,
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// What happens to the input as it is read: `silu(x · scale + shift)` per (image, channel)
/// when `affine` is given (`[B · Cin]` each), then nearest 2× upsampling when `upsample`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvInput<'a> {
    pub affine: Option<(&'a [f32], &'a [f32])>,
    pub upsample: bool,
}

impl Int8Conv {
    /// Quantizes `weight` (`[Cout, Cin, k, k]`, any float dtype, on the CPU) per output
    /// channel; `None` where this CPU has no int8 kernel for it (without AVX-512 VNNI the
    /// convolutions stay as they are).
    pub fn quantize(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Option<Self>> {
        let (out_channels, in_channels, kernel, kernel_w) = weight.dims4()?;
        if !vnni::available() || !weight.device().is_cpu() || kernel != kernel_w {
            return Ok(None);
        }
        let taps = kernel * kernel;
        // `[Cout, Cin, tap]` to `[Cout, tap, Cin]`: a patch row holds each tap's channels
        // together, as the pixels-by-channels input lays them out.
        let weight = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut matrix = vec![0f32; weight.len()];
        for o in 0..out_channels {
            for c in 0..in_channels {
                for tap in 0..taps {
                    matrix[(o * taps + tap) * in_channels + c] = weight[(o * in_channels + c) * taps + tap];
                }
            }
        }
        let packed = Packed::quantize(&matrix, out_channels, taps * in_channels);
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if bias.len() != out_channels {
            return Err(candle_core::Error::Msg(format!(
                "int8 conv: {} biases for {out_channels} channels",
                bias.len()
            )));
        }
        Ok(Some(Self { packed, bias, in_channels, out_channels, kernel, stride, padding }))
    }

    /// `[Cout, Cin, k, k]`.
    pub fn dims(&self) -> [usize; 4] {
        [self.out_channels, self.in_channels, self.kernel, self.kernel]
    }

    /// The convolution plus bias of `x` (`[B, Cin, H, W]`, f32 on the CPU, read as `input`
    /// says), plus `residual` (of the output's shape) when given: `[B, Cout, H', W']`.
    pub fn forward(&self, x: &Tensor, input: ConvInput, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let x = x.to_dtype(DType::F32)?;
        let (out, dims) = with_data(&x, |x| match residual {
            Some(residual) => with_data(&residual.to_dtype(DType::F32)?, |r| {
                self.forward_slices(x, [batch, channels, height, width], input, Some(r))
            })?,
            None => self.forward_slices(x, [batch, channels, height, width], input, None),
        })??;
        Tensor::from_vec(out, dims.to_vec(), &Device::Cpu)
    }

    fn forward_slices(
        &self,
        x: &[f32],
        [batch, channels, height, width]: [usize; 4],
        input: ConvInput,
        residual: Option<&[f32]>,
    ) -> candle_core::Result<(Vec<f32>, [usize; 4])> {
        if channels != self.in_channels {
            return Err(candle_core::Error::Msg(format!(
                "int8 conv: {channels} input channels, expected {}",
                self.in_channels
            )));
        }
        let (seen_h, seen_w) = if input.upsample { (2 * height, 2 * width) } else { (height, width) };
        let reach = 2 * self.padding;
        if seen_h + reach < self.kernel || seen_w + reach < self.kernel {
            return Err(candle_core::Error::Msg("int8 conv: input smaller than the kernel".into()));
        }
        let out_h = (seen_h + reach - self.kernel) / self.stride + 1;
        let out_w = (seen_w + reach - self.kernel) / self.stride + 1;
        let dims = [batch, self.out_channels, out_h, out_w];
        if residual.is_some_and(|r| r.len() != dims.iter().product::<usize>()) {
            return Err(candle_core::Error::Msg("int8 conv: the residual is not the output's shape".into()));
        }
        let source = Source::read(x, [batch, channels, height, width], input);
        let activations = self.patches(&source, out_h, out_w);
        let mut product = vec![0f32; batch * out_h * out_w * self.out_channels];
        self.packed.matmul_quantized(&activations, &mut product);
        Ok((self.channels_first(&product, dims, residual), dims))
    }

    /// Each output pixel's patch, quantized: `[B·H'·W', k·k·Cin]` bytes (`q + 128`; 128 where the
    /// patch reaches into the padding) and a scale per pixel.
    fn patches(&self, source: &Source, out_h: usize, out_w: usize) -> Activations {
        let groups_dim = self.packed.groups_dim;
        let rows = source.batch * out_h * out_w;
        let mut values = vec![OFFSET as u8; rows.div_ceil(ROW_ALIGN) * ROW_ALIGN * groups_dim];
        let mut scales = vec![0f32; rows];
        let cin = self.in_channels;
        values[..rows * groups_dim]
            .par_chunks_mut(out_w * groups_dim)
            .zip(scales.par_chunks_mut(out_w))
            .enumerate()
            .for_each(|(line, (values, scales))| {
                let (image, oy) = (line / out_h, line % out_h);
                for ox in 0..out_w {
                    let taps = self.taps(source, oy, ox);
                    let largest =
                        taps.clone().fold(0f32, |m, (_, pixel)| m.max(source.largest[image * source.pixels() + pixel]));
                    scales[ox] = largest / 127.0;
                    let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
                    let row = &mut values[ox * groups_dim..(ox + 1) * groups_dim];
                    for (tap, pixel) in taps {
                        let from = (image * source.pixels() + pixel) * cin;
                        // SAFETY: `Packed` (and so `Self`) exists only where AVX-512 VNNI does.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            vnni::quantize_scaled(&source.values[from..from + cin], inverse, &mut row[tap * cin..]);
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (from, tap, inverse, &row);
                    }
                }
            });
        Activations { values, scales }
    }

    /// The taps of output pixel `(oy, ox)` that fall inside the (seen) input: `(tap, source
    /// pixel)`, the pixel's index within its image.
    fn taps<'a>(
        &'a self,
        source: &'a Source,
        oy: usize,
        ox: usize,
    ) -> impl Iterator<Item = (usize, usize)> + Clone + 'a {
        let k = self.kernel;
        (0..k * k).filter_map(move |tap| {
            let y = (oy * self.stride + tap / k).checked_sub(self.padding)?;
            let x = (ox * self.stride + tap % k).checked_sub(self.padding)?;
            source.pixel(y, x).map(|pixel| (tap, pixel))
        })
    }

    /// The product's `[B·H'·W', Cout]` as `[B, Cout, H', W']`, plus bias, plus `residual`.
    fn channels_first(
        &self,
        product: &[f32],
        [batch, cout, out_h, out_w]: [usize; 4],
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let pixels = out_h * out_w;
        let mut out = vec![0f32; batch * cout * pixels];
        // 16 output rows (image, channel) per task: a pixel's 16 sums are one cache line.
        const BLOCK: usize = 16;
        out.par_chunks_mut(BLOCK * pixels).enumerate().for_each(|(task, out)| {
            let first = task * BLOCK * pixels;
            let rows: Vec<(usize, f32)> = (task * BLOCK..)
                .take(out.len() / pixels)
                .map(|row| {
                    let (image, channel) = (row / cout, row % cout);
                    (image * pixels * cout + channel, self.bias[channel])
                })
                .collect();
            for p in 0..pixels {
                for (j, &(from, bias)) in rows.iter().enumerate() {
                    let value = product[from + p * cout] + bias;
                    let at = j * pixels + p;
                    out[at] = match residual {
                        Some(residual) => residual[first + at] + value,
                        None => value,
                    };
                }
            }
        });
        out
    }
}

/// The input in pixels-by-channels order (`[B, H, W, Cin]`), after the prologue, with each
/// pixel's largest `|v|`.
struct Source {
    values: Vec<f32>,
    largest: Vec<f32>,
    batch: usize,
    height: usize,
    width: usize,
    /// Whether the convolution sees the input upsampled 2×.
    upsample: bool,
}

impl Source {
    fn read(x: &[f32], [batch, channels, height, width]: [usize; 4], input: ConvInput) -> Self {
        let plane = height * width;
        let mut values = vec![0f32; batch * plane * channels];
        let mut largest = vec![0f32; batch * plane];
        values.par_chunks_mut(width * channels).zip(largest.par_chunks_mut(width)).enumerate().for_each(
            |(line, (values, largest))| {
                let (image, y) = (line / height, line % height);
                math::with_avx2(
                    #[inline(always)]
                    || {
                        for c in 0..channels {
                            let from = &x[(image * channels + c) * plane + y * width..][..width];
                            match input.affine {
                                Some((scale, shift)) => {
                                    let (scale, shift) = (scale[image * channels + c], shift[image * channels + c]);
                                    for (p, v) in from.iter().enumerate() {
                                        values[p * channels + c] = math::silu(v * scale + shift);
                                    }
                                }
                                None => {
                                    for (p, v) in from.iter().enumerate() {
                                        values[p * channels + c] = *v;
                                    }
                                }
                            }
                        }
                        for (pixel, largest) in values.chunks(channels).zip(largest.iter_mut()) {
                            *largest = pixel.iter().fold(0f32, |m, v| m.max(v.abs()));
                        }
                    },
                )
            },
        );
        Self { values, largest, batch, height, width, upsample: input.upsample }
    }

    fn pixels(&self) -> usize {
        self.height * self.width
    }

    /// The stored pixel the convolution sees at `(y, x)`, if inside.
    fn pixel(&self, y: usize, x: usize) -> Option<usize> {
        let (y, x) = if self.upsample { (y / 2, x / 2) } else { (y, x) };
        (y < self.height && x < self.width).then_some(y * self.width + x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{relative_error, values};
    use super::*;

    /// `[B, C, H, W]` of smooth made-up values.
    fn image(dims: [usize; 4], seed: f32) -> Tensor {
        values(dims[0] * dims[1], dims[2] * dims[3], seed).reshape(dims.to_vec()).unwrap()
    }

    /// The same convolution in f32 by candle's ops.
    fn exact(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        (stride, padding): (usize, usize),
        input: ConvInput,
        residual: Option<&Tensor>,
    ) -> Tensor {
        let (b, c, h, w) = x.dims4().unwrap();
        let mut x = x.clone();
        if let Some((scale, shift)) = input.affine {
            let scale = Tensor::from_slice(scale, (b, c, 1, 1), &Device::Cpu).unwrap();
            let shift = Tensor::from_slice(shift, (b, c, 1, 1), &Device::Cpu).unwrap();
            x = candle_nn::ops::silu(&x.broadcast_mul(&scale).unwrap().broadcast_add(&shift).unwrap()).unwrap();
        }
        if input.upsample {
            x = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
        }
        let y = x
            .conv2d(weight, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        residual.map_or(y.clone(), |r| (r + &y).unwrap())
    }

    /// Uniform made-up values in [-1, 1] (no structure for the quantization error to cancel
    /// against), `[B, C, H, W]`.
    fn noise(dims: [usize; 4], seed: u32) -> Tensor {
        let len: usize = dims.iter().product();
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let v: Vec<f32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as f32 / u32::MAX as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, dims.to_vec(), &Device::Cpu).unwrap()
    }

    /// The convolution of the dequantized patches by the dequantized weights, in f64.
    fn dequantized(conv: &Int8Conv, source: &Source, dims: [usize; 4], residual: Option<&[f32]>) -> Vec<f32> {
        let [batch, cout, out_h, out_w] = dims;
        let acts = conv.patches(source, out_h, out_w);
        let k = conv.packed.groups_dim;
        let (_, in_dim) = conv.packed.dims();
        let weights = conv.packed.dequantize();
        let pixels = out_h * out_w;
        let mut out = vec![0f32; batch * cout * pixels];
        for row in 0..batch * pixels {
            let (image, p) = (row / pixels, row % pixels);
            for o in 0..cout {
                let sum: f64 = (0..in_dim)
                    .map(|i| {
                        let a = (acts.values[row * k + i] as i32 - OFFSET) as f64 * acts.scales[row] as f64;
                        a * weights[o * in_dim + i] as f64
                    })
                    .sum();
                let at = (image * cout + o) * pixels + p;
                let value = (sum + conv.bias[o] as f64) as f32;
                out[at] = residual.map_or(value, |r| r[at] + value);
            }
        }
        out
    }

    // Every path of the convolution: plain, the ResNet prologue and skip connection, the
    // upsampler's 2×, the downsampler's stride 2, a 1×1 shortcut, two images, channels not a
    // multiple of 16, sizes that leave row tails. Against the dequantized arithmetic it is
    // exact but for float rounding; against f32 it is 8-bit close (a layout mistake anywhere
    // is an error near 1).
    #[test]
    fn the_int8_convolution_is_its_dequantized_arithmetic_and_near_f32() {
        if !vnni::available() {
            eprintln!("no AVX-512 VNNI here: convolutions are not quantized");
            return;
        }
        let cases = [
            // (batch, cin, cout, h, w, kernel, stride, padding, affine, upsample, residual)
            (1, 64, 32, 9, 11, 3, 1, 1, false, false, false),
            (2, 32, 48, 7, 6, 3, 1, 1, true, false, true),
            (1, 40, 32, 5, 7, 3, 1, 1, false, true, false),
            (1, 32, 32, 10, 9, 3, 2, 1, false, false, false),
            (2, 48, 64, 6, 5, 1, 1, 0, false, false, true),
        ];
        for (seed, (b, cin, cout, h, w, k, stride, padding, affine, upsample, residual)) in (0u32..).zip(cases) {
            let x = noise([b, cin, h, w], seed).affine(2.0, 0.3).unwrap();
            let weight = noise([cout, cin, k, k], seed + 10);
            let bias = noise([1, 1, 1, cout], seed + 20).flatten_all().unwrap();
            let scale: Vec<f32> = (0..b * cin).map(|i| 0.5 + (i as f32 * 0.37).sin().abs()).collect();
            let shift: Vec<f32> = (0..b * cin).map(|i| (i as f32 * 0.71).cos() * 0.5).collect();
            let input = ConvInput { affine: affine.then_some((&scale[..], &shift[..])), upsample };
            let conv = Int8Conv::quantize(&weight, &bias, stride, padding).unwrap().expect("quantized");
            let expected_without = exact(&x, &weight, &bias, (stride, padding), input, None);
            let dims: [usize; 4] = expected_without.dims4().unwrap().into();
            let skip = residual.then(|| noise(dims, seed + 30));
            let expected = exact(&x, &weight, &bias, (stride, padding), input, skip.as_ref());
            let ours = conv.forward(&x, input, skip.as_ref()).unwrap();
            assert_eq!(ours.dims(), expected.dims());
            let case = (b, cin, cout, h, w, k, stride, affine, upsample, residual);

            let data = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let source = Source::read(&data, [b, cin, h, w], input);
            let skip_data = skip.as_ref().map(|s| s.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let reference = dequantized(&conv, &source, dims, skip_data.as_deref());
            let reference = Tensor::from_vec(reference, dims.to_vec(), &Device::Cpu).unwrap();
            let rounding = relative_error(&ours, &reference);
            assert!(rounding < 1e-6, "{case:?}: {rounding} from the dequantized arithmetic");

            let error = relative_error(&ours, &expected);
            assert!(error > 0.0 && error < 0.01, "{case:?}: relative error {error} from f32");
        }
    }

    // The patches, byte for byte, against the rule applied one value at a time: a scale per
    // output pixel from its whole patch, padding as zeros, ties to even.
    #[test]
    fn each_patch_is_quantized_with_its_own_scale() {
        if !vnni::available() {
            return;
        }
        let (cin, h, w) = (33, 4, 5);
        let x = image([1, cin, h, w], 0.9).affine(3.0, -0.5).unwrap();
        let weight = image([32, cin, 3, 3], 1.0);
        let conv = Int8Conv::quantize(&weight, &values(1, 32, 0.0).flatten_all().unwrap(), 1, 1).unwrap().unwrap();
        let data = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let source = Source::read(&data, [1, cin, h, w], ConvInput::default());
        let acts = conv.patches(&source, h, w);
        let at = |c: usize, y: isize, x: isize| {
            let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&x);
            if inside {
                data[(c * h + y as usize) * w + x as usize]
            } else {
                0.0
            }
        };
        for oy in 0..h as isize {
            for ox in 0..w as isize {
                let patch: Vec<f32> = (0..9)
                    .flat_map(|tap| (0..cin).map(move |c| (tap, c)))
                    .map(|(tap, c)| at(c, oy + tap / 3 - 1, ox + tap % 3 - 1))
                    .collect();
                let largest = patch.iter().fold(0f32, |m, v| m.max(v.abs()));
                let row = (oy as usize) * w + ox as usize;
                assert_eq!(acts.scales[row], largest / 127.0);
                let bytes = &acts.values[row * conv.packed.groups_dim..][..conv.packed.groups_dim];
                for (k, v) in patch.iter().enumerate() {
                    let q = (v * (127.0 / largest)).round_ties_even() as i32;
                    assert_eq!(bytes[k] as i32 - OFFSET, q, "pixel ({oy}, {ox}), value {k}");
                }
                assert!(bytes[patch.len()..].iter().all(|&b| b as i32 == OFFSET), "the padding is zero");
            }
        }
    }
}
