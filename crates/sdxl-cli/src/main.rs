//! `sdxl`: the command-line front end.

mod bench;
mod defaults;
mod device;
mod download;
mod generate;
mod hub;
mod inspect;
mod model_args;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Self-hosted SDXL(-Lightning) text-to-image.
#[derive(Parser)]
#[command(name = "sdxl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one image and write it as a PNG.
    Generate(generate::GenerateArgs),
    /// Serve the Workers AI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Download SDXL-Lightning from the Hugging Face Hub into its cache.
    Download(download::DownloadArgs),
    /// Show what a weights file or model directory holds, and whether it loads.
    Inspect(inspect::InspectArgs),
    /// Time the full-size architecture with made-up weights (nothing is downloaded).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    // first, while this is the only thread: it writes the environment OpenBLAS loads with
    sdxl_models::nn::kernels::prepare_process();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version go to stdout unchanged
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // Keep usage errors to one line, like every other error of the CLI.
            let rendered = e.render().to_string();
            eprintln!("{} (see --help)", rendered.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    if !matches!(cli.command, Command::Serve(_)) {
        // warnings only (such as `--device auto` finding no GPU); `serve` logs from info up
        init_logging("warn");
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Download(args) => download::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `default_level` and up, or as `RUST_LOG` says.
fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
