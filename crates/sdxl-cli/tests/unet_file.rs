//! `--unet FILE`: a separately distributed UNet (as ByteDance ships SDXL-Lightning's) replaces
//! the model directory's UNet weights.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::copy_dir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures")
}

fn generate(model: &std::path::Path, unet: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sdxl"))
        .args(["generate", "--model", model.to_str().unwrap(), "--unet", unet.to_str().unwrap()])
        .args(["--prompt", "a photo of a cat wearing a tiny hat", "--width", "64", "--height", "64", "--steps", "4"])
        .args(["--noise", fixtures().join("golden/tiny-sdxl/g0_64x64_4steps.noise.safetensors").to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .output()
        .expect("run sdxl")
}

#[test]
fn a_unet_file_replaces_the_directory_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&fixtures().join("tiny-sdxl"), &model);
    // the directory keeps only unet/config.json; the weights live elsewhere
    let unet = dir.path().join("lightning_unet.safetensors");
    std::fs::rename(model.join("unet/diffusion_pytorch_model.safetensors"), &unet).unwrap();
    let out = dir.path().join("out.png");
    let output = generate(&model, &unet, &out);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours = image::open(&out).unwrap().to_rgb8();
    let golden = image::open(fixtures().join("golden/tiny-sdxl/g0_64x64_4steps.png")).unwrap().to_rgb8();
    let max = ours.as_raw().iter().zip(golden.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 3, "max difference {max}");
}

#[test]
fn a_unet_file_of_another_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = fixtures().join("tiny-2level-fp16/unet/diffusion_pytorch_model.fp16.safetensors");
    let output = generate(&fixtures().join("tiny-sdxl"), &other, &dir.path().join("out.png"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tensor `") || stderr.contains("missing tensor"), "{stderr}");
}

#[test]
fn a_prediction_type_override_changes_the_image_and_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let model = fixtures().join("tiny-sdxl");
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let run = |prediction: &str| {
        Command::new(env!("CARGO_BIN_EXE_sdxl"))
            .args(["generate", "--model", model.to_str().unwrap(), "--unet", unet.to_str().unwrap()])
            .args(["--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1"])
            .args(["--prediction-type", prediction, "--output", out.to_str().unwrap()])
            .output()
            .expect("run sdxl")
    };
    assert!(run("epsilon").status.success());
    let epsilon = std::fs::read(&out).unwrap();
    assert!(run("sample").status.success());
    assert_ne!(std::fs::read(&out).unwrap(), epsilon);
    let bad = run("velocity");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unsupported `prediction_type`"));
}
