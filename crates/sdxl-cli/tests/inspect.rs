//! `sdxl inspect` on a sound model, a single file, and a model whose VAE is incomplete.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::copy_dir;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures").join(path)
}

fn inspect(path: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sdxl")).args(["inspect", path.to_str().unwrap()]).output().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).to_string())
}

#[test]
fn a_sound_model_reports_every_component_loading() {
    let (ok, out) = inspect(&fixture("tiny-2level-fp16"));
    assert!(ok, "{out}");
    for component in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        assert!(out.contains(&format!("  {component}: loads; every tensor is used")), "{out}");
    }
    assert!(out.contains("f16"), "{out}");
}

#[test]
fn a_single_file_is_summarised() {
    let (ok, out) = inspect(&fixture("tiny-sdxl/vae/diffusion_pytorch_model.safetensors"));
    assert!(ok);
    assert!(out.starts_with("diffusion_pytorch_model.safetensors: Diffusers layout"), "{out}");
    assert!(out.contains("f32") && out.contains("parameters"), "{out}");
}

#[test]
fn a_broken_component_is_named_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-sdxl"), dir.path());
    // the UNet weights in the VAE folder: every VAE tensor is missing
    std::fs::copy(
        fixture("tiny-sdxl/unet/diffusion_pytorch_model.safetensors"),
        dir.path().join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let (ok, out) = inspect(dir.path());
    assert!(!ok);
    assert!(out.contains("  vae: does not load:") && out.contains("missing tensor"), "{out}");
    assert!(out.contains("  unet: loads; every tensor is used"), "{out}");
}

#[test]
fn a_generated_png_carries_its_parameters_and_inspect_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let model = fixture("tiny-sdxl");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a cat in a hat",
        "--negative-prompt",
        "blurry",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "2",
        "--guidance",
        "3.5",
        "--seed",
        "7",
        "--output",
        out.to_str().unwrap(),
    ];
    let generated = Command::new(env!("CARGO_BIN_EXE_sdxl")).args(args).output().unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    let (ok, text) = inspect(&out);
    assert!(ok, "{text}");
    assert_eq!(
        text.trim_end(),
        "a cat in a hat\nNegative prompt: blurry\n\
         Steps: 2, Sampler: Euler, CFG scale: 3.5, Seed: 7, Size: 64x48, Model: tiny-sdxl"
    );
}

#[test]
fn a_png_without_parameters_fails_to_inspect() {
    let (ok, _) = inspect(&fixture("golden/tiny-sdxl/edit_mask_64x64.png"));
    assert!(!ok);
}
