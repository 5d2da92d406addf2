//! `noise::randn` against `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
//!
//! Fixture: `tests/fixtures/noise_reference.json`, made by `tools/parity/make_noise_reference.py`
//! with both of torch's float kernels (the AVX2 one x86 builds run, and the generic libm one).

use sdxl_models::noise::{randn, NormalFill, TorchGenerator};
use serde::Deserialize;

/// Tolerance on each value, `|ours - torch| <= atol + rtol * |torch|`: none. Both kernels are ported
/// operation for operation (the generic one through the same libm calls torch makes), so the values
/// are torch's bit for bit; the checksum pins the values the fixture does not list.
const TOL: Tol = Tol { atol: 0.0, rtol: 0.0 };
/// The sum of up to 65536 values is compared to an exactly rounded reference sum; this absorbs the
/// rounding of our plain f64 accumulation, not any difference in the values.
const SUM_ATOL: f64 = 1e-7;

struct Tol {
    atol: f32,
    rtol: f32,
}

#[derive(Deserialize)]
struct Fixture {
    vectorized: Kernel,
    scalar: Kernel,
}

#[derive(Deserialize)]
struct Kernel {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    seed: u64,
    shape: Vec<usize>,
    /// Every value, for 16 or fewer.
    values: Option<Vec<f64>>,
    head: Option<Vec<f64>>,
    tail: Option<Vec<f64>>,
    sum: Option<f64>,
    /// Sum over i of (i + 1) * bits(value[i]), wrapping at 2^64.
    bits_checksum: u64,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/noise_reference.json");
    let text = std::fs::read_to_string(path).expect("noise fixture is committed");
    serde_json::from_str(&text).expect("noise fixture is valid JSON")
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // Each reference value is an f32 written exactly as an f64.
        let w = w as f32;
        assert!((g - w).abs() <= TOL.atol + TOL.rtol * w.abs(), "{what}[{i}]: got {g:e}, torch {w:e}");
    }
}

/// Sum over i of (i + 1) * bits(values[i]), wrapping at 2^64, as the fixture script computes it.
fn bits_checksum(values: &[f32]) -> u64 {
    values.iter().zip(1u64..).fold(0u64, |acc, (v, i)| acc.wrapping_add(i.wrapping_mul(u64::from(v.to_bits()))))
}

fn check(case: &Case, got: &[f32], what: &str) {
    assert_eq!(got.len(), case.shape.iter().product::<usize>(), "{what}: numel");
    if let Some(values) = &case.values {
        assert_close(got, values, &format!("{what} values"));
    }
    if let (Some(head), Some(tail)) = (&case.head, &case.tail) {
        assert_close(&got[..head.len()], head, &format!("{what} head"));
        assert_close(&got[got.len() - tail.len()..], tail, &format!("{what} tail"));
    }
    if let Some(sum) = case.sum {
        let ours: f64 = got.iter().map(|&v| f64::from(v)).sum();
        assert!((ours - sum).abs() <= SUM_ATOL, "{what}: sum {ours} vs torch {sum}");
    }
    assert_eq!(bits_checksum(got), case.bits_checksum, "{what}: some value differs from torch's in its bits");
}

#[test]
fn randn_matches_torch_on_x86() {
    let cases = fixture().vectorized.cases;
    let seeds: std::collections::BTreeSet<u64> = cases.iter().map(|c| c.seed).collect();
    assert!(seeds.len() >= 20, "fixture covers {} seeds", seeds.len());
    for seed in [0, u64::from(u32::MAX), (1 << 32) + 5, i64::MAX as u64, u64::MAX] {
        assert!(seeds.contains(&seed), "fixture lacks seed {seed}");
    }
    for case in &cases {
        let got = randn(case.seed, &case.shape);
        check(case, &got, &format!("seed {} shape {:?}", case.seed, case.shape));
    }
}

#[test]
fn generic_kernel_matches_torch_without_avx2() {
    for case in &fixture().scalar.cases {
        let numel = case.shape.iter().product();
        let got = TorchGenerator::new(case.seed).randn(numel, NormalFill::Scalar);
        check(case, &got, &format!("scalar kernel, seed {} shape {:?}", case.seed, case.shape));
    }
}

#[test]
fn seeds_above_u32_use_the_low_32_bits() {
    // torch's mt19937 seeds from `seed & 0xffffffff`.
    assert_eq!(randn((1 << 32) + 5, &[3, 7, 11]), randn(5, &[3, 7, 11]));
    assert_ne!(randn(6, &[3, 7, 11]), randn(5, &[3, 7, 11]));
}

#[test]
fn same_seed_gives_identical_bits() {
    for shape in [&[5][..], &[1, 4, 64, 64][..], &[17][..]] {
        let a = randn(1234, shape);
        let b = randn(1234, shape);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "shape {shape:?}");
    }
}

#[test]
fn one_generator_continues_like_torch() {
    // Two draws from one generator are not the first draw twice: the state carries on, and the
    // double path's cached sample (an odd count below 16) is consumed by the next small draw.
    let mut g = TorchGenerator::new(42);
    let first = g.randn(3, NormalFill::default());
    let second = g.randn(3, NormalFill::default());
    assert_ne!(first, second);
    let mut h = TorchGenerator::new(42);
    let all: Vec<f32> = (0..6).map(|_| h.normal_f64() as f32).collect();
    assert_eq!([first, second].concat(), all);
}

#[test]
fn empty_shape_draws_nothing() {
    assert!(randn(0, &[1, 0, 8]).is_empty());
    assert_eq!(randn(0, &[]).len(), 1, "a 0-d tensor holds one value");
}
