//! The CLIP text transformer, as `CLIPTextModel` and `CLIPTextModelWithProjection`.
//!
//! Port of transformers' `models/clip/modeling_clip.py`. Input: token ids `[B, L]` (u32).
//! Output: the penultimate hidden state `[B, L, D]` (what SDXL conditions on) and, for the
//! projection variant, the projected pooled vector `[B, P]` taken at the EOS position after
//! the final layer norm.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

use crate::nn::{linear, Activation, Linear};

use crate::config::read_json;
use std::sync::Arc;

use crate::lora::Component;
use crate::weights::{Checkpoint, ComponentWeights, Layout};
use crate::{Error, Result};

/// `config.json` of a CLIP text encoder (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Absent in `CLIPTextModel` configs that have no projection.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

/// The feed-forward activation a config names.
fn parse_activation(name: &str, path: &Path) -> Result<Activation> {
    match name {
        "quick_gelu" => Ok(Activation::QuickGelu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        other => Err(Error::config(path, format!("unsupported `hidden_act` {other:?}"))),
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(d, d, vb.pp("q_proj"))?,
            k_proj: Linear::new(d, d, vb.pp("k_proj"))?,
            v_proj: Linear::new(d, d, vb.pp("v_proj"))?,
            out_proj: Linear::new(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `x`: [B, L, D]; `mask`: additive causal mask [L, L].
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        // [B,L,D] -> [B,H,L,Dh]
        let split = |t: Tensor| t.reshape((b, l, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        // [B,H,L,Dh] -> [B,L,D]
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: Activation) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: Linear::new(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let h = self.fc1.forward_then(&self.layer_norm2.forward(&x)?, self.act)?;
        x + self.fc2.forward(&h)?
    }
}

/// What SDXL takes from a text encoder.
pub struct TextEncoding {
    /// `hidden_states[-2]`: the output of the second-to-last layer, [B, L, D].
    pub penultimate: Tensor,
    /// `text_embeds`: the projected pooled vector [B, P] (projection variant only).
    pub pooled: Option<Tensor>,
}

/// A CLIP text encoder, with or without the text projection.
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: u32,
    /// The compute dtype (the embedding tables may be stored narrower).
    dtype: DType,
    device: Device,
}

/// Buffers some checkpoints carry that the model recomputes.
const IGNORED: &[&str] = &["text_model.embeddings.position_ids", "embeddings.position_ids"];

impl ClipTextModel {
    /// Loads the encoder in `dir` (`config.json` + `model[.fp16].safetensors`).
    /// `with_projection` selects `CLIPTextModelWithProjection`.
    pub fn load(dir: &Path, with_projection: bool, dtype: DType, device: &Device) -> Result<Self> {
        let weights = ComponentWeights::diffusers(Checkpoint::open(dir, "model")?);
        Self::load_from(dir, with_projection, &weights, dtype, device)
    }

    /// Loads the architecture from `dir/config.json` and the weights from `weights`: a
    /// transformers file, or the encoder of a single-file checkpoint (CLIP ViT-L in
    /// transformers' names, OpenCLIP ViT-bigG in OpenCLIP's when `with_projection`).
    pub fn load_from(
        dir: &Path,
        with_projection: bool,
        weights: &ComponentWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let cfg: ClipTextConfig = read_json(&config_path)?;
        if cfg.num_hidden_layers < 2 {
            return Err(Error::config(
                &config_path,
                "`num_hidden_layers` must be at least 2 (SDXL uses the penultimate layer)",
            ));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::config(&config_path, "`hidden_size` must be a multiple of `num_attention_heads`"));
        }
        let act = parse_activation(&cfg.hidden_act, &config_path)?;
        let projection_dim = match (with_projection, cfg.projection_dim) {
            (true, None) => return Err(Error::config(&config_path, "missing `projection_dim`")),
            (true, Some(p)) => Some(p),
            (false, _) => None,
        };
        // transformers 4 saves the transformer under `text_model.`; transformers 5 saves a
        // `CLIPTextModel`'s tensors at the root (the projection variant keeps the prefix).
        // Single files follow whichever transformers the converter ran; OpenCLIP's map expects
        // the prefixed names.
        let prefix = match weights.layout() {
            Layout::Diffusers => "",
            Layout::Original { prefix } => prefix.as_str(),
        };
        let prefixed = (with_projection && !prefix.is_empty())
            || weights.contains(&format!("{prefix}text_model.embeddings.token_embedding.weight"));
        let component = if with_projection { Component::TextEncoder2 } else { Component::TextEncoder };
        if let Some(lora) = weights.lora() {
            // LoRA files name the encoder's modules with or without the `text_model.` prefix,
            // depending on the transformers version they were made with.
            lora.set_alias(
                component,
                Arc::new(|module| match module.strip_prefix("text_model.") {
                    Some(bare) => Some(bare.to_string()),
                    None => Some(format!("text_model.{module}")),
                }),
            );
        }
        let original = |prefix: &str| {
            if with_projection {
                crate::sgm::clip_g_map(prefix)
            } else {
                crate::sgm::clip_l_map(prefix)
            }
        };
        let root = weights.var_builder(original, Some(component), dtype, device);
        let model = Self::new(root, prefixed, &cfg, act, projection_dim, device).map_err(|e| weights.error(e))?;
        weights.finish(IGNORED)?;
        Ok(model)
    }

    fn new(
        vb: VarBuilder,
        prefixed: bool,
        cfg: &ClipTextConfig,
        act: Activation,
        projection_dim: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let tm = if prefixed { vb.pp("text_model") } else { vb.clone() };
        let emb = tm.pp("embeddings");
        // One row per token: the few-row kernel's products.
        let (layers, text_projection) = linear::building_for_few_rows(|| -> candle_core::Result<_> {
            let layers = (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(tm.pp("encoder").pp("layers").pp(i), cfg, act))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let text_projection =
                projection_dim.map(|p| Linear::no_bias(cfg.hidden_size, p, vb.pp("text_projection"))).transpose()?;
            Ok((layers, text_projection))
        })?;
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(cfg.max_position_embeddings, cfg.hidden_size, emb.pp("position_embedding"))?,
            layers,
            final_layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?,
            text_projection,
            eos_token_id: cfg.eos_token_id,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: device.clone(),
        })
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Width of the pooled projection, for the projection variant.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection.as_ref().and(self.config.projection_dim)
    }

    /// Encodes token ids `[B][L]`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<TextEncoding> {
        let batch = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if batch == 0 || len == 0 || ids.iter().any(|row| row.len() != len) {
            return Err(Error::InvalidArgument(
                "text encoder: token rows must be non-empty and of equal length".into(),
            ));
        }
        let vocab = self.token_embedding.embeddings().dim(0)?;
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let max_positions = self.position_embedding.embeddings().dim(0)?;
        if len > max_positions {
            return Err(Error::InvalidArgument(format!("{len} tokens exceed the encoder's {max_positions} positions")));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (batch, len), &self.device)?;
        let positions = Tensor::arange(0u32, len as u32, &self.device)?;
        // [B,L,D] + [L,D]
        let tokens = self.token_embedding.forward(&input)?.to_dtype(self.dtype)?;
        let mut x = tokens.broadcast_add(&self.position_embedding.forward(&positions)?.to_dtype(self.dtype)?)?;
        let mask = causal_mask(len, x.dtype(), &self.device)?;
        let (last, rest) = self.layers.split_last().expect("config check guarantees at least two layers");
        for layer in rest {
            x = layer.forward(&x, &mask)?;
        }
        let penultimate = x.clone();
        let pooled = match &self.text_projection {
            None => None,
            Some(projection) => {
                let last_hidden = self.final_layer_norm.forward(&last.forward(&x, &mask)?)?;
                let rows = ids
                    .iter()
                    .enumerate()
                    .map(|(b, row)| last_hidden.i((b, self.eos_position(row)))?.unsqueeze(0))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                // [B,D] -> [B,P]
                Some(projection.forward(&Tensor::cat(&rows, 0)?)?)
            }
        };
        Ok(TextEncoding { penultimate, pooled })
    }

    /// The pooled position: transformers takes the first `eos_token_id`, or, for legacy configs
    /// whose `eos_token_id` is 2, the position of the highest id (which is EOS in CLIP's vocab).
    fn eos_position(&self, row: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            // argmax; torch returns the first maximal index
            let max = row.iter().copied().max().unwrap_or(0);
            row.iter().position(|&t| t == max).unwrap_or(0)
        } else {
            row.iter().position(|&t| t == self.eos_token_id).unwrap_or(0)
        }
    }
}

/// Additive causal mask [L, L]: 0 on and below the diagonal, the dtype's minimum above.
fn causal_mask(len: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
    Tensor::from_vec(data, (len, len), device)?.to_dtype(dtype)
}
