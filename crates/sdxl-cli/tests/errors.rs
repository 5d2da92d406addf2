//! `sdxl generate` on broken inputs: one line naming the cause, a non-zero exit, no panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::copy_dir;

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/tiny-sdxl")
}

/// Copies the tiny model into a temporary directory that a test may damage.
fn scratch_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture_model(), dir.path());
    dir
}

/// Runs `sdxl generate` on `model`; `overrides` replace the default value of a flag.
/// Returns the stderr of the (required) failed run.
fn fails(model: &Path, overrides: &[(&str, &str)]) -> String {
    let out = tempfile::tempdir().expect("tempdir");
    let output_png = out.path().join("out.png");
    let mut flags =
        vec![("--prompt", "a cat"), ("--width", "16"), ("--height", "16"), ("--steps", "1"), ("--seed", "1")];
    for &(flag, value) in overrides {
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some(entry) => entry.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--output", output_png.to_str().unwrap()];
    args.extend(flags.iter().flat_map(|&(f, v)| [f, v]));
    let output = Command::new(env!("CARGO_BIN_EXE_sdxl")).args(&args).output().expect("run sdxl");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "expected one line, got: {stderr}");
    assert!(!output_png.exists(), "no output on failure");
    stderr
}

/// Rewrites a safetensors file: the tensor `name` is dropped, then, if `replacement` is
/// given, stored anew with that shape and those values.
fn rewrite_tensor(file: &Path, name: &str, replacement: Option<(Vec<usize>, Vec<f32>)>) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = std::fs::read(file).expect("read weights");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("parse weights");
    let replacement_bytes: Option<(Vec<usize>, Vec<u8>)> =
        replacement.map(|(shape, values)| (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (key, view) in tensors.tensors() {
        if key != name {
            views.push((key, view));
        }
    }
    if let Some((shape, data)) = &replacement_bytes {
        views.push((name.to_string(), TensorView::new(Dtype::F32, shape.clone(), data).expect("view")));
    }
    let serialized = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(file, serialized).expect("write weights");
}

#[test]
fn missing_component_folder() {
    let model = scratch_model();
    std::fs::remove_dir_all(model.path().join("vae")).unwrap();
    let err = fails(model.path(), &[]);
    assert!(err.contains("missing component folder `vae/`"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let model = scratch_model();
    let key = "add_embedding.linear_1.weight";
    rewrite_tensor(&model.path().join("unet/diffusion_pytorch_model.safetensors"), key, None);
    let err = fails(model.path(), &[]);
    assert!(err.contains(&format!("missing tensor `{key}`")), "{err}");
}

#[test]
fn misshapen_tensor_is_named() {
    let model = scratch_model();
    let key = "conv_in.bias";
    rewrite_tensor(&model.path().join("unet/diffusion_pytorch_model.safetensors"), key, Some((vec![3], vec![0.0; 3])));
    let err = fails(model.path(), &[]);
    assert!(err.contains(&format!("tensor `{key}` has shape [3]")), "{err}");
}

#[test]
fn unexpected_tensor_is_named() {
    let model = scratch_model();
    let key = "mystery.weight";
    rewrite_tensor(
        &model.path().join("unet/diffusion_pytorch_model.safetensors"),
        key,
        Some((vec![2], vec![1.0, 2.0])),
    );
    let err = fails(model.path(), &[]);
    assert!(err.contains(&format!("unexpected tensor `{key}`")), "{err}");
}

#[test]
fn unreadable_config_is_named() {
    let model = scratch_model();
    std::fs::write(model.path().join("unet/config.json"), "{ not json").unwrap();
    let err = fails(model.path(), &[]);
    assert!(err.contains("unet/config.json"), "{err}");
}

#[test]
fn out_of_range_arguments_name_the_bound() {
    let model = fixture_model();
    let err = fails(&model, &[("--width", "5000")]);
    assert!(err.contains("`width` must be between 8 and 4096, got 5000"), "{err}");
    let err = fails(&model, &[("--steps", "101")]);
    assert!(err.contains("`steps` must be between 1 and 100, got 101"), "{err}");
    let err = fails(&model, &[("--guidance", "nan")]);
    assert!(err.contains("`guidance` must be between 0 and 30"), "{err}");
    let err = fails(&model, &[("--guidance", "-1")]);
    assert!(err.contains("`guidance` must be between 0 and 30, got -1"), "{err}");
    let err = fails(&model, &[("--width", "wide")]);
    assert!(err.contains("invalid value 'wide' for '--width <WIDTH>'"), "{err}");
}

#[test]
fn noise_of_the_wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.safetensors");
    let data: Vec<u8> = vec![0u8; 4 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![1, 4, 1, 1], &data).unwrap();
    std::fs::write(&noise, safetensors::serialize([("noise", view)], None).unwrap()).unwrap();
    let model = fixture_model();
    let out = dir.path().join("o.png");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "16",
        "--height",
        "16",
        "--steps",
        "1",
        "--noise",
        noise.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let output = Command::new(env!("CARGO_BIN_EXE_sdxl")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("tensor `noise` has shape [1, 4, 1, 1], expected [1, 4, 2, 2]"), "{stderr}");
}

#[test]
fn bf16_on_the_cpu_is_refused() {
    let err = fails(&fixture_model(), &[("--dtype", "bf16"), ("--device", "cpu")]);
    assert!(err.contains("dtype bf16 is not supported on the CPU"), "{err}");
}

#[test]
fn a_gpu_asked_of_a_cpu_build_is_refused() {
    if cfg!(feature = "cuda") {
        return; // this build has CUDA support: whether a GPU answers depends on the machine
    }
    let err = fails(&fixture_model(), &[("--device", "cuda:0")]);
    assert!(err.contains("`--device cuda:0`: this sdxl was built without CUDA support"), "{err}");
}

/// A PNG header declaring `side × side` RGB pixels, with no pixel data behind it.
fn bomb_png(side: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(13u32.to_be_bytes());
    bytes.extend(&ihdr);
    bytes.extend(crc32(&ihdr).to_be_bytes());
    bytes
}

#[test]
fn input_image_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, "these are not pixels").unwrap();
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, bomb_png(100_000)).unwrap();
    let real = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../sdxl-models/tests/fixtures/golden/tiny-sdxl/edit_input_64x64.png");
    let (not_an_image, bomb, real) = (not_an_image.to_str().unwrap(), bomb.to_str().unwrap(), real.to_str().unwrap());

    let err = fails(&model, &[("--image", not_an_image)]);
    assert!(err.contains("`image` is not a PNG, JPEG or WebP image"), "{err}");
    let err = fails(&model, &[("--image", bomb)]);
    assert!(err.contains("`image` is larger than 8192x8192 pixels"), "{err}");
    let err = fails(&model, &[("--image", real), ("--mask", bomb)]);
    assert!(err.contains("`mask` is larger than 8192x8192 pixels"), "{err}");
    let err = fails(&model, &[("--mask", real)]);
    assert!(err.contains("`mask` requires `image`"), "{err}");
    let err = fails(&model, &[("--image", real), ("--steps", "4"), ("--strength", "0.2")]);
    assert!(err.contains("`strength` × `steps` must be at least 1 (int(4 × 0.2) = 0)"), "{err}");
    let err = fails(&model, &[("--image", real), ("--strength", "-0.5")]);
    assert!(err.contains("`strength` must be between 0 and 1"), "{err}");
}
