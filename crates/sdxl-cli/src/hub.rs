//! Fetching the default model, SDXL-Lightning, from the Hugging Face Hub into its cache.
//!
//! The model is assembled from two repositories: [`BASE_REPO`] gives the configs, tokenizers,
//! text encoders and VAE in the diffusers layout (its own UNet weights are not fetched), and
//! [`LIGHTNING_REPO`] gives the UNet weights for the chosen step count. Files land in the
//! Hub's cache layout (`models--org--name/{blobs,refs,snapshots}`), which Python's
//! `huggingface_hub` shares. A file already in the cache is used without contacting the Hub;
//! a new download is checked against the Hub's etag before it is used.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// What can go wrong fetching the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option, such as an unpublished step count.
    #[error("{0}")]
    InvalidRequest(String),
    /// The Hugging Face Hub did not answer at all.
    #[error(
        "cannot reach the Hugging Face Hub at {endpoint} ({cause}); download the files elsewhere and pass \
         --model DIR, or set HF_HUB_OFFLINE=1 to use the cache"
    )]
    HubUnreachable { endpoint: String, cause: String },
    /// A model file could not be downloaded, failed its checksum, or is missing from the cache
    /// while offline; `file` is `org/repo/path`.
    #[error("{file}: {message}")]
    Download { file: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The Hub repository holding the configs, tokenizers, text encoders and VAE.
pub const BASE_REPO: &str = "stabilityai/stable-diffusion-xl-base-1.0";
/// The Hub repository holding ByteDance's Lightning UNets.
pub const LIGHTNING_REPO: &str = "ByteDance/SDXL-Lightning";
/// The step counts ByteDance publishes a Lightning UNet for.
pub const LIGHTNING_STEPS: [u8; 4] = [1, 2, 4, 8];
/// TAESD-XL, the tiny decoder, as a diffusers `AutoencoderTiny`.
pub const TINY_DECODER_REPO: &str = "madebyollin/taesdxl";
const TINY_DECODER_FILES: &[&str] = &["config.json", "diffusion_pytorch_model.safetensors"];

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The files of [`BASE_REPO`] that make a loadable diffusers directory; `unet/` holds only its
/// config, since the Lightning UNet supplies the weights.
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

/// What [`ensure_model`] fetches and where it keeps it.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Which Lightning UNet: one of [`LIGHTNING_STEPS`].
    pub lightning_steps: u8,
    /// The Hub cache directory; `None`: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Draw a progress bar per downloaded file (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self { lightning_steps: 4, cache_dir: None, progress: false }
    }
}

/// Where the model lies in the cache.
#[derive(Debug, Clone)]
pub struct DownloadedModel {
    /// The snapshot directory of [`BASE_REPO`]: a diffusers directory whose `unet/` has only
    /// its config.
    pub dir: PathBuf,
    /// The Lightning UNet weights, to load with `sdxl_engine::model::Overrides::unet`.
    pub unet: PathBuf,
}

/// ByteDance's UNet file name for `steps`, or `None` for a count it does not publish.
pub fn lightning_unet_file(steps: u8) -> Option<String> {
    match steps {
        // The 1-step UNet predicts the clean sample, and its name says so.
        1 => Some("sdxl_lightning_1step_unet_x0.safetensors".to_string()),
        2 | 4 | 8 => Some(format!("sdxl_lightning_{steps}step_unet.safetensors")),
        _ => None,
    }
}

/// Finds SDXL-Lightning in the Hub cache, downloading what is missing.
///
/// Honours `HF_ENDPOINT`, `HF_TOKEN` (else the token file beside the cache), `HF_HOME`,
/// `HF_HUB_CACHE` and `HF_HUB_OFFLINE` (cache only, never the network). An interrupted
/// download resumes from its `.part` file on the next call.
pub fn ensure_model(opts: &DownloadOptions) -> Result<DownloadedModel> {
    let unet_file = lightning_unet_file(opts.lightning_steps).ok_or_else(|| {
        Error::InvalidRequest(format!("Lightning steps must be 1, 2, 4 or 8, got {}", opts.lightning_steps))
    })?;
    let hub = Hub::new(opts)?;
    let dir = hub.fetch_all(BASE_REPO, BASE_FILES)?;
    let unet = hub.fetch_all(LIGHTNING_REPO, &[unet_file.as_str()])?.join(&unet_file);
    Ok(DownloadedModel { dir, unet })
}

/// Finds TAESD-XL in the Hub cache, downloading what is missing: its folder, for
/// `--tiny-decoder` (the same environment as [`ensure_model`]).
pub fn ensure_tiny_decoder(opts: &DownloadOptions) -> Result<PathBuf> {
    Hub::new(opts)?.fetch_all(TINY_DECODER_REPO, TINY_DECODER_FILES)
}

/// The cache, and the Hub client unless offline.
struct Hub {
    cache: Cache,
    api: Option<Api>,
    endpoint: String,
    progress: bool,
}

impl Hub {
    fn new(opts: &DownloadOptions) -> Result<Self> {
        let cache = Cache::new(cache_dir(opts)?);
        let endpoint = env_var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let api = if offline() {
            None
        } else {
            // `from_cache` reads the token file; HF_TOKEN wins over it, as in `huggingface_hub`.
            let mut builder = ApiBuilder::from_cache(cache.clone())
                .with_endpoint(endpoint.clone())
                .with_user_agent("sdxl", env!("CARGO_PKG_VERSION"))
                .with_retries(3);
            if let Some(token) = env_var("HF_TOKEN") {
                builder = builder.with_token(Some(token));
            }
            Some(builder.build().map_err(|e| Error::Download { file: endpoint.clone(), message: e.to_string() })?)
        };
        Ok(Self { cache, api, endpoint, progress: opts.progress && std::io::stderr().is_terminal() })
    }

    /// Fetches `files` of `repo_id` and returns the snapshot directory that holds them all.
    fn fetch_all(&self, repo_id: &str, files: &[&str]) -> Result<PathBuf> {
        // Files cached from an older commit than the one a new download came from sit in
        // another snapshot; a second pass fills the newest snapshot, so the directory is whole.
        for _ in 0..2 {
            let mut dirs = Vec::with_capacity(files.len());
            for file in files {
                let path = self.fetch(repo_id, file)?;
                dirs.push(path.ancestors().nth(Path::new(file).components().count()).map(Path::to_path_buf));
            }
            dirs.dedup();
            if let [Some(dir)] = dirs.as_slice() {
                return Ok(dir.clone());
            }
        }
        Err(Error::Download { file: repo_id.to_string(), message: "the repository changed during the download".into() })
    }

    /// The cached path of one file, downloaded and verified first if it is not in the cache.
    fn fetch(&self, repo_id: &str, file: &str) -> Result<PathBuf> {
        let repo = Repo::model(repo_id.to_string());
        if let Some(path) = self.cache.repo(repo.clone()).get(file) {
            return Ok(path);
        }
        let name = format!("{repo_id}/{file}");
        let Some(api) = &self.api else {
            let message =
                format!("not in the Hugging Face cache at {} (HF_HUB_OFFLINE is set)", self.cache.path().display());
            return Err(Error::Download { file: name, message });
        };
        let repo = api.repo(repo);
        let downloaded = if self.progress {
            repo.download_with_progress(file, indicatif::ProgressBar::new(0))
        } else {
            repo.download_with_progress(file, ())
        };
        let path = downloaded.map_err(|e| self.download_error(&name, e))?;
        verify(&path).map_err(|message| Error::Download { file: name, message })?;
        Ok(path)
    }

    fn download_error(&self, file: &str, e: ApiError) -> Error {
        let message = match e {
            ApiError::TooManyRetries(inner) => return self.download_error(file, *inner),
            ApiError::RequestError(e) => match *e {
                ureq::Error::Transport(t) => {
                    return Error::HubUnreachable { endpoint: self.endpoint.clone(), cause: transport_cause(&t) }
                }
                ureq::Error::Status(code @ (401 | 403), _) => {
                    format!("the Hub answered {code}; set HF_TOKEN to a token that may read the repository")
                }
                ureq::Error::Status(code, _) => format!("the Hub answered {code}"),
            },
            ApiError::IoError(e) => format!("{e}; run again to resume the download"),
            ApiError::LockAcquisition(lock) => {
                format!("another process is downloading it (lock {}); wait for it, or remove the lock", lock.display())
            }
            other => other.to_string(),
        };
        Error::Download { file: file.to_string(), message }
    }
}

/// The Hub cache directory, as `huggingface_hub` chooses it.
fn cache_dir(opts: &DownloadOptions) -> Result<PathBuf> {
    if let Some(dir) = &opts.cache_dir {
        return Ok(dir.clone());
    }
    if let Some(dir) = env_var("HF_HUB_CACHE") {
        return Ok(dir.into());
    }
    if let Some(home) = env_var("HF_HOME") {
        return Ok(PathBuf::from(home).join("hub"));
    }
    let home = env_var("HOME").or_else(|| env_var("USERPROFILE")).ok_or_else(|| Error::Download {
        file: "the Hugging Face cache".into(),
        message: "no home directory to put it in; set HF_HOME".into(),
    })?;
    Ok(PathBuf::from(home).join(".cache").join("huggingface").join("hub"))
}

/// `HF_HUB_OFFLINE`, read as `huggingface_hub` reads it.
fn offline() -> bool {
    env_var("HF_HUB_OFFLINE").is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str()))
}

/// A variable's value, with empty counted as unset.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// "Connection Failed: Connect error: Connection refused (os error 111)": the transport
/// error without its URL, which the caller names as the endpoint.
fn transport_cause(t: &ureq::Transport) -> String {
    let mut cause = t.kind().to_string();
    if let Some(message) = t.message() {
        cause = format!("{cause}: {message}");
    }
    if let Some(source) = std::error::Error::source(t) {
        cause = format!("{cause}: {source}");
    }
    cause
}

/// Checks a downloaded blob against its name in the cache, the Hub's etag: the SHA-256 of the
/// content for LFS files, the git blob SHA-1 (`sha1("blob {len}\0" ++ content)`) for small
/// ones. A bad blob is deleted with its snapshot link, so the next run downloads it afresh.
fn verify(pointer: &Path) -> std::result::Result<(), String> {
    let blob = std::fs::canonicalize(pointer).map_err(|e| format!("cannot open the download: {e}"))?;
    let etag = blob.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let actual = match etag.len() {
        64 => digest_file::<Sha256>(&blob, b""),
        40 => {
            let len = std::fs::metadata(&blob).map_err(|e| e.to_string())?.len();
            digest_file::<Sha1>(&blob, format!("blob {len}\0").as_bytes())
        }
        _ => return Err(format!("cannot verify the download: the Hub's etag `{etag}` is no SHA-256 or git SHA-1")),
    }
    .map_err(|e| format!("cannot read the download: {e}"))?;
    if actual != etag {
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(pointer);
        return Err(format!("checksum mismatch (expected {etag}, got {actual}); the bad copy was deleted"));
    }
    Ok(())
}

/// The lowercase hex digest of `prefix ++ contents of path`.
fn digest_file<D: Digest>(path: &Path, prefix: &[u8]) -> std::io::Result<String> {
    let mut hasher = D::new();
    hasher.update(prefix);
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lightning_file_names_follow_bytedance() {
        assert_eq!(lightning_unet_file(1).as_deref(), Some("sdxl_lightning_1step_unet_x0.safetensors"));
        assert_eq!(lightning_unet_file(8).as_deref(), Some("sdxl_lightning_8step_unet.safetensors"));
        assert_eq!(lightning_unet_file(3), None);
        assert!(LIGHTNING_STEPS.iter().all(|&n| lightning_unet_file(n).is_some()));
    }

    #[cfg(unix)]
    #[test]
    fn blobs_are_checked_against_sha256_and_git_sha1_etags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str| {
            let blob = dir.path().join(name);
            std::fs::write(&blob, b"hello\n").expect("write blob");
            let link = dir.path().join(format!("{name}.link"));
            std::os::unix::fs::symlink(&blob, &link).expect("symlink");
            (blob, link)
        };
        // `sha256sum` and `git hash-object` of "hello\n"
        let (_, good_lfs) = write("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        let (_, good_git) = write("ce013625030ba8dba906f756967f9e9ca394464a");
        assert_eq!(verify(&good_lfs), Ok(()));
        assert_eq!(verify(&good_git), Ok(()));
        let (bad_blob, bad_link) = write(&"0".repeat(64));
        assert!(verify(&bad_link).is_err_and(|e| e.contains("checksum mismatch")));
        assert!(!bad_blob.exists() && !bad_link.exists(), "a bad blob and its link are deleted");
    }
}
