//! `sdxl inspect`: print what a weights file or model directory holds.

use std::path::PathBuf;

use clap::Args;
use sdxl_engine::inspect::{check_single_file, inspect_dir, inspect_file, FileReport, Layout, Summary};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .safetensors file, a model directory in the diffusers layout, or a PNG made by
    /// `sdxl` (or another SDXL tool), whose generation parameters are printed.
    path: PathBuf,
    /// For a single-file checkpoint: the diffusers directory that describes it (default: SDXL
    /// base's description, built in).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    if is_png(&args.path) {
        let bytes = std::fs::read(&args.path)?;
        match sdxl_engine::png::read_parameters(&bytes)? {
            Some(parameters) => println!("{parameters}"),
            None => anyhow::bail!("{}: a PNG without generation parameters", args.path.display()),
        }
        return Ok(());
    }
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

/// Whether `path` is a file that starts with the PNG signature.
fn is_png(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut signature = [0u8; 8];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut signature)).is_ok()
        && signature == *b"\x89PNG\r\n\x1a\n"
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
