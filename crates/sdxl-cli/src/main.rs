//! `sdxl`: the command-line front end.

mod generate;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
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
