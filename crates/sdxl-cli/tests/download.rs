//! `sdxl download` (and `sdxl serve` without `--model`) against a local stand-in for the
//! Hugging Face Hub that answers as the Hub does: small files straight from `/resolve/`, LFS
//! files by a redirect to a CDN, range requests, etags and the repository commit in headers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sha1::Sha1;
use sha2::{Digest, Sha256};

const BASE: &str = "stabilityai/stable-diffusion-xl-base-1.0";
const LIGHTNING: &str = "ByteDance/SDXL-Lightning";
const BASE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const LIGHTNING_COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// What `sdxl download` must fetch from the base repository (the UNet's weights excluded).
const BASE_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "unet/config.json",
];

const UNET_4: &str = "sdxl_lightning_4step_unet.safetensors";
const TINY: &str = "madebyollin/taesdxl";
const TINY_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const TINY_FILES: &[&str] = &["config.json", "diffusion_pytorch_model.safetensors"];
const UNET_1: &str = "sdxl_lightning_1step_unet_x0.safetensors";

/// One file the stand-in serves.
struct Served {
    body: Vec<u8>,
    /// What the Hub would send: SHA-256 for LFS files, the git blob SHA-1 otherwise.
    etag: String,
    lfs: bool,
    commit: &'static str,
}

/// A request the stand-in answered: path and `Range` header.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    range: Option<String>,
}

impl Hit {
    /// Whether file content (more than hf-hub's one-byte metadata probe) went out.
    fn is_body(&self) -> bool {
        self.range.as_deref() != Some("bytes=0-0")
            && (self.path.starts_with("/cdn/") || !self.path.ends_with(".safetensors"))
    }
}

struct HubState {
    files: HashMap<String, Served>,
    url: String,
    hits: Mutex<Vec<Hit>>,
}

/// The stand-in Hub, serving until dropped.
struct StandIn {
    state: Arc<HubState>,
    _runtime: tokio::runtime::Runtime,
}

impl StandIn {
    /// Serves both repositories; `corrupt` names a file (`org/repo/path`) whose content does
    /// not match its etag.
    fn start(corrupt: Option<&str>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut files = HashMap::new();
        let repos = [
            (BASE, BASE_COMMIT, BASE_FILES.to_vec()),
            (LIGHTNING, LIGHTNING_COMMIT, vec![UNET_1, UNET_4]),
            (TINY, TINY_COMMIT, TINY_FILES.to_vec()),
        ];
        for (repo, commit, names) in repos {
            for name in names {
                let key = format!("{repo}/{name}");
                let lfs = name.ends_with(".safetensors");
                let mut body = content(&key, lfs);
                let etag = if lfs { hex(&Sha256::digest(&body)) } else { git_sha1(&body) };
                if corrupt == Some(key.as_str()) {
                    body[7] ^= 1;
                }
                files.insert(key, Served { body, etag, lfs, commit });
            }
        }
        let state = Arc::new(HubState { files, url, hits: Mutex::default() });
        let app = axum::Router::new().fallback(answer).with_state(state.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self { state, _runtime: runtime }
    }

    fn url(&self) -> &str {
        &self.state.url
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    fn body(&self, repo: &str, file: &str) -> &[u8] {
        &self.state.files[&format!("{repo}/{file}")].body
    }

    fn etag(&self, repo: &str, file: &str) -> &str {
        &self.state.files[&format!("{repo}/{file}")].etag
    }
}

/// The Hub's `/{repo}/resolve/main/{file}` and its CDN's `/cdn/{repo}/{file}`.
async fn answer(State(state): State<Arc<HubState>>, uri: Uri, headers: HeaderMap) -> Response {
    let range = headers.get(header::RANGE).map(|v| v.to_str().unwrap().to_string());
    state.hits.lock().unwrap().push(Hit { path: uri.path().to_string(), range: range.clone() });
    let (key, via_cdn) = match uri.path().strip_prefix("/cdn/") {
        Some(key) => (key.to_string(), true),
        None => (uri.path().trim_start_matches('/').replacen("/resolve/main/", "/", 1), false),
    };
    let Some(file) = state.files.get(&key) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let commit = [("x-repo-commit", file.commit.to_string())];
    if file.lfs && !via_cdn {
        // As the Hub: a redirect to the CDN, the content's SHA-256 in X-Linked-Etag.
        let location = format!("{}/cdn/{key}", state.url);
        let etags = [("x-linked-etag", format!("\"{}\"", file.etag)), ("etag", "\"pointer-etag\"".to_string())];
        return (StatusCode::FOUND, [(header::LOCATION.as_str(), location)], etags, commit).into_response();
    }
    let total = file.body.len();
    let etag = [("etag", format!("\"{}\"", file.etag))];
    let Some(range) = range else {
        return (etag, commit, file.body.clone()).into_response();
    };
    let (start, end) = parse_range(&range, total);
    if start >= total {
        return (StatusCode::RANGE_NOT_SATISFIABLE, [("content-range", format!("bytes */{total}"))]).into_response();
    }
    let content_range = [("content-range", format!("bytes {start}-{end}/{total}"))];
    (StatusCode::PARTIAL_CONTENT, etag, commit, content_range, file.body[start..=end].to_vec()).into_response()
}

/// `bytes=A-` or `bytes=A-B`, as inclusive bounds clamped to the file.
fn parse_range(range: &str, total: usize) -> (usize, usize) {
    let (start, end) = range.strip_prefix("bytes=").expect("bytes range").split_once('-').expect("range");
    let end = end.parse().map_or(total.saturating_sub(1), |e: usize| e.min(total.saturating_sub(1)));
    (start.parse().expect("range start"), end)
}

/// Deterministic stand-in content: JSON-ish text for small files, bytes for weights.
fn content(key: &str, lfs: bool) -> Vec<u8> {
    if !lfs {
        return format!("{{\"stand_in_for\": \"{key}\"}}\n").into_bytes();
    }
    let mut x = key.bytes().fold(0x9e37_79b9_u32, |h, b| h.rotate_left(5) ^ u32::from(b));
    (0..100_000)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn git_sha1(body: &[u8]) -> String {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {}\0", body.len()).as_bytes());
    hasher.update(body);
    hex(&hasher.finalize())
}

/// `sdxl <args>` with HF_HOME and HF_ENDPOINT set and no other Hub or SDXL variable inherited.
fn sdxl(hf_home: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdxl"));
    command.args(args).env("HF_HOME", hf_home).env("HF_ENDPOINT", endpoint);
    for name in ["HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "SDXL_MODEL", "SDXL_LIGHTNING_STEPS", "SDXL_UNET"] {
        command.env_remove(name);
    }
    command
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("run sdxl");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

/// An address where nothing listens.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

fn repo_dir(hf_home: &Path, repo: &str) -> PathBuf {
    hf_home.join("hub").join(format!("models--{}", repo.replace('/', "--")))
}

#[test]
fn downloads_into_the_hub_cache_then_needs_no_hub() {
    let hub = StandIn::start(None);
    let home = tempfile::tempdir().unwrap();
    let (output, stdout, stderr) = run(&mut sdxl(home.path(), hub.url(), &["download"]));
    assert!(output.status.success(), "{stderr}");

    // The Hub cache layout, with the content served.
    for (repo, commit, files) in [(BASE, BASE_COMMIT, BASE_FILES), (LIGHTNING, LIGHTNING_COMMIT, &[UNET_4][..])] {
        let dir = repo_dir(home.path(), repo);
        assert_eq!(std::fs::read_to_string(dir.join("refs/main")).unwrap(), commit);
        for file in files {
            let path = dir.join("snapshots").join(commit).join(file);
            assert_eq!(std::fs::read(&path).unwrap(), hub.body(repo, file), "{repo}/{file}");
            let blob = std::fs::canonicalize(&path).unwrap();
            assert_eq!(blob, std::fs::canonicalize(dir.join("blobs").join(hub.etag(repo, file))).unwrap());
        }
    }
    assert!(!repo_dir(home.path(), BASE)
        .join("snapshots")
        .join(BASE_COMMIT)
        .join("unet/diffusion_pytorch_model.fp16.safetensors")
        .exists());
    let bodies = hub.hits().iter().filter(|h| h.is_body()).count();
    assert_eq!(bodies, BASE_FILES.len() + 1, "{:#?}", hub.hits());

    let snapshot = repo_dir(home.path(), BASE).join("snapshots").join(BASE_COMMIT);
    let unet = repo_dir(home.path(), LIGHTNING).join("snapshots").join(LIGHTNING_COMMIT).join(UNET_4);
    let flags = format!("--model {} --unet {}", snapshot.display(), unet.display());
    assert!(stdout.contains(&format!("sdxl serve {flags}")), "{stdout}");
    assert!(stdout.contains(&format!("sdxl generate {flags} --steps 4")), "{stdout}");

    // A full cache is used as it is: the Hub is not asked anything.
    let before = hub.hits().len();
    let (output, again, stderr) = run(&mut sdxl(home.path(), hub.url(), &["download"]));
    assert!(output.status.success(), "{stderr}");
    assert_eq!(again, stdout);
    assert_eq!(hub.hits().len(), before, "{:#?}", &hub.hits()[before..]);

    // Offline, the cache suffices even with no Hub at all.
    let (output, offline, stderr) = run(sdxl(home.path(), &dead_endpoint(), &["download"]).env("HF_HUB_OFFLINE", "1"));
    assert!(output.status.success(), "{stderr}");
    assert_eq!(offline, stdout);
}

#[test]
fn the_tiny_decoder_downloads_beside_the_model_and_its_flag_is_printed() {
    let hub = StandIn::start(None);
    let home = tempfile::tempdir().unwrap();
    let (output, stdout, stderr) = run(&mut sdxl(home.path(), hub.url(), &["download"]));
    assert!(output.status.success(), "{stderr}");
    assert!(!repo_dir(home.path(), TINY).exists(), "fetched without being asked for");
    assert!(!stdout.contains("--tiny-decoder"), "{stdout}");

    let (output, stdout, stderr) = run(&mut sdxl(home.path(), hub.url(), &["download", "--tiny-decoder"]));
    assert!(output.status.success(), "{stderr}");
    let snapshot = repo_dir(home.path(), TINY).join("snapshots").join(TINY_COMMIT);
    for file in TINY_FILES {
        assert_eq!(std::fs::read(snapshot.join(file)).unwrap(), hub.body(TINY, file), "{file}");
    }
    assert!(stdout.contains(&format!("--tiny-decoder {}", snapshot.display())), "{stdout}");
}

#[test]
fn an_interrupted_download_resumes_from_its_part_file() {
    let hub = StandIn::start(None);
    let home = tempfile::tempdir().unwrap();
    let body = hub.body(LIGHTNING, UNET_1);
    let half = body.len() / 2;
    let blobs = repo_dir(home.path(), LIGHTNING).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.part", hub.etag(LIGHTNING, UNET_1))), &body[..half]).unwrap();

    let (output, stdout, stderr) = run(&mut sdxl(home.path(), hub.url(), &["download", "--steps", "1"]));
    assert!(output.status.success(), "{stderr}");
    let unet = repo_dir(home.path(), LIGHTNING).join("snapshots").join(LIGHTNING_COMMIT).join(UNET_1);
    assert_eq!(std::fs::read(&unet).unwrap(), body);
    let cdn = format!("/cdn/{LIGHTNING}/{UNET_1}");
    let fetched: Vec<_> = hub.hits().into_iter().filter(|h| h.path == cdn && h.is_body()).collect();
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    assert_eq!(fetched[0].range.as_deref(), Some(format!("bytes={half}-").as_str()));
    assert!(stdout.contains("--steps 1"), "{stdout}");
}

#[test]
fn a_download_that_fails_its_checksum_is_deleted_and_named() {
    let bad = "text_encoder/model.fp16.safetensors";
    let hub = StandIn::start(Some(&format!("{BASE}/{bad}")));
    let home = tempfile::tempdir().unwrap();
    let (output, _, stderr) = run(&mut sdxl(home.path(), hub.url(), &["download"]));
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("{BASE}/{bad}")) && stderr.contains("checksum mismatch"), "{stderr}");
    let blobs = repo_dir(home.path(), BASE).join("blobs");
    assert!(!blobs.join(hub.etag(BASE, bad)).exists(), "the bad blob is deleted");
    assert!(!repo_dir(home.path(), BASE).join("snapshots").join(BASE_COMMIT).join(bad).exists());
}

#[test]
fn an_unreachable_hub_is_one_line_that_points_to_model() {
    let home = tempfile::tempdir().unwrap();
    let endpoint = dead_endpoint();
    let (output, _, stderr) = run(&mut sdxl(home.path(), &endpoint, &["download"]));
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the Hugging Face Hub at {endpoint}")), "{stderr}");
    assert!(stderr.contains("--model") && stderr.contains("HF_HUB_OFFLINE=1"), "{stderr}");
}

#[test]
fn offline_with_an_empty_cache_names_the_missing_file() {
    let home = tempfile::tempdir().unwrap();
    let (output, _, stderr) = run(sdxl(home.path(), &dead_endpoint(), &["download"]).env("HF_HUB_OFFLINE", "1"));
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("{BASE}/model_index.json: not in the Hugging Face cache")), "{stderr}");
}

#[test]
fn serve_without_model_takes_it_from_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let mut command = sdxl(home.path(), &dead_endpoint(), &["serve", "--port", "0"]);
    let (output, _, stderr) = run(command.env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "off"));
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("{BASE}/model_index.json: not in the Hugging Face cache")), "{stderr}");
}

#[test]
fn steps_must_be_a_published_checkpoint() {
    let home = tempfile::tempdir().unwrap();
    for args in [&["download", "--steps", "3"][..], &["serve", "--lightning-steps", "3"][..]] {
        let (output, _, stderr) = run(&mut sdxl(home.path(), &dead_endpoint(), args));
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("'3'") && stderr.contains("must be 1, 2, 4 or 8"), "{stderr}");
    }
}
