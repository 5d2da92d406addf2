//! OpenBLAS's `sgemm`, loaded at run time, which runs SDXL's f32 matrix shapes several times
//! faster than candle's own GEMM (see docs/performance.md). Where the library is missing, or
//! `SDXL_OPENBLAS=off`, the dispatcher ([`crate::nn::kernels`]) runs candle's ops instead.

use std::os::raw::c_int;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::with_data;

type Sgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

/// OpenBLAS, loaded at run time so that a machine without it still runs (on candle's kernels).
struct OpenBlas {
    sgemm: Sgemm,
    _library: libloading::Library,
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The names the system's OpenBLAS is loaded by, in order.
const LIBRARY_NAMES: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

/// `SDXL_OPENBLAS=off` keeps OpenBLAS unloaded even where it is installed, so that the f32
/// kernels run on candle's ops: to compare the two paths, or to test the fallback.
const SWITCH: &str = "SDXL_OPENBLAS";

/// Whether `SDXL_OPENBLAS=off` is set.
fn switched_off() -> bool {
    std::env::var_os(SWITCH).is_some_and(|v| v == "off")
}

/// Sets OpenBLAS's environment (unless the user set it) for [`openblas`] to load with. It only
/// has an effect before OpenBLAS is loaded, and it writes the process environment, so it must
/// run before any other thread starts: the binary calls it first thing in `main`.
///
/// - `OPENBLAS_CORETYPE` from the CPU's features: distributions' OpenBLAS builds fall back to
///   SSE3 kernels on CPU models newer than they know, several times slower.
/// - `OPENBLAS_THREAD_TIMEOUT=4`: OpenBLAS's idle threads spin (yielding) for about 2²⁸ cycles
///   after each product, taking cores from the element-wise work between products; 2⁴ makes
///   them sleep at once (waking costs microseconds, a product milliseconds).
pub fn prepare_environment() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
        if let Some(core) = core_type() {
            std::env::set_var("OPENBLAS_CORETYPE", core);
        }
    }
    if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() {
        std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "4");
    }
}

/// The system's OpenBLAS, or `None` when it cannot be loaded or `SDXL_OPENBLAS=off`. OpenBLAS
/// threads each product itself (measured faster than splitting products across rayon's
/// threads); it reads its environment as it loads (see [`prepare_environment`]).
fn openblas() -> Option<&'static OpenBlas> {
    static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();
    OPENBLAS
        .get_or_init(|| {
            if switched_off() {
                return None;
            }
            LIBRARY_NAMES.iter().find_map(|name| {
                // SAFETY: loading OpenBLAS runs its initialiser, which only reads the
                // environment and sizes its buffers.
                let library = unsafe { libloading::Library::new(name) }.ok()?;
                // SAFETY: `cblas_sgemm` has the C signature `Sgemm` declares.
                let sgemm = *unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") }.ok()?;
                Some(OpenBlas { sgemm, _library: library })
            })
        })
        .as_ref()
}

/// OpenBLAS's name for the best kernels this CPU runs.
fn core_type() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            return Some("SkylakeX");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some("Haswell");
        }
    }
    None
}

/// Whether these tensors take the OpenBLAS path: f32, on the CPU, with OpenBLAS installed.
pub fn applies(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu()) && openblas().is_some()
}

/// Row-major `C = alpha · A · op(B)`, `C` `[m, n]` with row stride `ldc`; `op` transposes `B`
/// when asked. The slices are checked to hold every element the call reads or writes.
pub(super) fn sgemm(
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
) {
    let (a_rows, a_cols) = (m, k);
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    assert!(a_cols <= lda && b_cols <= ldb && n <= ldc, "sgemm: leading dimension too small");
    assert!(a_rows == 0 || a.len() >= (a_rows - 1) * lda + a_cols, "sgemm: A too short");
    assert!(b_rows == 0 || b.len() >= (b_rows - 1) * ldb + b_cols, "sgemm: B too short");
    assert!(c.len() >= (m - 1) * ldc + n, "sgemm: C too short");
    let int = |v: usize| c_int::try_from(v).expect("sgemm: dimension exceeds the BLAS integer range");
    let openblas = openblas().expect("sgemm runs only where `applies` found OpenBLAS");
    // SAFETY: the assertions above keep every access of the row-major call inside the slices.
    unsafe {
        (openblas.sgemm)(
            ROW_MAJOR,
            NO_TRANS,
            if trans_b { TRANS } else { NO_TRANS },
            int(m),
            int(n),
            int(k),
            alpha,
            a.as_ptr(),
            int(lda),
            b.as_ptr(),
            int(ldb),
            0.0,
            c.as_mut_ptr(),
            int(ldc),
        )
    }
}

/// `a` `[M, K]` · `b`ᵀ, `b` `[N, K]`.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (n, k2) = b.dims2()?;
    if k != k2 {
        return Err(candle_core::Error::Msg(format!("matmul: inner dimensions {k} and {k2} differ")));
    }
    let mut out = vec![0f32; m * n];
    with_data(a, |a| with_data(b, |b| sgemm(true, (m, n, k), 1.0, (a, k), (b, k), (&mut out, n))))??;
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// Whether the kernels should run on OpenBLAS here: the library is installed (looked up
/// directly, not through [`openblas`], so that a loader that failed silently fails the tests
/// instead of skipping the path) and not switched off with `SDXL_OPENBLAS=off`. Asserts that
/// [`openblas`] agrees.
#[cfg(test)]
pub(crate) fn openblas_expected() -> bool {
    // first, so that the loader, not this probe, is what initialises OpenBLAS
    let loaded = openblas().is_some();
    let installed = LIBRARY_NAMES.iter().any(|name| {
        // SAFETY: as in `openblas`; the symbol is only looked up, not called
        unsafe { libloading::Library::new(name) }
            .is_ok_and(|library| unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") }.is_ok())
    });
    let expected = installed && !switched_off();
    assert_eq!(
        loaded,
        expected,
        "OpenBLAS installed: {installed}, {SWITCH}=off: {}, but the loader found it: {loaded}",
        switched_off()
    );
    expected
}
