//! `sdxl download`: put SDXL-Lightning into the Hugging Face cache, for `sdxl serve` and
//! `sdxl generate` to use without the network.

use std::path::PathBuf;

use crate::hub::{ensure_model, ensure_tiny_decoder, DownloadOptions, LIGHTNING_STEPS};
use clap::Args;

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Which Lightning UNet to fetch: the 1-, 2-, 4- or 8-step checkpoint.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = lightning_steps)]
    steps: u8,
    /// Also fetch TAESD-XL (madebyollin/taesdxl), the tiny decoder of `--decoder tiny` and of
    /// the progress previews.
    #[arg(long)]
    tiny_decoder: bool,
    /// Hub cache directory [default: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(args: DownloadArgs) -> anyhow::Result<()> {
    let options = DownloadOptions { lightning_steps: args.steps, cache_dir: args.dir, progress: true };
    let model = ensure_model(&options)?;
    let tiny = if args.tiny_decoder { Some(ensure_tiny_decoder(&options)?) } else { None };
    let (dir, unet) = (model.dir.display(), model.unet.display());
    let tiny_flag = tiny.as_ref().map_or(String::new(), |t| format!(" --tiny-decoder {}", t.display()));
    println!("model directory: {dir}");
    println!("Lightning UNet:  {unet}");
    if let Some(tiny) = &tiny {
        println!("tiny decoder:    {}", tiny.display());
    }
    println!("use them with:   sdxl serve --model {dir} --unet {unet}{tiny_flag}");
    println!(
        "                 sdxl generate --model {dir} --unet {unet}{tiny_flag} --steps {} --prompt <TEXT> ...",
        args.steps
    );
    Ok(())
}

/// Parses a Lightning step count: ByteDance publishes UNets for 1, 2, 4 and 8 steps only.
pub fn lightning_steps(s: &str) -> Result<u8, String> {
    s.parse().ok().filter(|n| LIGHTNING_STEPS.contains(n)).ok_or_else(|| "must be 1, 2, 4 or 8".to_string())
}
