//! LoRA weights, fused into the UNet and text encoders as they load.
//!
//! Two file layouts are read:
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` and `.lora_B.weight` (or the older
//!   `.lora.down.weight` / `.lora.up.weight`), with `text_encoder.` and `text_encoder_2.` for
//!   the encoders; `lora_alpha` comes from the `lora_adapter_metadata` header entry that
//!   diffusers writes, else from `<module>.alpha` tensors, else it equals the rank;
//! - kohya: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha`, where
//!   `<module>` is the module path with `.` replaced by `_`, in diffusers' names or in the
//!   original (SGM) names, and `lora_te1_` / `lora_te2_` for the encoders.
//!
//! Fusing adds `scale · alpha / rank · up @ down` to the weight, in f32, as diffusers'
//! `fuse_lora(lora_scale=scale)` does. Every update must land on a weight of the model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::{Error, Result};

/// The model part a LoRA update belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    fn peft_prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One low-rank update: `scale · up @ down`.
struct Update {
    up: Tensor,
    down: Tensor,
    scale: f64,
    /// The file and key it came from, for errors.
    origin: String,
}

/// How a module is named in a LoRA file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// A module path (`down_blocks.1.attentions.0.proj_in`).
    Module(String),
    /// kohya's flattened path (`down_blocks_1_attentions_0_proj_in`).
    Flat(String),
}

/// Other names a component's module may have in LoRA files (for the UNet, its original
/// SGM path; for an unprefixed CLIP checkpoint, the `text_model.` path).
pub type Alias = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// LoRA updates from one or more files, waiting to be fused.
pub struct LoraSet {
    updates: BTreeMap<(Component, Target), Vec<Update>>,
    aliases: Mutex<BTreeMap<Component, Alias>>,
    applied: Mutex<BTreeSet<(Component, Target)>>,
}

/// A LoRA file and the strength to fuse it with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraSet {
    /// Reads every file's updates (in f32, on the CPU).
    pub fn load(files: &[LoraFile]) -> Result<Arc<Self>> {
        let mut updates: BTreeMap<(Component, Target), Vec<Update>> = BTreeMap::new();
        for file in files {
            if !file.scale.is_finite() {
                return Err(Error::InvalidArgument(format!("LoRA scale for {} must be finite", file.path.display())));
            }
            for (key, update) in read_file(&file.path, file.scale)? {
                updates.entry(key).or_default().push(update);
            }
        }
        Ok(Arc::new(Self { updates, aliases: Mutex::new(BTreeMap::new()), applied: Mutex::new(BTreeSet::new()) }))
    }

    /// Registers the other names of `component`'s modules (see [`Alias`]).
    pub fn set_alias(&self, component: Component, alias: Alias) {
        self.aliases.lock().expect("lora: lock poisoned").insert(component, alias);
    }

    /// Whether any update targets `component`.
    pub fn touches(&self, component: Component) -> bool {
        self.updates.keys().any(|(c, _)| *c == component)
    }

    /// Adds the updates aimed at parameter `name` (a diffusers name such as
    /// `down_blocks.1.attentions.0.proj_in.weight`) to `weight`, returning it in f32 when any
    /// applies and unchanged otherwise.
    pub fn fuse_into(&self, component: Component, name: &str, weight: Tensor) -> candle_core::Result<Tensor> {
        let Some(module) = name.strip_suffix(".weight") else { return Ok(weight) };
        let alias = self.aliases.lock().expect("lora: lock poisoned").get(&component).and_then(|a| a(module));
        let mut candidates = vec![module.to_string()];
        candidates.extend(alias);
        let mut fused = None::<Tensor>;
        for candidate in &candidates {
            for target in [Target::Module(candidate.clone()), Target::Flat(candidate.replace('.', "_"))] {
                let key = (component, target);
                let Some(updates) = self.updates.get(&key) else { continue };
                if !self.applied.lock().expect("lora: lock poisoned").insert(key) {
                    continue;
                }
                let mut w = match fused.take() {
                    Some(w) => w,
                    None => weight.to_dtype(DType::F32)?,
                };
                for update in updates {
                    w = (w + delta(update, weight.dims())?)?;
                }
                fused = Some(w);
            }
        }
        Ok(fused.unwrap_or(weight))
    }

    /// Fails on the first update that did not land on a weight of the model.
    pub fn finish(&self) -> Result<()> {
        let applied = self.applied.lock().expect("lora: lock poisoned");
        match self.updates.iter().find(|(key, _)| !applied.contains(*key)) {
            None => Ok(()),
            Some((_, updates)) => {
                Err(Error::InvalidArgument(format!("LoRA {} targets no weight of the model", updates[0].origin)))
            }
        }
    }
}

/// `scale · up @ down`, reshaped to the weight's shape (a conv update's down part carries the
/// kernel, its up part is 1×1).
fn delta(update: &Update, dims: &[usize]) -> candle_core::Result<Tensor> {
    let rank = update.down.dim(0)?;
    let up = update.up.reshape((update.up.dim(0)?, ()))?;
    let down = update.down.reshape((rank, ()))?;
    if up.dim(1)? != rank || up.dim(0)? != dims[0] || up.dim(0)? * down.dim(1)? != dims.iter().product::<usize>() {
        return Err(candle_core::Error::Msg(format!(
            "LoRA {}: up {:?} @ down {:?} does not fit the weight {dims:?}",
            update.origin,
            update.up.dims(),
            update.down.dims()
        )));
    }
    (up.matmul(&down)? * update.scale)?.reshape(dims)
}

/// The parts of one module's update as found in a file.
#[derive(Default)]
struct Parts {
    up: Option<Tensor>,
    down: Option<Tensor>,
    alpha: Option<f64>,
    first_key: String,
}

fn read_file(path: &Path, scale: f64) -> Result<Vec<((Component, Target), Update)>> {
    let checkpoint = Checkpoint::open_files(vec![path.to_path_buf()])?;
    let file_error = |message: String| Error::Weights { path: path.to_path_buf(), message };
    let peft_metadata = PeftMetadata::from_metadata(checkpoint.metadata()).map_err(file_error)?;
    let mut modules: BTreeMap<(Component, Target), Parts> = BTreeMap::new();
    let names: Vec<String> = checkpoint.names().map(String::from).collect();
    for key in &names {
        let (target, part) = parse_key(key).map_err(file_error)?;
        let parts = modules.entry(target).or_default();
        if parts.first_key.is_empty() {
            parts.first_key = key.clone();
        }
        let tensor =
            checkpoint.load(key, &Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).map_err(|e| checkpoint.error(e))?;
        match part {
            Part::Up => parts.up = Some(tensor),
            Part::Down => parts.down = Some(tensor),
            Part::Alpha => {
                let value = tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| checkpoint.error(e))?;
                match value.as_slice() {
                    [alpha] => parts.alpha = Some(f64::from(*alpha)),
                    _ => return Err(file_error(format!("`{key}` must hold one number"))),
                }
            }
        }
    }
    let file = path.display();
    modules
        .into_iter()
        .map(|(target, parts)| {
            let origin = format!("{file}: `{}`", parts.first_key);
            let (Some(up), Some(down)) = (parts.up, parts.down) else {
                return Err(file_error(format!("`{}` has no matching up/down (A/B) pair", parts.first_key)));
            };
            let rank = down.dim(0).map_err(|e| checkpoint.error(e))?;
            if rank == 0 || up.rank() < 2 {
                return Err(file_error(format!("`{}` has a malformed shape", parts.first_key)));
            }
            // An `.alpha` tensor wins; else PEFT's metadata; else alpha equals the rank.
            let scaling = match parts.alpha {
                Some(alpha) => alpha / rank as f64,
                None => peft_metadata.scaling(target.0, &target.1, rank).unwrap_or(1.0),
            };
            let update = Update { up, down, scale: scale * scaling, origin };
            Ok((target, update))
        })
        .collect()
}

#[derive(Debug)]
enum Part {
    Up,
    Down,
    Alpha,
}

/// Splits a LoRA key into its target module and which part it is.
fn parse_key(key: &str) -> std::result::Result<((Component, Target), Part), String> {
    const KOHYA: [(&str, Component); 4] = [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ];
    const KOHYA_PARTS: [(&str, Part); 3] =
        [(".lora_up.weight", Part::Up), (".lora_down.weight", Part::Down), (".alpha", Part::Alpha)];
    const PEFT_PARTS: [(&str, Part); 5] = [
        (".lora_B.weight", Part::Up),
        (".lora_A.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".alpha", Part::Alpha),
    ];
    let unsupported = || {
        format!("unsupported LoRA tensor `{key}` (only plain LoRA up/down pairs are supported, not LoHa, LoKr or DoRA)")
    };
    if let Some((prefix, component)) = KOHYA.iter().find(|(p, _)| key.starts_with(p)) {
        let rest = &key[prefix.len()..];
        let (module, part) = split_part(rest, KOHYA_PARTS).ok_or_else(unsupported)?;
        return Ok(((*component, Target::Flat(module.to_string())), part));
    }
    let (module, part) = split_part(key, PEFT_PARTS).ok_or_else(unsupported)?;
    let (component, module) = [Component::TextEncoder2, Component::TextEncoder, Component::Unet]
        .into_iter()
        .find_map(|c| module.strip_prefix(c.peft_prefix()).and_then(|m| m.strip_prefix('.')).map(|m| (c, m)))
        // A bare PEFT state dict of a UNet has no component prefix.
        .unwrap_or((Component::Unet, module));
    Ok(((component, Target::Module(module.to_string())), part))
}

fn split_part<'k, const N: usize>(key: &'k str, parts: [(&str, Part); N]) -> Option<(&'k str, Part)> {
    parts.into_iter().find_map(|(suffix, part)| key.strip_suffix(suffix).map(|module| (module, part)))
}

/// PEFT's `lora_alpha` (and per-module `alpha_pattern`) per component, from the
/// `lora_adapter_metadata` JSON that diffusers stores in the file's header.
#[derive(Default)]
struct PeftMetadata {
    per_component: BTreeMap<Component, PeftConfig>,
}

struct PeftConfig {
    alpha: Option<f64>,
    pattern: Vec<(String, f64)>,
    /// rank-stabilised LoRA: the scaling is alpha / sqrt(rank), not alpha / rank.
    rslora: bool,
}

impl PeftMetadata {
    fn from_metadata(metadata: &BTreeMap<String, String>) -> std::result::Result<Self, String> {
        let Some(text) = metadata.get("lora_adapter_metadata") else { return Ok(Self::default()) };
        let json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("header `lora_adapter_metadata`: {e}"))?;
        let mut per_component = BTreeMap::new();
        for component in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            let prefix = component.peft_prefix();
            let alpha = json.get(&format!("{prefix}.lora_alpha")).and_then(serde_json::Value::as_f64);
            let rslora = json.get(&format!("{prefix}.use_rslora")).and_then(serde_json::Value::as_bool) == Some(true);
            let pattern = json
                .get(&format!("{prefix}.alpha_pattern"))
                .and_then(serde_json::Value::as_object)
                .map(|m| m.iter().filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v))).collect())
                .unwrap_or_default();
            per_component.insert(component, PeftConfig { alpha, pattern, rslora });
        }
        Ok(Self { per_component })
    }

    /// PEFT's scaling of one module's update, or `None` when the file's metadata says nothing.
    fn scaling(&self, component: Component, target: &Target, rank: usize) -> Option<f64> {
        let config = self.per_component.get(&component)?;
        let by_pattern = match target {
            // PEFT matches a pattern key against the end of the module path.
            Target::Module(module) => config
                .pattern
                .iter()
                .find(|(key, _)| module == key || module.ends_with(&format!(".{key}")))
                .map(|(_, value)| *value),
            Target::Flat(_) => None,
        };
        let alpha = by_pattern.or(config.alpha)?;
        Some(if config.rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 })
    }
}

/// Parses `FILE[:SCALE]` (the scale defaults to 1).
pub fn parse_lora_arg(arg: &str) -> std::result::Result<LoraFile, String> {
    if let Some((path, scale)) = arg.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f64>() {
            if !scale.is_finite() {
                return Err(format!("LoRA scale `{scale}` must be a finite number"));
            }
            return Ok(LoraFile { path: PathBuf::from(path), scale });
        }
    }
    Ok(LoraFile { path: PathBuf::from(arg), scale: 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_layouts_are_parsed() {
        let ((c, t), _) = parse_key("lora_unet_input_blocks_4_1_proj_in.lora_down.weight").unwrap();
        assert_eq!((c, t), (Component::Unet, Target::Flat("input_blocks_4_1_proj_in".into())));
        let ((c, t), _) = parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!((c, t), (Component::TextEncoder2, Target::Flat("text_model_encoder_layers_0_mlp_fc1".into())));
        let ((c, t), _) = parse_key("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight").unwrap();
        assert_eq!((c, t), (Component::TextEncoder2, Target::Module("text_model.encoder.layers.0.mlp.fc1".into())));
        let ((c, t), _) = parse_key("unet.mid_block.attentions.0.proj_out.lora.up.weight").unwrap();
        assert_eq!((c, t), (Component::Unet, Target::Module("mid_block.attentions.0.proj_out".into())));
        let ((c, _), _) = parse_key("down_blocks.0.resnets.0.conv1.lora_B.weight").unwrap();
        assert_eq!(c, Component::Unet);
        assert!(parse_key("lora_unet_x.hada_w1_a").unwrap_err().contains("LoHa"));
    }

    #[test]
    fn lora_args_take_an_optional_scale() {
        assert_eq!(parse_lora_arg("a.safetensors").unwrap(), LoraFile { path: "a.safetensors".into(), scale: 1.0 });
        assert_eq!(parse_lora_arg("d/a.safetensors:0.7").unwrap().scale, 0.7);
        assert_eq!(parse_lora_arg("c:/x.safetensors").unwrap().path, PathBuf::from("c:/x.safetensors"));
        assert!(parse_lora_arg("a.safetensors:inf").is_err());
    }

    #[test]
    fn updates_fuse_with_alpha_over_rank_and_must_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.safetensors");
        let cpu = &Device::Cpu;
        let tensors: std::collections::HashMap<String, Tensor> = [
            ("lora_unet_a_b.lora_down.weight", Tensor::new(&[[1f32, 2.]], cpu).unwrap()),
            ("lora_unet_a_b.lora_up.weight", Tensor::new(&[[1f32], [-1.]], cpu).unwrap()),
            ("lora_unet_a_b.alpha", Tensor::new(0.5f32, cpu).unwrap()),
            ("lora_unet_c.lora_down.weight", Tensor::new(&[[1f32, 2.]], cpu).unwrap()),
            ("lora_unet_c.lora_up.weight", Tensor::new(&[[1f32], [-1.]], cpu).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let set = LoraSet::load(&[LoraFile { path, scale: 2.0 }]).unwrap();
        let weight = Tensor::zeros((2, 2), DType::F16, cpu).unwrap();
        let fused = set.fuse_into(Component::Unet, "a.b.weight", weight.clone()).unwrap();
        // 2 (scale) · 0.5 (alpha) / 1 (rank) · up @ down
        assert_eq!(fused.to_vec2::<f32>().unwrap(), vec![vec![1., 2.], vec![-1., -2.]]);
        let untouched = set.fuse_into(Component::TextEncoder, "a.b.weight", weight).unwrap();
        assert_eq!(untouched.dtype(), DType::F16);
        let err = set.finish().unwrap_err().to_string();
        assert!(err.contains("lora_unet_c.lora_down.weight") && err.contains("targets no weight"), "{err}");
    }
}
