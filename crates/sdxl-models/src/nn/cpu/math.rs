//! Element-wise maths that vectorises: libm's `expf` is an opaque call, so a loop around it
//! runs one element at a time; this inlines into the loop and LLVM widens it. And
//! [`with_avx2`], which runs such loops with 256-bit vectors where the CPU has them, while the
//! binary stays runnable on any x86-64.

use crate::nn::Activation;

/// Runs `f` compiled for AVX2 and FMA when the CPU has them (else as built). For the code to
/// be compiled that way it must inline into `f`: pass a closure marked `#[inline(always)]`
/// that calls `#[inline(always)]` functions. Results are identical either way (no fused
/// multiply-adds are formed without being asked for).
#[inline(always)]
pub fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `avx2` was compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `eˣ` to within 2 ulp for every `x` where `eˣ` is a normal f32 (Cephes' `expf`: `2ⁿ · e^r`
/// with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and a degree-6 polynomial for `e^r`);
/// clamped to the normal range outside it.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split into a part exact in f32 and the rest, so `x − n·ln 2` loses nothing
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.376_26);
    // round to nearest by adding and removing 1.5·2²³ (`round` and `floor` are libm calls
    // on baseline x86-64, which would stop the loop vectorising); |x·log₂e| < 128 here
    const ROUNDER: f32 = 12_582_912.0;
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // the same n as an integer, read from the mantissa bits (an `as i32` cast saturates,
    // which costs a compare and blocks vectorising)
    let n_int = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Lanes of the blocked reductions below: independent accumulators, so the loop vectorises
/// (a single running f32 sum is a chain LLVM may not reorder).
const LANES: usize = 8;

/// `Σ f(x)`: f32 partial sums in [`LANES`] lanes over runs of 1024 elements, f64 across runs.
#[inline(always)]
pub fn sum_by_runs(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    x.chunks(1024)
        .map(|run| {
            let mut lanes = [0f32; LANES];
            let mut blocks = run.chunks_exact(LANES);
            for block in &mut blocks {
                for (lane, &v) in lanes.iter_mut().zip(block) {
                    *lane += f(v);
                }
            }
            let tail: f32 = blocks.remainder().iter().map(|&v| f(v)).sum();
            f64::from(lanes.iter().sum::<f32>() + tail)
        })
        .sum()
}

/// The largest element (`-∞` for none), in [`LANES`] lanes.
#[inline(always)]
#[cfg_attr(not(feature = "openblas"), allow(dead_code))]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut blocks = x.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    blocks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `x · sigmoid(x)`, the way every fused kernel computes it (so fused and unfused paths agree
/// to the bit).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)` within 6e-7 absolute: Abramowitz & Stegun 7.1.26 (1.5e-7, plus f32 rounding),
/// the approximation PyTorch's vectorised CPU `erf` also uses:
/// `1 − (a₁t + … + a₅t⁵)·e^(−x²)`, `t = 1 / (1 + p·|x|)`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// GELU with the exact (erf) form, as torch's `gelu(approximate="none")`:
/// `x · 0.5 · (1 + erf(x / √2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x · sigmoid(1.702 x)`, CLIP's quick GELU.
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

/// GELU's tanh form, as torch's `gelu(approximate="tanh")`:
/// `x · 0.5 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`, with `tanh u = 1 − 2 / (e^(2u) + 1)`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    x * 0.5 * (1.0 + tanh)
}

/// Every value of `values` through `activation`, vectorised (see [`with_avx2`]): the same bits
/// wherever it runs, fused into a product or on its own.
#[inline(always)]
pub fn activate_in_place(values: &mut [f32], activation: Activation) {
    match activation {
        Activation::QuickGelu => values.iter_mut().for_each(|v| *v = quick_gelu(*v)),
        Activation::Gelu => values.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        Activation::GeluTanh => values.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
    }

    #[test]
    fn erf_is_within_6e7_of_the_exact_value() {
        // reference: erf by its Taylor series in f64 (converges fast for |x| ≤ 4; beyond, 1)
        let exact = |x: f64| -> f64 {
            if x.abs() > 4.0 {
                return x.signum();
            }
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 * sum.abs().max(1e-300) {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((f64::from(erf(x)) - exact(f64::from(x))).abs());
        }
        assert!(worst < 6e-7, "worst absolute error {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn the_gelu_forms_match_their_formulas_in_f64() {
        let mut worst = [0f64; 2];
        for i in -20_000..=20_000 {
            let x = i as f32 * 1e-3;
            let xd = f64::from(x);
            let quick = xd / (1.0 + (-1.702 * xd).exp());
            let tanh = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            worst[0] = worst[0].max((f64::from(quick_gelu(x)) - quick).abs() / (1.0 + quick.abs()));
            worst[1] = worst[1].max((f64::from(gelu_tanh(x)) - tanh).abs() / (1.0 + tanh.abs()));
        }
        assert!(worst[0] < 1e-6 && worst[1] < 1e-6, "worst errors {worst:?}");
        assert_eq!((quick_gelu(0.0), gelu_tanh(0.0)), (0.0, 0.0));
        // far out: no overflow to NaN or infinity, the limits 0 and x
        for (value, limit) in [(quick_gelu(-200.0), 0.0), (gelu_tanh(-200.0), 0.0), (gelu_tanh(200.0), 200.0)] {
            assert!((value - limit).abs() < 1e-30, "{value} for {limit}");
        }
    }
}
