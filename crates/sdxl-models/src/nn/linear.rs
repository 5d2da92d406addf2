//! A fully connected layer, `y = x · Wᵀ + b`, over the last dimension of any-rank input; its
//! matrix kept as loaded (f32, or narrow f16/bf16) or quantized to int8 as it loads.

use std::cell::Cell;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::kernels::{self, Int8Matrix, PanelMatrix};
use super::{flops, precision, Activation};

/// How the linear layers (and convolutions, see [`super::Conv2d`]) keep their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// As loaded: the compute dtype, or the narrow storage dtype (pixel-exact).
    #[default]
    None,
    /// int8 blocks (see [`Int8Matrix`]); the activations are quantized as each product runs.
    Int8,
}

thread_local! {
    /// The quantization of the linear layers built on this thread now ([`building_with`]).
    static BUILDING: Cell<Quantization> = const { Cell::new(Quantization::None) };
    /// Whether the layers built on this thread now run products of few rows
    /// ([`building_for_few_rows`]).
    static FEW_ROWS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` with `cell` set to `value`, restored afterwards (also on a panic).
fn scoped<T: Copy + 'static, R>(
    cell: &'static std::thread::LocalKey<Cell<T>>,
    value: T,
    build: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(cell, cell.with(|c| c.replace(value)));
    build()
}

/// Runs `build` with every [`Linear`] (and [`super::Conv2d`]) it constructs on this thread
/// quantized as `quantization` says: each matrix is quantized as it loads, so the f32 model
/// never exists whole. (A scope
/// rather than a parameter: the layers sit many constructors deep, and only the models that
/// ask for it, the UNet and text encoders, are built inside one.)
pub fn building_with<R>(quantization: Quantization, build: impl FnOnce() -> R) -> R {
    scoped(&BUILDING, quantization, build)
}

/// Runs `build` with every f32 [`Linear`] it constructs (not quantized) packed for products of
/// a few dozen rows, where the CPU has the kernel ([`PanelMatrix`]): the text encoders, whose
/// products have one row per token.
pub fn building_for_few_rows<R>(build: impl FnOnce() -> R) -> R {
    scoped(&FEW_ROWS, true, build)
}

/// The quantization [`building_with`] set for this thread now.
pub(crate) fn building() -> Quantization {
    BUILDING.with(Cell::get)
}

#[derive(Debug, Clone)]
enum Matrix {
    /// `[out, in]`, as torch stores it.
    Dense(Tensor),
    Int8(Int8Matrix),
    /// f32, packed for few rows.
    Panels(PanelMatrix),
}

#[derive(Debug, Clone)]
pub struct Linear {
    matrix: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer with a bias.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_bias(in_dim, out_dim, true, vb)
    }

    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_bias(in_dim, out_dim, false, vb)
    }

    pub fn with_bias(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        Ok(match BUILDING.with(Cell::get) {
            // (the panels add the bias as they store the sums)
            Quantization::None if FEW_ROWS.with(Cell::get) && kernels::panels_apply(&weight) => {
                Self { matrix: Matrix::Panels(kernels::pack_panels(&weight, bias.as_ref())?), bias: None }
            }
            Quantization::None => Self { matrix: Matrix::Dense(weight), bias },
            Quantization::Int8 => Self { matrix: Matrix::Int8(Int8Matrix::quantize(&weight)?), bias },
        })
    }

    /// `(out, in)`.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match &self.matrix {
            Matrix::Dense(weight) => weight.dims2(),
            Matrix::Int8(matrix) => Ok(matrix.dims()),
            Matrix::Panels(matrix) => Ok(matrix.dims()),
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_maybe_then(x, None)
    }

    /// `activation(x · Wᵀ + b)`, the activation applied as the product stores its sums where
    /// the kernel does that (the panels), else in a pass of its own.
    pub fn forward_then(&self, x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
        self.forward_maybe_then(x, Some(activation))
    }

    fn forward_maybe_then(&self, x: &Tensor, then: Option<Activation>) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (out_dim, in_dim) = self.dims()?;
        let rows = x.elem_count() / in_dim.max(1);
        flops::add(2 * rows * in_dim * out_dim);
        let flat = x.reshape((rows, in_dim))?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("linear input has at least one dimension") = out_dim;
        let y = match &self.matrix {
            Matrix::Dense(weight) => kernels::matmul_nt(&flat, &precision::widened_for(weight, x)?)?,
            Matrix::Int8(matrix) => matrix.matmul_nt(&flat)?.to_dtype(x.dtype())?,
            Matrix::Panels(matrix) => return kernels::panels_matmul_nt(&flat, matrix, then)?.reshape(out_dims),
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        let y = match then {
            Some(activation) => kernels::activate(&y, activation)?,
            None => y,
        };
        y.reshape(out_dims)
    }
}

/// Whether `dtype` and the device allow int8 linear layers: f32 compute on the CPU.
pub fn int8_supported(dtype: DType, device: &candle_core::Device) -> bool {
    dtype == DType::F32 && device.is_cpu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layer(vb: VarBuilder) -> Linear {
        Linear::new(640, 24, vb).unwrap()
    }

    /// Made-up f32 weights, the same for every layer of the same names.
    fn vb() -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(crate::random_weights::RandomValues { narrow: None }),
            DType::F32,
            Device::Cpu,
        )
    }

    #[test]
    fn only_layers_built_in_the_scope_are_quantized_and_they_stay_close() {
        let device = Device::Cpu;
        let dense = layer(vb());
        let int8 = building_with(Quantization::Int8, || layer(vb()));
        let after = layer(vb());
        assert!(matches!(dense.matrix, Matrix::Dense(_)));
        assert!(matches!(int8.matrix, Matrix::Int8(_)));
        assert!(matches!(after.matrix, Matrix::Dense(_)), "the scope must end with the call");

        let x = Tensor::randn(0f32, 1., (2, 5, 640), &device).unwrap();
        let exact = dense.forward(&x).unwrap();
        let ours = int8.forward(&x).unwrap();
        assert_eq!(ours.dims(), &[2, 5, 24]);
        let error = ((&ours - &exact).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
            / exact.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        .sqrt();
        assert!(error < 0.02 && error > 0.0, "relative error {error}");
    }

    #[test]
    fn few_row_layers_are_packed_where_the_kernel_runs_and_give_the_same_product() {
        let device = Device::Cpu;
        let dense = layer(vb());
        let packed = building_for_few_rows(|| layer(vb()));
        let int8 = building_for_few_rows(|| building_with(Quantization::Int8, || layer(vb())));
        assert!(matches!(int8.matrix, Matrix::Int8(_)), "quantization comes first");
        assert!(matches!(layer(vb()).matrix, Matrix::Dense(_)), "the scope must end with the call");
        if !matches!(packed.matrix, Matrix::Panels(_)) {
            assert!(!kernels::panels_apply(&Tensor::zeros((2, 2), DType::F32, &device).unwrap()));
            eprintln!("no panel kernel on this CPU");
            return;
        }
        let x = Tensor::randn(0f32, 1., (1, 77, 640), &device).unwrap();
        let exact = dense.forward(&x).unwrap();
        let ours = packed.forward(&x).unwrap();
        assert_eq!(ours.dims(), &[1, 77, 24]);
        let worst = (&ours - &exact).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let worst = worst.to_scalar::<f32>().unwrap();
        assert!(worst < 1e-4, "worst difference {worst}: only the order of the sums differs");
        // fused into the panels' store, or a pass of its own after the dense product
        let fused = packed.forward_then(&x, Activation::Gelu).unwrap();
        let separate = dense.forward_then(&x, Activation::Gelu).unwrap();
        let worst = (&fused - &separate).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let worst = worst.to_scalar::<f32>().unwrap();
        assert!(worst < 1e-4, "worst difference {worst} with the activation");
        assert!((&fused - &ours).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
    }
}
