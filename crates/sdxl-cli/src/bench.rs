//! `sdxl bench`: time the full-size SDXL architecture (made-up weights, nothing downloaded).

use clap::{Args, ValueEnum};
use sdxl_engine::bench::{measure, random_sdxl, Component, Measurement};

use crate::device::{self, DeviceArg};
use crate::model_args::{DecoderArg, Dtype, QuantizeArg};
use sdxl_engine::bench::unet_step_error;
use sdxl_engine::model::Overrides;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
#[value(rename_all = "snake_case")]
enum ComponentArg {
    TextEncoders,
    UnetStep,
    UnetStepCfg,
    VaeDecode,
    VaeEncode,
    #[value(name = "image_4step")]
    Image4step,
}

impl From<ComponentArg> for Component {
    fn from(c: ComponentArg) -> Self {
        match c {
            ComponentArg::TextEncoders => Component::TextEncoders,
            ComponentArg::UnetStep => Component::UnetStep,
            ComponentArg::UnetStepCfg => Component::UnetStepCfg,
            ComponentArg::VaeDecode => Component::VaeDecode,
            ComponentArg::VaeEncode => Component::VaeEncode,
            ComponentArg::Image4step => Component::Image4Step,
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to time; repeat for several (default: all). image_4step runs at 1024 unless
    /// --resolution says otherwise.
    #[arg(long = "component", value_enum)]
    components: Vec<ComponentArg>,
    /// Square image sizes in pixels; repeat for several (default: 512 and 1024).
    #[arg(long = "resolution")]
    resolutions: Vec<usize>,
    /// Timed runs per measurement, after the warm-up runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed runs before the timed ones (0 for sizes where one run takes many minutes).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Where to run: cpu, cuda, cuda:N, or auto (a GPU where this build has CUDA support and
    /// one answers, else the CPU).
    #[arg(long, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Compute dtype of the UNet and text encoders (default: f32 on the CPU, f16 on a GPU; the
    /// VAE always runs in f32).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Keep the weight matrices in this dtype while computing in --dtype (f16 or bf16 with
    /// f32 compute: half the memory).
    #[arg(long, value_enum)]
    weights_dtype: Option<Dtype>,
    /// One JSON object per measurement per line, instead of a table.
    #[arg(long)]
    json: bool,
    /// Quantize the UNet's and text encoders' weights (see `sdxl generate --help`); with
    /// int8, unet_step also reports `rel_error` against the f32 UNet.
    #[arg(long, value_enum, default_value_t = QuantizeArg::None)]
    quantize: QuantizeArg,
    /// The decoder vae_decode and image_4step run: `vae`, or `tiny` (TAESD-XL's size).
    #[arg(long, value_enum, default_value_t = DecoderArg::Vae)]
    decoder: DecoderArg,
    /// Time the architecture this diffusers directory describes instead of SDXL base's (its
    /// configs only; the weights are still made up).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        anyhow::bail!("`--runs` must be at least 1");
    }
    let mut components: Vec<Component> = args.components.iter().map(|&c| c.into()).collect();
    if components.is_empty() {
        components = Component::ALL.to_vec();
    }
    components.sort();
    components.dedup();
    let explicit_resolutions = !args.resolutions.is_empty();
    let resolutions = if explicit_resolutions { args.resolutions.clone() } else { vec![512, 1024] };
    let device = args.device.open()?;
    let dtype = args.dtype.map_or_else(|| device::default_dtype(&device), Into::into);
    let started = std::time::Instant::now();
    let options = Overrides {
        weights_dtype: args.weights_dtype.map(Into::into),
        quantize: args.quantize.into(),
        decoder: args.decoder.into(),
        ..Overrides::default()
    };
    let pipeline = random_sdxl(args.config.as_deref(), &options, dtype, &device)?;
    if !args.json {
        println!(
            "{}, random weights, {:?} on {}{}{}{}, built in {:.1} s; {} timed run(s) after {} warm-up run(s)",
            args.config.as_ref().map_or("full-size SDXL".to_string(), |d| d.display().to_string()),
            dtype,
            sdxl_engine::model::device_name(&device),
            args.weights_dtype.map_or(String::new(), |w| format!(" ({w:?} weights)")),
            if args.quantize == QuantizeArg::Int8 { ", int8 weights" } else { "" },
            if args.decoder == DecoderArg::Tiny { ", tiny decoder" } else { "" },
            started.elapsed().as_secs_f64(),
            args.runs,
            args.warmup
        );
        println!(
            "{:<15} {:>10} {:>10} {:>9} {:>13} {:>10}",
            "component", "resolution", "median s", "GFLOP/s", "peak RSS MB", "rel error"
        );
    }
    for component in components {
        let sizes: Vec<usize> = match component {
            Component::TextEncoders => vec![resolutions[0]],
            Component::Image4Step if !explicit_resolutions => vec![1024],
            _ => resolutions.clone(),
        };
        for resolution in sizes {
            let mut m = measure(&pipeline, component, resolution, args.warmup, args.runs)?;
            if component == Component::UnetStep && args.quantize != QuantizeArg::None {
                m.rel_error = Some(unet_step_error(&pipeline, args.config.as_deref(), resolution)?);
            }
            print(&m, args.json)?;
        }
    }
    Ok(())
}

fn print(m: &Measurement, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(m)?);
    } else {
        let resolution = m.resolution.map_or("-".to_string(), |r| format!("{r}²"));
        let error = m.rel_error.map_or("-".to_string(), |e| format!("{e:.4}"));
        println!(
            "{:<15} {:>10} {:>10.2} {:>9.1} {:>13.0} {:>10}",
            m.component, resolution, m.median_s, m.gflops, m.peak_rss_mb, error
        );
    }
    Ok(())
}
