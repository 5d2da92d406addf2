//! A process-wide count of the floating-point operations done by the matrix products
//! (linear layers, convolutions, attention), so `sdxl bench` can report achieved GFLOP/s.
//! Element-wise work (norms, activations, softmax) is not counted, as is the custom.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// Records `n` floating-point operations (a multiply-add counts as two).
pub fn add(n: usize) {
    COUNT.fetch_add(n as u64, Ordering::Relaxed);
}

/// The operations recorded since the last call, resetting the count.
pub fn take() -> u64 {
    COUNT.swap(0, Ordering::Relaxed)
}
