//! The activations that follow a linear layer in the text encoders' feed-forward blocks, named
//! once so that a product can apply one as it stores its sums ([`super::Linear::forward_then`]).
//! [`super::kernels::activate`] applies one to a tensor.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)` (CLIP ViT-L).
    QuickGelu,
    /// `x · Φ(x)` with the exact erf (OpenCLIP ViT-bigG).
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
}
