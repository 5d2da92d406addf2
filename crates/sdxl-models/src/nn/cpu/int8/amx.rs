//! The packed int8 product ([`super::vnni::Packed`]) on AMX tiles (`tdpbusd`): one instruction
//! multiplies 16 rows × 64 inputs by 64 inputs × 16 channels, 256 times the multiply-adds of
//! one `vpdpbusd`. The panels are already laid out as a tile's right-hand operand, and the
//! sums, an exact int32 for both kernels, go through the same float epilogue
//! ([`super::vnni::store_sums`]): the results are bit for bit the VNNI kernel's.
//!
//! Register use: tmm0–3 hold a 32-row × 32-channel block of sums, tmm4–5 its two 16-row
//! strips of activations, tmm6–7 its two panels of weights. The kernel needs Linux's
//! permission for the tile state (`arch_prctl`), asked once per process.

#[cfg(target_arch = "x86_64")]
use super::vnni::{store_sums, CHUNK_PANELS, PANEL};
use super::vnni::{Activations, Packed, ROW_ALIGN};
use rayon::prelude::*;

/// Rows per tile, and bytes (inputs) per tile row.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 16;
#[cfg(target_arch = "x86_64")]
const TILE_BYTES: usize = 64;

/// Whether this CPU and kernel run AMX int8 tiles (asked once; the answer holds for the
/// process). `SDXL_INT8_KERNEL=vnni` keeps the VNNI kernel, to compare the two.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("SDXL_INT8_KERNEL").as_deref() != Ok("vnni") && request_tiles())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (0b11 << 24) != 0b11 << 24 || !super::vnni::available() {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it fails cleanly on kernels
    // without AMX support.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// `x · Wᵀ` from quantized activations, into `out` (`[rows, out_dim]`). Only where
/// [`available`].
pub(super) fn matmul_nt(packed: &Packed, activations: &Activations, out: &mut [f32]) {
    assert!(available(), "the AMX kernel called on a CPU without it");
    let rows = activations.scales.len();
    // Enough tasks for every thread, each at most 128 rows (their activations stay in L2).
    let per_thread = rows.div_ceil(2 * rayon::current_num_threads());
    let task_rows = (per_thread.div_ceil(ROW_ALIGN) * ROW_ALIGN).clamp(ROW_ALIGN, 4 * ROW_ALIGN);
    out.par_chunks_mut(task_rows * packed.out_dim).enumerate().for_each(|(task, out)| {
        let first = task * task_rows;
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (first, out);
        // SAFETY: `available()` holds (asserted above), the activations are padded to whole
        // 32-row blocks and the weights to whole panel pairs and 64-byte rows.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            run_task(packed, activations, first, out)
        };
    });
}

/// The tile configuration: all eight tiles 16 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn full() -> Self {
        let mut config = [0u8; 64];
        config[0] = 1; // palette 1
        for tile in 0..8 {
            config[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(TILE_BYTES as u16).to_le_bytes());
            config[48 + tile] = TILE_ROWS as u8;
        }
        Self(config)
    }
}

/// Four 16 × 16 tiles of sums, as stored from tmm0–3.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Sums([[i32; TILE_ROWS * PANEL]; 4]);

/// One task's rows (from `first`) against every panel, a chunk of panels at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_task(packed: &Packed, activations: &Activations, first: usize, out: &mut [f32]) {
    use std::arch::asm;
    let config = TileConfig::full();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    let out_dim = packed.out_dim;
    let rows = out.len() / out_dim;
    let groups_dim = packed.groups_dim;
    let panel_len = groups_dim * PANEL;
    let mut sums = Sums([[0; TILE_ROWS * PANEL]; 4]);
    let panels = packed.panels();
    for chunk in (0..panels).step_by(CHUNK_PANELS) {
        for block in (0..rows).step_by(ROW_ALIGN) {
            let a = activations.values.as_ptr().add((first + block) * groups_dim);
            for panel in (chunk..(chunk + CHUNK_PANELS).min(panels)).step_by(2) {
                let b = packed.weights.as_ptr().add(panel * panel_len);
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                for k in (0..groups_dim).step_by(TILE_BYTES) {
                    // Weights: 16 groups of 4 inputs per tile, 64 bytes apart.
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa} * 1]",
                        "tileloadd tmm5, [{a1} + {sa} * 1]",
                        "tileloadd tmm6, [{b0} + {sb} * 1]",
                        "tileloadd tmm7, [{b1} + {sb} * 1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tdpbusd tmm1, tmm4, tmm7",
                        "tdpbusd tmm2, tmm5, tmm6",
                        "tdpbusd tmm3, tmm5, tmm7",
                        a0 = in(reg) a.add(k),
                        a1 = in(reg) a.add(TILE_ROWS * groups_dim + k),
                        sa = in(reg) groups_dim,
                        b0 = in(reg) b.add(k * PANEL),
                        b1 = in(reg) b.add(panel_len + k * PANEL),
                        sb = in(reg) TILE_BYTES,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{s0} + {stride} * 1], tmm0",
                    "tilestored [{s1} + {stride} * 1], tmm1",
                    "tilestored [{s2} + {stride} * 1], tmm2",
                    "tilestored [{s3} + {stride} * 1], tmm3",
                    s0 = in(reg) sums.0[0].as_mut_ptr(),
                    s1 = in(reg) sums.0[1].as_mut_ptr(),
                    s2 = in(reg) sums.0[2].as_mut_ptr(),
                    s3 = in(reg) sums.0[3].as_mut_ptr(),
                    stride = in(reg) PANEL * 4,
                    options(nostack),
                );
                for row in 0..(rows - block).min(ROW_ALIGN) {
                    let (strip, lane) = (row / TILE_ROWS, row % TILE_ROWS);
                    for pair in 0..2 {
                        let channel = (panel + pair) * PANEL;
                        let tile = &sums.0[2 * strip + pair][lane * PANEL..];
                        store_sums(
                            std::arch::x86_64::_mm512_loadu_si512(tile.as_ptr() as *const _),
                            packed.offsets.as_ptr().add(channel),
                            packed.scales.as_ptr().add(channel),
                            activations.scales[first + block + row],
                            out.as_mut_ptr().wrapping_add((block + row) * out_dim + channel),
                            out_dim.saturating_sub(channel),
                        );
                    }
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}
