//! Every published checkpoint format against diffusers: the tiny model as a single-file SGM
//! checkpoint (`--model FILE --config DIR`), with LoRA files fused (`--lora FILE:SCALE`), and
//! with its VAE or UNet taken from another file. Goldens: tools/parity/make_checkpoint_fixtures.py.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::png_difference;
use serde::Deserialize;

/// The parity bound per 8-bit channel: worst and mean absolute difference.
const MAX_ABS: u8 = 3;
const MEAN_ABS: f64 = 0.1;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures")
}

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/checkpoints").join(name)
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    seed: u64,
    noise_from: String,
    noise: String,
    png: String,
    #[serde(default)]
    loras: Vec<(String, f64)>,
}

fn cases(file: &str) -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(golden(file)).expect("read cases")).expect("parse cases")
}

fn sdxl(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdxl")).args(args).output().expect("run sdxl")
}

/// `sdxl generate` arguments for `case` (noise from its file in `goldens`, or its seed for
/// generator cases).
fn case_args(case: &Case, goldens: &Path, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--prompt".into(),
        case.prompt.clone(),
        "--width".into(),
        case.width.to_string(),
        "--height".into(),
        case.height.to_string(),
        "--steps".into(),
        case.steps.to_string(),
        "--guidance".into(),
        case.guidance.to_string(),
        "--output".into(),
        out.to_str().unwrap().into(),
    ];
    if let Some(negative) = &case.negative_prompt {
        args.extend(["--negative-prompt".into(), negative.clone()]);
    }
    if case.noise_from == "generator" {
        args.extend(["--seed".into(), case.seed.to_string()]);
    } else {
        args.extend(["--noise".into(), goldens.join(&case.noise).to_str().unwrap().into()]);
    }
    args
}

fn run(mut args: Vec<String>, extra: &[String]) -> Vec<u8> {
    args.extend(extra.iter().cloned());
    let output = sdxl(&args);
    assert!(output.status.success(), "sdxl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    let out = args[args.iter().position(|a| a == "--output").unwrap() + 1].clone();
    std::fs::read(out).expect("read output png")
}

fn assert_parity(png: &[u8], golden_png: &Path, what: &str) {
    let (max, mean) = png_difference(png, golden_png);
    assert!(
        max <= MAX_ABS && mean <= MEAN_ABS,
        "{what}: max {max} mean {mean:.4} exceeds max {MAX_ABS} mean {MEAN_ABS}"
    );
}

fn path(p: PathBuf) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn a_single_file_checkpoint_matches_diffusers_from_single_file() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases("sgm_cases.json") {
        let model = ["--model".into(), path(fixtures().join("checkpoints/tiny-sdxl-sgm.safetensors"))];
        let config = ["--config".into(), path(fixtures().join("tiny-sdxl"))];
        let png = run(case_args(&case, &golden(""), &dir.path().join("out.png")), &[model, config].concat());
        assert_parity(&png, &golden(&case.png), &case.name);
    }
}

#[test]
fn fused_loras_match_diffusers_fuse_lora() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases("lora_cases.json") {
        assert!(!case.loras.is_empty(), "{}: no LoRA", case.name);
        let mut extra = vec!["--model".into(), path(fixtures().join("tiny-sdxl"))];
        for (file, scale) in &case.loras {
            extra.extend(["--lora".into(), format!("{}:{scale}", path(fixtures().join("lora").join(file)))]);
        }
        let png = run(case_args(&case, &golden(""), &dir.path().join("out.png")), &extra);
        assert_parity(&png, &golden(&case.png), &case.name);
    }
}

/// The first tiny-sdxl txt2img case, the replacement tests' starting point: its arguments
/// (writing to `out`) and its golden PNG.
fn base_case(out: &Path) -> (Vec<String>, PathBuf) {
    let goldens = fixtures().join("golden/tiny-sdxl");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(goldens.join("cases.json")).unwrap()).unwrap();
    let case = cases.into_iter().find(|c| c.noise_from == "latents").unwrap();
    (case_args(&case, &goldens, out), goldens.join(&case.png))
}

#[test]
fn a_vae_folder_or_file_replaces_the_models_vae() {
    let dir = tempfile::tempdir().unwrap();
    let (args, golden_png) = base_case(&dir.path().join("out.png"));
    let model = ["--model".to_string(), path(fixtures().join("tiny-sdxl"))];
    for vae in [fixtures().join("tiny-sdxl/vae"), fixtures().join("tiny-sdxl/vae/diffusion_pytorch_model.safetensors")]
    {
        let extra = [model.to_vec(), vec!["--vae".into(), path(vae.clone())]].concat();
        let png = run(args.clone(), &extra);
        assert_parity(&png, &golden_png, &format!("--vae {}", vae.display()));
    }
}

/// A single file lends its UNet or VAE (original keys under their prefixes) to a directory.
/// Its weights are the directory's rounded to f16, so the image stays close, not equal.
#[test]
fn a_single_file_lends_its_unet_or_vae() {
    let dir = tempfile::tempdir().unwrap();
    let (args, golden_png) = base_case(&dir.path().join("out.png"));
    let single = path(fixtures().join("checkpoints/tiny-sdxl-sgm.safetensors"));
    for flag in ["--unet", "--vae"] {
        let extra = ["--model".into(), path(fixtures().join("tiny-sdxl")), flag.into(), single.clone()];
        let png = run(args.clone(), &extra);
        let (_, mean) = png_difference(&png, &golden_png);
        assert!(mean <= 1.0, "{flag} from a single file: mean difference {mean:.3} from the f32 model");
    }
}

fn stderr_of(args: &[String]) -> String {
    let output = sdxl(args);
    assert!(!output.status.success(), "sdxl {args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn wrong_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base_case(&dir.path().join("out.png"));
    let args = |extra: &[String]| [base.clone(), extra.to_vec()].concat();

    // a UNet-only diffusers file is not a single-file checkpoint
    let unet = path(fixtures().join("tiny-sdxl/unet/diffusion_pytorch_model.safetensors"));
    let err = stderr_of(&args(&["--model".into(), unet]));
    assert!(err.contains("not a single-file SDXL checkpoint") && err.contains("--unet"), "{err}");

    // the tiny single file read with SDXL base's built-in description: shapes differ
    let single = path(fixtures().join("checkpoints/tiny-sdxl-sgm.safetensors"));
    let err = stderr_of(&args(&["--model".into(), single]));
    assert!(err.contains("has shape"), "{err}");

    // a LoRA with an update for a layer the model does not have
    let lora = dir.path().join("stray.safetensors");
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        [("lora_unet_no_such_layer.lora_down.weight", [1usize, 8]), ("lora_unet_no_such_layer.lora_up.weight", [8, 1])]
            .into_iter()
            .map(|(k, shape)| {
                (
                    k.to_string(),
                    candle_core::Tensor::zeros(&shape, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                )
            })
            .collect();
    candle_core::safetensors::save(&tensors, &lora).unwrap();
    let err = stderr_of(&args(&["--model".into(), path(fixtures().join("tiny-sdxl")), "--lora".into(), path(lora)]));
    assert!(err.contains("lora_unet_no_such_layer") && err.contains("targets no weight"), "{err}");
}

#[test]
fn inspect_loads_a_single_file_and_names_the_unused_extras() {
    let single = path(fixtures().join("checkpoints/tiny-sdxl-sgm.safetensors"));
    let config = path(fixtures().join("tiny-sdxl"));
    let output = sdxl(&["inspect".into(), single.clone(), "--config".into(), config]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("tiny-sdxl-sgm.safetensors: SingleFile layout"), "{stdout}");
    for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        assert!(stdout.contains(&format!("  {component}: ")), "{stdout}");
    }
    assert!(stdout.contains("position_ids") && stdout.contains("logit_scale"), "{stdout}");
    assert!(stdout.contains("loads; every tensor of every component is used"), "{stdout}");
}
