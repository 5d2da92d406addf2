//! What `sdxl serve` fills in for a request that leaves out `num_steps`, `guidance` or the
//! timeout: values that suit the model loaded and the device it runs on (docs/decisions.md,
//! "Defaults follow the model").

use std::path::Path;
use std::time::Duration;

/// Workers AI's defaults, for a model that is not a few-step distillation.
pub const WORKERS_AI_STEPS: usize = 20;
pub const WORKERS_AI_GUIDANCE: f64 = 7.5;

/// Seconds one denoising step of a 1024² image takes on a 2-core CPU (measured: 4 steps of
/// the full UNet plus the VAE in about 220 s), and the text encoders plus the VAE decode.
const CPU_STEP_SECONDS: u64 = 50;
const CPU_FIXED_SECONDS: u64 = 20;
/// On a GPU a 1024² image takes seconds; the Workers AI timeout is ample.
const GPU_REQUEST_TIMEOUT: u64 = 300;

/// The steps of a Lightning N-step distillation named in `name` (ByteDance's file names:
/// `sdxl_lightning_4step_unet`, `sdxl_lightning_1step_unet_x0`, `sdxl_lightning_8step_lora`,
/// and spellings such as `SDXL-Lightning-4-step`), case-insensitive.
pub fn lightning_steps(name: &str) -> Option<usize> {
    let name = name.to_ascii_lowercase();
    let (_, after) = name.split_once("lightning")?;
    let after = after.trim_start_matches(['_', '-', ' ', '.']);
    let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let steps: usize = after[..digits].parse().ok()?;
    after[digits..].trim_start_matches(['_', '-', ' ']).starts_with("step").then_some(steps)
}

/// The Lightning step count of the first of `files` (the UNet or checkpoint, then the LoRAs)
/// whose name names one.
pub fn lightning_steps_of<'a>(files: impl IntoIterator<Item = &'a Path>) -> Option<usize> {
    files.into_iter().filter_map(|path| path.file_name()).find_map(|name| lightning_steps(&name.to_string_lossy()))
}

/// The steps and guidance a request gets when it gives none: the operator's flags, else N
/// steps at guidance 0 for a Lightning N-step model (it is distilled without guidance, and
/// burns at CFG 7.5), else Workers AI's 20 steps at 7.5.
pub fn steps_and_guidance(flags: (Option<usize>, Option<f64>), lightning: Option<usize>) -> (usize, f64) {
    let (steps, guidance) = match lightning {
        Some(n) => (n, 0.0),
        None => (WORKERS_AI_STEPS, WORKERS_AI_GUIDANCE),
    };
    (flags.0.unwrap_or(steps), flags.1.unwrap_or(guidance))
}

/// The default `--request-timeout`: on a GPU 300 s; on the CPU twice what a default request
/// takes at 1024² on a 2-core machine, so the request behind a running one finishes too.
pub fn request_timeout(default_steps: usize, on_gpu: bool) -> Duration {
    let seconds =
        if on_gpu { GPU_REQUEST_TIMEOUT } else { 2 * (CPU_STEP_SECONDS * default_steps as u64 + CPU_FIXED_SECONDS) };
    Duration::from_secs(seconds.max(GPU_REQUEST_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytedance_names_give_their_steps() {
        for (name, steps) in [
            ("sdxl_lightning_4step_unet.safetensors", Some(4)),
            ("sdxl_lightning_1step_unet_x0.safetensors", Some(1)),
            ("sdxl_lightning_8step_lora.safetensors", Some(8)),
            ("sdxl_lightning_2step.safetensors", Some(2)),
            ("SDXL-Lightning-4-step", Some(4)),
            ("sdxl_lightning_unet.safetensors", None),
            ("lightning", None),
            ("sd_xl_base_1.0.safetensors", None),
            ("tiny-sdxl", None),
            ("lightning_4steps_x", Some(4)),
            ("lightning_99999999999999999999999step", None),
        ] {
            assert_eq!(lightning_steps(name), steps, "{name}");
        }
    }

    #[test]
    fn the_first_named_file_counts() {
        let files = [Path::new("/m/sd_xl_base_1.0.safetensors"), Path::new("/l/sdxl_lightning_8step_lora.safetensors")];
        assert_eq!(lightning_steps_of(files), Some(8));
        assert_eq!(lightning_steps_of([Path::new("/m/tiny-sdxl")]), None);
    }

    #[test]
    fn flags_win_over_the_model() {
        assert_eq!(steps_and_guidance((None, None), Some(4)), (4, 0.0));
        assert_eq!(steps_and_guidance((None, None), None), (20, 7.5));
        assert_eq!(steps_and_guidance((Some(6), None), Some(4)), (6, 0.0));
        assert_eq!(steps_and_guidance((None, Some(1.5)), Some(4)), (4, 1.5));
    }

    #[test]
    fn a_default_request_fits_in_the_default_timeout() {
        // 4 steps on the CPU: 220 s for the image, twice that for the one behind it
        assert_eq!(request_timeout(4, false), Duration::from_secs(440));
        assert_eq!(request_timeout(20, false), Duration::from_secs(2040));
        assert_eq!(request_timeout(1, false), Duration::from_secs(300));
        assert_eq!(request_timeout(20, true), Duration::from_secs(300));
    }
}
