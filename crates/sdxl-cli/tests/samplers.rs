//! End-to-end: `sdxl generate --sampler NAME --schedule NAME --seed N` on the tiny model
//! against the PNGs diffusers made with that scheduler class and a seeded CPU generator
//! (tools/parity/make_sampler_fixtures.py), stochastic samplers' per-step noise included.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::png_difference;
use serde::Deserialize;

/// The parity bound per 8-bit channel: worst and mean absolute difference.
const MAX_ABS: u8 = 3;
const MEAN_ABS: f64 = 0.1;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/golden/samplers")
}

#[derive(Deserialize)]
struct Case {
    name: String,
    sampler: String,
    schedule: String,
    prompt: String,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    seed: u64,
    png: String,
    /// The tiny model's directory under the fixtures.
    model: String,
    strength: f64,
    /// img2img and inpainting: the input image and mask beside the goldens.
    image: Option<String>,
    mask: Option<String>,
}

fn generate(case: &Case, out: &std::path::Path) -> Vec<u8> {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures").join(&case.model);
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdxl"));
    command.args(["generate", "--model", model.to_str().unwrap(), "--prompt", &case.prompt]);
    if let Some(image) = &case.image {
        command.arg("--image").arg(golden().join(image)).args(["--strength", &case.strength.to_string()]);
    }
    if let Some(mask) = &case.mask {
        command.arg("--mask").arg(golden().join(mask));
    }
    let output = command
        .args(["--width", &case.width.to_string(), "--height", &case.height.to_string()])
        .args(["--steps", &case.steps.to_string(), "--guidance", &case.guidance.to_string()])
        .args(["--seed", &case.seed.to_string(), "--sampler", &case.sampler, "--schedule", &case.schedule])
        .args(["--output", out.to_str().unwrap()])
        .output()
        .expect("run sdxl");
    assert!(output.status.success(), "{}: sdxl failed: {}", case.name, String::from_utf8_lossy(&output.stderr));
    std::fs::read(out).expect("read output png")
}

#[test]
fn every_sampler_and_schedule_reproduces_diffusers_pixels() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("cases.json")).unwrap()).unwrap();
    for sampler in ["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "unipc", "lcm"] {
        for mode in [None, Some("input"), Some("mask")] {
            let covered = cases.iter().any(|c| {
                c.sampler == sampler
                    && match mode {
                        None => c.image.is_none(),
                        Some("input") => c.image.is_some() && c.mask.is_none(),
                        _ => c.mask.is_some(),
                    }
            });
            assert!(covered, "{sampler} ({mode:?}) has a case");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let png = generate(case, &dir.path().join(format!("{}.png", case.name)));
            let (max, mean) = png_difference(&png, &golden().join(&case.png));
            (max > MAX_ABS || mean > MEAN_ABS).then(|| format!("{}: max {max} mean {mean:.4}", case.name))
        })
        .collect();
    assert!(failed.is_empty(), "over max {MAX_ABS} / mean {MEAN_ABS}:\n{}", failed.join("\n"));
}

#[test]
fn an_unknown_sampler_or_schedule_is_refused_with_the_valid_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/tiny-sdxl");
    for (flag, value, valid) in
        [("--sampler", "dpm", "euler, euler_a, heun"), ("--schedule", "exponential", "model, karras, leading")]
    {
        let output = Command::new(env!("CARGO_BIN_EXE_sdxl"))
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", flag, value])
            .args(["--output", dir.path().join("x.png").to_str().unwrap()])
            .output()
            .expect("run sdxl");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flag} {value} accepted");
        assert!(stderr.contains(valid) && stderr.contains(value), "{flag} {value}: {stderr}");
    }
}
