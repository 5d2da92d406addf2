//! Narrow weight storage: matrices and convolution kernels kept in f16 or bf16 (half the
//! memory of f32) while the arithmetic stays in the compute dtype. Each layer widens its
//! matrix as it uses it; the widened copy lives for one product.
//!
//! Biases, norms and other vectors stay in the compute dtype: they are a rounding error of
//! the memory, and the ops that use them would otherwise all need casts.

use candle_core::{CpuStorage, DType, Shape, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// The dtype a parameter of `shape` is kept in when the model computes in `compute`: matrices
/// and kernels (rank 2 and up) in `narrow` where given, everything else in `compute`.
pub fn stored_dtype(shape: &Shape, compute: DType, narrow: Option<DType>) -> DType {
    match narrow {
        Some(narrow) if shape.rank() >= 2 => narrow,
        _ => compute,
    }
}

/// `param` in the dtype of `x`, the input it is about to meet (a cheap clone when they agree).
pub fn widened_for(param: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if param.dtype() == x.dtype() {
        return Ok(param.clone());
    }
    if x.dtype() == DType::F32 {
        if let Some(widened) = widen_on_cpu(param)? {
            return Ok(widened);
        }
    }
    param.to_dtype(x.dtype())
}

/// Elements per parallel task: large enough to amortise the task, small enough to share.
const CHUNK: usize = 1 << 16;

/// f16/bf16 → f32 with the CPU's vector conversions (F16C), on all threads; `None` where the
/// tensor is not a contiguous half-precision CPU tensor. (candle converts one element at a
/// time, which would cost as much as a small product.)
fn widen_on_cpu(param: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (storage, layout) = param.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let mut out = vec![0f32; end - start];
    match cpu {
        CpuStorage::F16(values) => out
            .par_chunks_mut(CHUNK)
            .zip(values[start..end].par_chunks(CHUNK))
            .for_each(|(dst, src)| src.convert_to_f32_slice(dst)),
        CpuStorage::BF16(values) => out
            .par_chunks_mut(CHUNK)
            .zip(values[start..end].par_chunks(CHUNK))
            .for_each(|(dst, src)| src.convert_to_f32_slice(dst)),
        _ => return Ok(None),
    }
    Tensor::from_vec(out, param.shape(), param.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn only_matrices_and_kernels_are_kept_narrow() {
        let narrow = Some(DType::F16);
        assert_eq!(stored_dtype(&Shape::from((4, 3)), DType::F32, narrow), DType::F16);
        assert_eq!(stored_dtype(&Shape::from((4, 3, 3, 3)), DType::F32, narrow), DType::F16);
        assert_eq!(stored_dtype(&Shape::from(4), DType::F32, narrow), DType::F32);
        assert_eq!(stored_dtype(&Shape::from((4, 3)), DType::F32, None), DType::F32);
    }

    #[test]
    fn widening_matches_candle_for_both_half_types() {
        let values: Vec<f32> = (0..7 * 28_573).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect();
        let x = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        for narrow in [DType::F16, DType::BF16] {
            let whole = Tensor::from_vec(values.clone(), (7, 28_573), &Device::Cpu).unwrap().to_dtype(narrow).unwrap();
            // rows 1.. start inside the storage: the offset must be honoured
            let param = whole.narrow(0, 1, 6).unwrap();
            let ours = widened_for(&param, &x).unwrap();
            assert_eq!(ours.dtype(), DType::F32);
            assert_eq!(ours.dims(), param.dims());
            let expected = param.to_dtype(DType::F32).unwrap();
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
