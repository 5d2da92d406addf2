//! `sdxl serve` as a process: configuration from SDXL_* variables, the start-up line, a
//! generation equal to `sdxl generate`'s (with the sampler fields too), auth, and a clean
//! exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures/tiny-sdxl")
}

/// The server process, killed when dropped, so a failed assertion leaves no server running.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the server on a free port; returns the process and its base URL from the start-up line.
fn start_server() -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdxl"))
        .args(["serve", "--port", "0"])
        .env("SDXL_MODEL", fixture_model())
        .env("SDXL_API_KEYS", "first-key,second-key")
        .env("SDXL_QUEUE_CAPACITY", "2")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sdxl serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().expect("server exited before listening").expect("read stderr");
        if let Some(rest) = line.split("sdxl listening on ").nth(1) {
            assert!(line.contains("auth=\"on\"") || line.contains("auth=on"), "{line}");
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    // keep draining stderr so the server never blocks on a full pipe
    std::thread::spawn(move || for _ in lines {});
    (Server(child), url)
}

/// `sdxl generate` of the served request (256², 2 steps, guidance 0, seed 11) with `extra` flags.
fn cli_png(out: &std::path::Path, extra: &[&str]) -> Vec<u8> {
    let status = Command::new(env!("CARGO_BIN_EXE_sdxl"))
        .args(["generate", "--model", fixture_model().to_str().unwrap(), "--prompt", "a cat"])
        .args(["--width", "256", "--height", "256", "--steps", "2", "--guidance", "0", "--seed", "11"])
        .args(extra)
        .args(["--output", out.to_str().unwrap()])
        .status()
        .expect("sdxl generate");
    assert!(status.success());
    std::fs::read(out).unwrap()
}

#[test]
fn serves_generates_and_stops_on_sigterm() {
    let (mut server, base) = start_server();
    let child = &mut server.0;
    let client = reqwest::blocking::Client::new();
    let run = format!("{base}/client/v4/accounts/abc/ai/run/@cf/bytedance/stable-diffusion-xl-lightning");
    let body =
        serde_json::json!({"prompt": "a cat", "width": 256, "height": 256, "num_steps": 2, "guidance": 0, "seed": 11});

    let refused = client.post(&run).json(&body).send().expect("request");
    assert_eq!(refused.status().as_u16(), 401);
    let response = client.post(&run).bearer_auth("second-key").json(&body).send().expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let served = response.bytes().expect("body");

    let dir = tempfile::tempdir().unwrap();
    let cli = cli_png(&dir.path().join("cli.png"), &[]);
    assert_eq!(served.as_ref(), cli.as_slice(), "server and CLI differ for the same seed");

    // the sampler and schedule fields: the same bytes as --sampler/--schedule
    for (sampler, schedule) in [("dpmpp_2m_sde", "karras"), ("unipc", "trailing"), ("lcm", "model")] {
        let body = serde_json::json!({"prompt": "a cat", "width": 256, "height": 256, "num_steps": 2,
            "guidance": 0, "seed": 11, "sampler": sampler, "schedule": schedule});
        let response = client.post(&run).bearer_auth("second-key").json(&body).send().expect("request");
        assert_eq!(response.status().as_u16(), 200, "{sampler} {schedule}");
        let served = response.bytes().expect("body");
        let out = dir.path().join(format!("{sampler}.png"));
        let cli = cli_png(&out, &["--sampler", sampler, "--schedule", schedule]);
        assert_eq!(served.as_ref(), cli.as_slice(), "server and CLI differ with {sampler} / {schedule}");
        assert_ne!(cli, cli_png(&dir.path().join("euler.png"), &[]), "{sampler} / {schedule} is not Euler's image");
    }
    for (fields, named) in [
        (serde_json::json!({"sampler": "dpm_fast"}), "euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddim, unipc, lcm"),
        (serde_json::json!({"sampler": "ddim", "schedule": "karras"}), "DDIMScheduler"),
    ] {
        let mut body = serde_json::json!({"prompt": "a cat", "num_steps": 2});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let response = client.post(&run).bearer_auth("second-key").json(&body).send().expect("request");
        assert_eq!(response.status().as_u16(), 400, "{body}");
        let text = response.text().unwrap();
        assert!(text.contains(named), "{body}: {text}");
    }

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");
}
