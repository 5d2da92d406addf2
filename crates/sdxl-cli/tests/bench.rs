//! `sdxl bench` end to end on the tiny architecture (`--config`): every component is timed,
//! counted and reported as one JSON object per line.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn every_component_is_reported_as_json() {
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/tiny-sdxl");
    let output = Command::new(env!("CARGO_BIN_EXE_sdxl"))
        .args(["bench", "--config", tiny.to_str().unwrap(), "--resolution", "64", "--runs", "1", "--json"])
        .output()
        .expect("run sdxl bench");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let components: Vec<&str> = lines.iter().map(|m| m["component"].as_str().unwrap()).collect();
    assert_eq!(components, ["text_encoders", "unet_step", "unet_step_cfg", "vae_decode", "vae_encode", "image_4step"]);
    for m in &lines {
        assert!(m["median_s"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["gflops"].as_f64().unwrap() > 0.0, "no FLOPs counted: {m}");
        assert!(m["peak_rss_mb"].as_f64().unwrap() > 0.0, "{m}");
        assert_eq!(m["device"], "cpu", "{m}");
        let expected_resolution = if m["component"] == "text_encoders" { None } else { Some(64) };
        assert_eq!(m["resolution"].as_u64(), expected_resolution, "{m}");
    }

    let bad = Command::new(env!("CARGO_BIN_EXE_sdxl"))
        .args(["bench", "--config", tiny.to_str().unwrap(), "--resolution", "60", "--component", "vae_decode"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("multiple of 8"));
}

#[test]
fn a_gpu_asked_of_a_cpu_build_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return; // this build has CUDA support: whether a GPU answers depends on the machine
    }
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/tiny-sdxl");
    for device in ["cuda", "cuda:1"] {
        let output = Command::new(env!("CARGO_BIN_EXE_sdxl"))
            .args(["bench", "--config", tiny.to_str().unwrap(), "--resolution", "64", "--device", device])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("built without CUDA support") && stderr.contains("--device cuda:"), "{stderr}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_sdxl")).args(["bench", "--device", "gpu"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected auto, cpu, cuda or cuda:N, got `gpu`"));
}
