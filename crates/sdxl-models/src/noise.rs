//! Seeded Gaussian noise, bit-compatible with PyTorch's CPU generator.
//!
//! Why: `--seed N` must reproduce what diffusers draws with
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(N), dtype=torch.float32)`,
//! so a seed here gives the same image as the reference pipeline. Randomness is an input: the
//! pipeline receives the noise made here and never draws its own.
//!
//! Contract: [`randn`] returns `shape.iter().product()` f32 values in row-major order, the
//! standard-normal draw torch returns for a contiguous float32 tensor of that shape from a freshly
//! seeded CPU generator.
//!
//! Ported from ATen (PyTorch 2.x):
//! - `aten/src/ATen/core/MT19937RNGEngine.h`: the mt19937 engine and its seeding;
//! - `aten/src/ATen/CPUGeneratorImpl.cpp`: `random()`, `random64()` (two 32-bit draws, the first
//!   one the high word), the cached second Box–Muller sample, reset by `manual_seed`;
//! - `aten/src/ATen/core/TransformationHelper.h`: `uniform_real` (the low 24 bits of a 32-bit draw
//!   for float, the low 53 bits of a 64-bit draw for double, scaled by 2^-digits);
//! - `aten/src/ATen/core/DistributionsHelper.h`: `normal_distribution<double>`;
//! - `aten/src/ATen/native/cpu/DistributionTemplates.h`: `normal_kernel` / `normal_fill` /
//!   `NormalFill16`, the float path for contiguous tensors of 16 or more elements;
//! - `aten/src/ATen/native/cpu/avx_mathfun.h`: `log256_ps` and `sincos256_ps`, the AVX2 kernel's
//!   `log` and `sincos`.
//!
//! Two float kernels (see [`NormalFill`]): torch's x86-64 builds run an AVX2 Box–Muller with
//! polynomial `log`/`sincos` on every CPU with AVX2, AVX-512 ones included, while CPUs without AVX2
//! (and `ATEN_CPU_CAPABILITY=default`) run a generic loop over libm's `logf`/`cosf`/`sinf`. The two
//! differ by up to about 2e-6 in a third or so of the values. [`randn`] reproduces the AVX2 kernel,
//! the one diffusers runs on an x86 machine, bit for bit as torch's Linux wheels compute it
//! (including the multiply-adds their compiler fuses); the generic kernel is bit-identical wherever
//! Rust and torch call the same libm (glibc on Linux).

use std::f64::consts::PI;

/// Words of mt19937 state (`MERSENNE_STATE_N`).
const STATE_N: usize = 624;
/// The mt19937 shift (`MERSENNE_STATE_M`).
const STATE_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The mt19937 engine as ATen implements it (`at::mt19937`): the reference MT19937 with
/// `init_genrand` seeding from the low 32 bits of the seed.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; STATE_N],
    /// Index of the next word of `state` to temper; `STATE_N` means "twist first".
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; STATE_N];
        // `data_.state_[0] = seed & 0xffffffff`: the high half of a 64-bit seed is dropped, so
        // seeds `s` and `s + 2^32` give the same stream (as in torch).
        state[0] = seed as u32;
        for j in 1..STATE_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { state, next: STATE_N }
    }

    /// Regenerates all 624 words (`next_state()`).
    fn twist(&mut self) {
        for i in 0..STATE_N {
            let mixed = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % STATE_N] & LOWER_MASK);
            let odd = self.state[(i + 1) % STATE_N] & 1 != 0;
            let twisted = (mixed >> 1) ^ if odd { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + STATE_M) % STATE_N] ^ twisted;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next == STATE_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// PyTorch's CPU generator (`at::CPUGeneratorImpl`) after `manual_seed(seed)`.
///
/// Draws advance the state exactly as torch does, so a sequence of calls here matches the same
/// sequence of calls on one `torch.Generator("cpu")`.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// The second sample of the last double-precision Box–Muller pair, returned by the next
    /// [`TorchGenerator::normal_f64`] call (`next_double_normal_sample_`).
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`. Only the low 32 bits of `seed` reach the
    /// engine, as in torch: `2^32 + 5` seeds like `5`.
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// One 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn random_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// One 64-bit draw from two 32-bit draws, the first one the high word
    /// (`CPUGeneratorImpl::random64`, `make64BitsFrom32Bits(hi, lo)`).
    pub fn random_u64(&mut self) -> u64 {
        let hi = u64::from(self.random_u32());
        let lo = u64::from(self.random_u32());
        (hi << 32) | lo
    }

    /// A uniform float in `[0, 1)`: the low 24 bits of one 32-bit draw, times 2^-24
    /// (`uniform_real_distribution<float>(0, 1)`).
    pub fn uniform_f32(&mut self) -> f32 {
        // Both steps are exact: a 24-bit integer fits the f32 mantissa and 2^-24 is a power of two.
        (self.random_u32() & ((1 << f32::MANTISSA_DIGITS) - 1)) as f32 / (1u32 << f32::MANTISSA_DIGITS) as f32
    }

    /// A uniform double in `[0, 1)`: the low 53 bits of one 64-bit draw, times 2^-53
    /// (`uniform_real_distribution<double>(0, 1)`).
    pub fn uniform_f64(&mut self) -> f64 {
        (self.random_u64() & ((1 << f64::MANTISSA_DIGITS) - 1)) as f64 / (1u64 << f64::MANTISSA_DIGITS) as f64
    }

    /// One standard-normal double (`normal_distribution<double>(0, 1)`): Box–Muller on two
    /// uniform doubles; the sine sample is cached and returned by the next call.
    pub fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        // r = sqrt(-2 * log1p(-u2)); theta = 2 * pi * u1
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel, generator=self, dtype=torch.float32)` for a contiguous tensor: the
    /// values torch's CPU `normal_` kernel writes, in memory order.
    ///
    /// Below 16 elements torch draws each value with [`TorchGenerator::normal_f64`] and rounds it
    /// to f32; from 16 elements it takes the float path of [`TorchGenerator::fill_normal_f32`]
    /// with the Box–Muller kernel `fill`.
    pub fn randn(&mut self, numel: usize, fill: NormalFill) -> Vec<f32> {
        if numel >= 16 {
            let mut out = vec![0.0; numel];
            self.fill_normal_f32(&mut out, fill);
            out
        } else {
            // `transformation::normal(ret, 0, 1)` is `ret * 1 + 0`; the `+ 0` turns -0 into +0.
            (0..numel).map(|_| (self.normal_f64() + 0.0) as f32).collect()
        }
    }

    /// Torch's float path (`normal_fill`) for a contiguous tensor of at least 16 elements:
    /// one uniform float per element, then Box–Muller on each block of 16 (the first 8 values
    /// are the `u1`s, the last 8 the `u2`s of 8 pairs). When the length is not a multiple of 16,
    /// 16 fresh uniforms are drawn for the last 16 elements and that block is recomputed.
    ///
    /// # Panics
    /// If `out` has fewer than 16 elements (torch takes the double path there; see
    /// [`TorchGenerator::randn`]).
    pub fn fill_normal_f32(&mut self, out: &mut [f32], fill: NormalFill) {
        assert!(out.len() >= 16, "fill_normal_f32 needs at least 16 elements, got {}", out.len());
        let block_fn = match fill {
            NormalFill::Vectorized => normal_fill_16_vectorized,
            NormalFill::Scalar => normal_fill_16_scalar,
        };
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        for block in out.chunks_exact_mut(16) {
            block_fn(block);
        }
        let len = out.len();
        if !len.is_multiple_of(16) {
            let tail = &mut out[len - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            block_fn(tail);
        }
    }
}

/// Which of torch's two `NormalFill16` Box–Muller kernels the float path reproduces. They draw the
/// same uniforms and differ only in how `log`, `sin` and `cos` are computed, by up to about 2e-6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalFill {
    /// The AVX2 kernel, with avx_mathfun's polynomial `log256_ps` and `sincos256_ps`. Torch's
    /// x86-64 builds run it on every CPU with AVX2, AVX-512 ones included: this is what diffusers
    /// draws on an x86 machine.
    #[default]
    Vectorized,
    /// The generic kernel with libm's `logf`, `cosf` and `sinf`: what torch draws on CPUs without
    /// AVX2 (ARM, for one) or with `ATEN_CPU_CAPABILITY=default`.
    Scalar,
}

/// Torch's generic `NormalFill16` with mean 0 and std 1, in place on 16 uniforms in `[0, 1)`.
fn normal_fill_16_scalar(block: &mut [f32]) {
    for j in 0..8 {
        // u1 = 1 - data[j] maps [0, 1) to (0, 1] for the log; exact in f32.
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * c10::pi<double> * u2` is computed in double and stored in a float.
        let theta = (2.0 * PI * f64::from(u2)) as f32;
        // `std::fma(x, std, mean)` with std 1 and mean 0 is `x + 0`: exact, but -0 becomes +0.
        block[j] = radius * theta.cos() + 0.0;
        block[j + 8] = radius * theta.sin() + 0.0;
    }
}

/// Torch's AVX2 `NormalFill16` with mean 0 and std 1, one lane at a time: each vector operation
/// (and each multiply-add the compiler fused) is one f32 rounding here too, so the result is
/// bit-identical.
fn normal_fill_16_vectorized(block: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2π rounded to f32 once, then an f32 product.
    let two_pi = (2.0 * PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * avx_mathfun::log(u1)).sqrt();
        let (sin, cos) = avx_mathfun::sincos(two_pi * u2);
        // `_mm256_fmadd_ps(n, std, mean)` with std 1 and mean 0 is `n + 0`.
        block[j] = radius * cos + 0.0;
        block[j + 8] = radius * sin + 0.0;
    }
}

/// Scalar ports of the two functions of `aten/src/ATen/native/cpu/avx_mathfun.h` (Giovanni
/// Garberoglio's AVX version of Julien Pommier's sse_mathfun, after Cephes' `logf` and `sinf`)
/// that torch's AVX2 Box–Muller uses. Each step is one rounded f32 operation of the original; the
/// constants are written as the C source writes them (double literals stored as float).
///
/// Torch's Linux x86-64 wheels are built by GCC with `-mfma` and its default
/// `-ffp-contract=fast`, which fuses a multiply whose only use is an add or subtract into one FMA.
/// The `mul_add` calls below are exactly those fusions (the first multiply of `a*b + c*d` is the
/// one fused); checked bit for bit against torch 2.15's output.
#[allow(clippy::excessive_precision)] // constants copied digit for digit from the C source
mod avx_mathfun {
    /// `cephes_SQRTHF`, written as 0.707106781186547524 in the C source: the same f64, so the same f32.
    const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    const LOG_P: [f32; 9] = [
        7.037_683_629_2e-2_f64 as f32,
        -1.151_461_031_0e-1_f64 as f32,
        1.167_699_874_0e-1_f64 as f32,
        -1.242_014_084_6e-1_f64 as f32,
        1.424_932_278_7e-1_f64 as f32,
        -1.666_805_766_5e-1_f64 as f32,
        2.000_071_476_5e-1_f64 as f32,
        -2.499_999_399_3e-1_f64 as f32,
        3.333_333_117_4e-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.121_944_40e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693_359_375_f64 as f32;

    const MINUS_DP: [f32; 3] =
        [-0.785_156_25_f64 as f32, -2.418_756_484_985_351_562_5e-4_f64 as f32, -3.774_894_977_445_941_08e-8_f64 as f32];
    const SINCOF: [f32; 3] =
        [-1.951_529_589_1e-4_f64 as f32, 8.332_160_873_6e-3_f64 as f32, -1.666_665_461_1e-1_f64 as f32];
    const COSCOF: [f32; 3] = [
        2.443_315_711_809_948e-5_f64 as f32,
        -1.388_731_625_493_765e-3_f64 as f32,
        4.166_664_568_298_827e-2_f64 as f32,
    ];
    /// 4 / π.
    const FOPI: f32 = 1.273_239_544_735_16_f64 as f32;

    /// `log256_ps` for one positive lane.
    pub(super) fn log(x: f32) -> f32 {
        // Cut off denormals; split into exponent e and a mantissa x in [0.5, 1).
        let bits = x.max(f32::MIN_POSITIVE).to_bits();
        let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        // if x < SQRTHF { e -= 1; x = x + x - 1 } else { x = x - 1 }, as the masked code does it.
        let below = x < SQRTHF;
        let tmp = if below { x } else { 0.0 };
        x -= 1.0;
        e -= if below { 1.0 } else { 0.0 };
        x += tmp;

        let z = x * x;
        // y = ((p0*x + p1)*x + ... + p8) * x * z, each `*x + p` fused.
        let y = LOG_P[1..].iter().fold(LOG_P[0], |y, &p| y.mul_add(x, p)) * x;
        // y*z + e*q1: the y*z product is fused, e*q1 rounded first.
        let y = y.mul_add(z, e * LOG_Q1);
        // y - z*0.5 (z*0.5 is exact, fused or not).
        let y = y - z * 0.5;
        // (x + y) + e*q2, fused.
        e.mul_add(LOG_Q2, x + y)
    }

    /// `sincos256_ps` for one lane: `(sin(x), cos(x))`.
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        // j = (int(x * 4/π) + 1) & ~1: the octant, rounded up to even.
        let j = ((x * FOPI) as i32 + 1) & !1;
        let y = j as f32;
        let sign_sin = sign_sin ^ (((j & 4) as u32) << 29);
        let sign_cos = ((!(j - 2) & 4) as u32) << 29;
        let sine_poly_for_sin = j & 2 == 0;

        // Extended-precision reduction x = ((x - y*DP1) - y*DP2) - y*DP3, each step fused.
        for dp in MINUS_DP {
            x = y.mul_add(dp, x);
        }
        let z = x * x;

        // Cosine polynomial on [0, π/4]: ((c0*z + c1)*z + c2)*z*z - z*0.5 + 1, where the last
        // product is fused into the subtraction and z*0.5 rounded first (it is exact).
        let yc = COSCOF[0].mul_add(z, COSCOF[1]).mul_add(z, COSCOF[2]) * z;
        let yc = yc.mul_add(z, -(z * 0.5)) + 1.0;
        // Sine polynomial: ((s0*z + s1)*z + s2)*z*x + x.
        let ys = SINCOF[0].mul_add(z, SINCOF[1]).mul_add(z, SINCOF[2]) * z;
        let ys = ys.mul_add(x, x);

        // The original selects with bit masks and adds the zeroed other branch: `v + 0`.
        let (sin, cos) = if sine_poly_for_sin { (ys + 0.0, yc + 0.0) } else { (yc + 0.0, ys + 0.0) };
        (f32::from_bits(sin.to_bits() ^ sign_sin), f32::from_bits(cos.to_bits() ^ sign_cos))
    }
}

/// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`,
/// flattened in row-major order, as torch computes it on an x86-64 CPU
/// ([`NormalFill::Vectorized`]).
///
/// # Panics
/// If the element count overflows `usize` or cannot be allocated; callers bound the shape first.
pub fn randn(seed: u64, shape: &[usize]) -> Vec<f32> {
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .unwrap_or_else(|| panic!("noise shape {shape:?} has more elements than fit in memory"));
    TorchGenerator::new(seed).randn(numel, NormalFill::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference MT19937 (`init_genrand(5489)`): its 10000th output is 4123659995.
    #[test]
    fn mt19937_matches_the_reference_sequence() {
        let mut mt = Mt19937::new(5489);
        let first = mt.next_u32();
        assert_eq!(first, 3_499_211_612);
        let last = (1..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn uniform_f32_uses_the_low_24_bits() {
        let mut a = TorchGenerator::new(7);
        let mut b = TorchGenerator::new(7);
        let raw = a.random_u32();
        assert_eq!(b.uniform_f32(), (raw & 0x00ff_ffff) as f32 / 16_777_216.0);
    }

    #[test]
    fn double_path_caches_the_second_sample() {
        let mut g = TorchGenerator::new(3);
        g.normal_f64();
        let mut engine_after_first = g.clone();
        g.normal_f64();
        // The second sample came from the cache: the engine has not moved since the first call.
        assert_eq!(g.random_u32(), engine_after_first.random_u32());
    }
}
