//! `sdxl inspect`: what a weights file or model directory holds — its layout, the dtypes and
//! parameter counts per component — and, for a model directory, whether every tensor of every
//! component is one this implementation uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use sdxl_models::sgm;

use crate::{Error, Result};

/// The key layout a safetensors file is recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One component in diffusers' names (a UNet, VAE or CLIP file).
    Diffusers,
    /// A single-file SDXL checkpoint in the original (SGM / ComfyUI) names.
    SingleFile,
    /// LoRA weights in the diffusers/PEFT names.
    LoraPeft,
    /// LoRA weights in the kohya names.
    LoraKohya,
}

/// Tensor statistics of one component of a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub tensors: usize,
    pub parameters: u64,
    /// Tensor count per dtype.
    pub dtypes: BTreeMap<String, usize>,
}

/// What one safetensors file holds.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub path: PathBuf,
    pub layout: Layout,
    /// Per component (`unet`, `vae`, `text_encoder`, … for single files; `all` otherwise).
    pub components: BTreeMap<String, Summary>,
}

/// Reads the header of `path` (memory-mapped; no tensor data is copied).
pub fn inspect_file(path: &Path) -> Result<FileReport> {
    let file_error = |message: String| Error::File { path: path.to_path_buf(), message };
    // SAFETY: read-only mapping of a file we do not modify.
    let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| file_error(e.to_string()))?;
    let entries = tensors.tensors();
    let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
    let layout = classify(&names);
    let mut components: BTreeMap<String, Summary> = BTreeMap::new();
    for (name, view) in &entries {
        let summary = components.entry(component_of(layout, name).to_string()).or_default();
        summary.tensors += 1;
        summary.parameters += view.shape().iter().product::<usize>() as u64;
        *summary.dtypes.entry(format!("{:?}", view.dtype()).to_lowercase()).or_default() += 1;
    }
    Ok(FileReport { path: path.to_path_buf(), layout, components })
}

fn classify(names: &[&str]) -> Layout {
    let any = |pattern: &str| names.iter().any(|n| n.contains(pattern));
    if any("lora_unet_") || any("lora_te1_") || any("lora_te2_") {
        Layout::LoraKohya
    } else if any("lora_A") || any("lora_B") || any(".lora.down") || any("lora_down") {
        Layout::LoraPeft
    } else if any("model.diffusion_model.") || any("first_stage_model.") || any("conditioner.embedders.") {
        Layout::SingleFile
    } else {
        Layout::Diffusers
    }
}

fn component_of(layout: Layout, name: &str) -> &'static str {
    if layout != Layout::SingleFile {
        return "all";
    }
    const PREFIXES: [(&str, &str); 4] = [
        ("model.diffusion_model.", "unet"),
        ("first_stage_model.", "vae"),
        ("conditioner.embedders.0.", "text_encoder"),
        ("conditioner.embedders.1.", "text_encoder_2"),
    ];
    PREFIXES.iter().find(|(prefix, _)| name.starts_with(prefix)).map_or("other", |(_, component)| component)
}

/// One component folder of a model directory.
#[derive(Debug)]
pub struct ComponentReport {
    pub name: &'static str,
    pub files: Vec<FileReport>,
    /// `Ok` when the component loads with every tensor used; otherwise the loader's error.
    pub load: std::result::Result<(), String>,
}

/// Inspects every weighted component of a diffusers-layout directory and loads each with the
/// strict loaders (in f32 on the CPU), so unexpected, missing or misshapen tensors are named.
pub fn inspect_dir(dir: &Path) -> Result<Vec<ComponentReport>> {
    use sdxl_models::clip::text_model::ClipTextModel;
    use sdxl_models::unet::UNet;
    use sdxl_models::vae::Vae;
    type Loader = fn(&Path) -> sdxl_models::Result<()>;
    let components: [(&str, &str, Loader); 4] = [
        ("text_encoder", "model", |d| ClipTextModel::load(d, false, DType::F32, &Device::Cpu).map(drop)),
        ("text_encoder_2", "model", |d| ClipTextModel::load(d, true, DType::F32, &Device::Cpu).map(drop)),
        ("unet", "diffusion_pytorch_model", |d| UNet::load(d, DType::F32, &Device::Cpu).map(drop)),
        ("vae", "diffusion_pytorch_model", |d| Vae::load(d, &Device::Cpu).map(drop)),
    ];
    if !dir.is_dir() {
        return Err(Error::Model { dir: dir.to_path_buf(), message: "not a directory".into() });
    }
    let mut reports = Vec::new();
    for (name, stem, load) in components {
        let folder = dir.join(name);
        if !folder.is_dir() {
            continue;
        }
        let files = weight_files(&folder, stem).iter().map(|f| inspect_file(f)).collect::<Result<Vec<_>>>()?;
        reports.push(ComponentReport { name, files, load: load(&folder).map_err(|e| e.to_string()) });
    }
    Ok(reports)
}

/// What loading a single-file checkpoint shows.
#[derive(Debug)]
pub struct SingleFileCheck {
    /// `Ok` when every component loads with every tensor under its prefix used.
    pub load: std::result::Result<(), String>,
    /// Tensors no component uses: extras the loaders skip on purpose (position ids, OpenCLIP's
    /// `logit_scale`) and anything outside the four components' prefixes.
    pub unused: Vec<String>,
}

/// Loads a single-file checkpoint with the strict loaders (f16 on the CPU, to halve the memory
/// this takes), with the description in `config` or SDXL base's.
pub fn check_single_file(path: &Path, config: Option<&Path>) -> Result<SingleFileCheck> {
    let checkpoint = sdxl_models::weights::Checkpoint::open_files(vec![path.to_path_buf()])?;
    let components = [sgm::UNET_PREFIX, sgm::VAE_PREFIX, sgm::CLIP_L_PREFIX, sgm::CLIP_G_PREFIX];
    let unused = checkpoint
        .names()
        .filter(|n| sgm::IGNORED.contains(n) || !components.iter().any(|p| n.starts_with(p)))
        .map(String::from)
        .collect();
    let overrides = crate::model::Overrides { config: config.map(Path::to_path_buf), ..Default::default() };
    let load = crate::model::load_with(path, &overrides, DType::F16, &Device::Cpu).map(drop).map_err(|e| e.to_string());
    Ok(SingleFileCheck { load, unused })
}

/// The safetensors files of a component whose names start with `stem`.
fn weight_files(folder: &Path, stem: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            name.starts_with(stem) && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures").join(path)
    }

    #[test]
    fn a_diffusers_unet_file_is_summarised() {
        let report = inspect_file(&fixture("tiny-2level-fp16/unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
        assert_eq!(report.layout, Layout::Diffusers);
        let all = &report.components["all"];
        assert!(all.tensors > 50);
        assert_eq!(all.dtypes.keys().collect::<Vec<_>>(), vec!["f16"]);
    }

    #[test]
    fn a_model_directory_loads_every_component() {
        let reports = inspect_dir(&fixture("tiny-sdxl")).unwrap();
        assert_eq!(reports.len(), 4);
        for report in &reports {
            assert!(report.load.is_ok(), "{}: {:?}", report.name, report.load);
            assert_eq!(report.files.len(), 1);
        }
    }

    #[test]
    fn layouts_are_recognised_from_key_names() {
        assert_eq!(classify(&["model.diffusion_model.input_blocks.0.0.weight"]), Layout::SingleFile);
        assert_eq!(classify(&["lora_unet_down_blocks_1_attentions_0.lora_down.weight"]), Layout::LoraKohya);
        assert_eq!(classify(&["unet.down_blocks.1.attn1.to_q.lora_A.weight"]), Layout::LoraPeft);
        assert_eq!(classify(&["conv_in.weight"]), Layout::Diffusers);
        assert_eq!(component_of(Layout::SingleFile, "conditioner.embedders.1.model.ln_final.weight"), "text_encoder_2");
    }
}
