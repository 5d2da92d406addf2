//! `sdxl inspect`: print what a weights file or model directory holds.

use std::path::PathBuf;

use clap::Args;
use sdxl_engine::inspect::{check_single_file, inspect_dir, inspect_file, FileReport, Layout, Summary};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .safetensors file, or a model directory in the diffusers layout.
    path: PathBuf,
    /// For a single-file checkpoint: the diffusers directory that describes it (default: SDXL
    /// base's description, built in).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    if args.path.is_dir() {
        let mut failed = Vec::new();
        for component in inspect_dir(&args.path)? {
            for file in &component.files {
                print_file(&format!("{}/", component.name), file);
            }
            match &component.load {
                Ok(()) => println!("  {}: loads; every tensor is used", component.name),
                Err(e) => {
                    println!("  {}: does not load: {e}", component.name);
                    failed.push(component.name);
                }
            }
        }
        if !failed.is_empty() {
            anyhow::bail!("components that do not load: {}", failed.join(", "));
        }
    } else {
        let report = inspect_file(&args.path)?;
        print_file("", &report);
        if report.layout == Layout::SingleFile {
            let check = check_single_file(&args.path, args.config.as_deref())?;
            if !check.unused.is_empty() {
                let shown: Vec<&str> = check.unused.iter().take(8).map(String::as_str).collect();
                let more = check.unused.len().saturating_sub(shown.len());
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                println!("  unused: {}{more}", shown.join(", "));
            }
            match check.load {
                Ok(()) => println!("  loads; every tensor of every component is used"),
                Err(e) => anyhow::bail!("does not load: {e}"),
            }
        }
    }
    Ok(())
}

fn print_file(prefix: &str, file: &FileReport) {
    let name = file.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    println!("{prefix}{name}: {:?} layout", file.layout);
    for (component, summary) in &file.components {
        println!("  {component}: {}", describe(summary));
    }
}

fn describe(summary: &Summary) -> String {
    let dtypes: Vec<String> = summary.dtypes.iter().map(|(dtype, n)| format!("{n} {dtype}")).collect();
    format!("{} tensors ({}), {} parameters", summary.tensors, dtypes.join(", "), human(summary.parameters))
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
