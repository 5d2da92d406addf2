//! Shared helpers of the golden tests: fixture paths and tolerance checks.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// Element-wise tolerance: |actual − expected| ≤ atol + rtol·|expected|.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub atol: f32,
    pub rtol: f32,
}

/// `crates/sdxl-models/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The two tiny models in the diffusers layout.
pub const MODELS: [&str; 2] = ["tiny-sdxl", "tiny-2level-fp16"];

/// All tensors of a golden safetensors file, on the CPU.
pub fn golden(relative: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("golden").join(relative);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// Reads a tensor as f32 values.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("tensor to f32 values")
}

/// Panics with the worst element if `actual` and `expected` differ in shape or beyond `tol`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: Tol) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = (values(actual), values(expected));
    let mut worst = (0usize, 0f32);
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        let excess = (x - y).abs() - (tol.atol + tol.rtol * y.abs());
        let excess = if excess.is_nan() { f32::INFINITY } else { excess };
        if excess > 0.0 && excess > worst.1 {
            worst = (i, excess);
        }
    }
    let (i, excess) = worst;
    assert!(excess <= 0.0, "{what}: element {i} is {} but expected {} (tolerance {tol:?})", a[i], e[i]);
}
