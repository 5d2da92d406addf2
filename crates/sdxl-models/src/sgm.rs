//! Where the original single-file SDXL checkpoints (Stability's SGM layout, as ComfyUI and
//! A1111 save them, and ByteDance's `sdxl_lightning_*step.safetensors`) store each parameter
//! that our models ask for by its diffusers name.
//!
//! One file holds all four components under these prefixes; the key correspondence follows
//! diffusers' `convert_diffusers_to_original_sdxl.py` and `single_file_utils.py`.

use crate::key_map::{KeyMap, Stored};
use crate::unet::config::UNetPlan;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// Tensors of single files that no model uses: buffers the models recompute and OpenCLIP's
/// contrastive temperature.
pub const IGNORED: &[&str] = &[
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.embeddings.position_ids",
    "conditioner.embedders.1.model.logit_scale",
    "conditioner.embedders.1.model.attn_mask",
];

/// Whether the tensor names look like a single-file SDXL checkpoint.
pub fn is_single_file<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n.starts_with(UNET_PREFIX) || n.starts_with(VAE_PREFIX) || n.starts_with("conditioner.embedders."))
}

/// The UNet's key map for original-layout files whose UNet keys start with `prefix`.
pub fn unet_map(plan: &UNetPlan, prefix: &str) -> KeyMap {
    let (plan, prefix) = (plan.clone(), prefix.to_string());
    KeyMap::new(move |name| {
        Stored::Key(format!("{prefix}{}", unet_name(&plan, name).unwrap_or_else(|| format!("?{name}"))))
    })
}

/// The original name of a UNet parameter or module (without [`UNET_PREFIX`]), or `None` when
/// the diffusers name is not one of this architecture's.
pub fn unet_name(plan: &UNetPlan, name: &str) -> Option<String> {
    let (head, rest) = split_first(name);
    let fixed = |to: &str| Some(join(to, rest));
    match head {
        "conv_in" => fixed("input_blocks.0.0"),
        "conv_norm_out" => fixed("out.0"),
        "conv_out" => fixed("out.2"),
        "time_embedding" | "add_embedding" => {
            let (layer, rest) = split_first(rest);
            let index = match layer {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return None,
            };
            let base = if head == "time_embedding" { "time_embed" } else { "label_emb.0" };
            Some(join(&format!("{base}.{index}"), rest))
        }
        "down_blocks" => {
            let (level, rest) = split_index(rest)?;
            let first = 1 + plan.down.get(..level)?.iter().map(|l| l.layers + usize::from(l.resample)).sum::<usize>();
            let this = plan.down.get(level)?;
            let (kind, rest) = split_first(rest);
            match kind {
                "downsamplers" => {
                    let rest = rest.strip_prefix("0.conv")?;
                    Some(format!("input_blocks.{}.0.op{rest}", first + this.layers))
                }
                "resnets" | "attentions" => {
                    let (j, rest) = split_index(rest)?;
                    let block = first + j;
                    Some(if kind == "resnets" {
                        format!("input_blocks.{block}.0.{}", resnet_part(rest)?)
                    } else {
                        join(&format!("input_blocks.{block}.1"), rest)
                    })
                }
                _ => None,
            }
        }
        "mid_block" => {
            let (kind, rest) = split_first(rest);
            let (j, rest) = split_index(rest)?;
            match kind {
                "resnets" => Some(format!("middle_block.{}.{}", 2 * j, resnet_part(rest)?)),
                "attentions" if j == 0 => Some(join("middle_block.1", rest)),
                _ => None,
            }
        }
        "up_blocks" => {
            let (level, rest) = split_index(rest)?;
            let first = plan.up.get(..level)?.iter().map(|l| l.layers).sum::<usize>();
            let this = plan.up.get(level)?;
            let (kind, rest) = split_first(rest);
            match kind {
                "upsamplers" => {
                    let rest = rest.strip_prefix("0.conv")?;
                    let slot = if this.transformer_depths.is_some() { 2 } else { 1 };
                    Some(format!("output_blocks.{}.{slot}.conv{rest}", first + this.layers - 1))
                }
                "resnets" | "attentions" => {
                    let (j, rest) = split_index(rest)?;
                    let block = first + j;
                    Some(if kind == "resnets" {
                        format!("output_blocks.{block}.0.{}", resnet_part(rest)?)
                    } else {
                        join(&format!("output_blocks.{block}.1"), rest)
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A UNet ResNet's layer names: `norm1` is `in_layers.0`, and so on.
fn resnet_part(rest: &str) -> Option<String> {
    let (layer, tail) = split_first(rest);
    let original = match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(join(original, tail))
}

/// The VAE's key map for original-layout files whose VAE keys start with `prefix`; `levels` is the length of `block_out_channels` (the
/// original decoder numbers its up levels from the bottom).
pub fn vae_map(levels: usize, prefix: &str) -> KeyMap {
    let prefix = prefix.to_string();
    KeyMap::new(move |name| {
        let original = vae_name(levels, name).unwrap_or_else(|| format!("?{name}"));
        Stored::Key(format!("{prefix}{original}"))
    })
}

/// The original name of a VAE parameter, as also used by standalone VAE files in that layout
/// (e.g. `sdxl_vae.safetensors`).
pub fn vae_name(levels: usize, name: &str) -> Option<String> {
    let (coder, rest) = split_first(name);
    if coder == "quant_conv" || coder == "post_quant_conv" {
        return Some(name.to_string());
    }
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let (head, rest) = split_first(rest);
    let inner = match head {
        "conv_in" | "conv_out" => join(head, rest),
        "conv_norm_out" => join("norm_out", rest),
        "mid_block" => {
            let (kind, rest) = split_first(rest);
            let (j, rest) = split_index(rest)?;
            match (kind, j) {
                ("resnets", 0 | 1) => format!("mid.block_{}.{}", j + 1, vae_resnet_part(rest)),
                ("attentions", 0) => {
                    let (layer, tail) = split_first(rest);
                    let (original, tail) = match layer {
                        "group_norm" => ("norm", tail),
                        "to_q" => ("q", tail),
                        "to_k" => ("k", tail),
                        "to_v" => ("v", tail),
                        "to_out" => ("proj_out", tail.strip_prefix('0')?),
                        _ => return None,
                    };
                    format!("mid.attn_1.{}", join(original, tail))
                }
                _ => return None,
            }
        }
        "down_blocks" | "up_blocks" => {
            let (level, rest) = split_index(rest)?;
            let (block_word, sampler) = if head == "down_blocks" { ("down", "downsample") } else { ("up", "upsample") };
            let original_level = if head == "down_blocks" { level } else { levels.checked_sub(level + 1)? };
            let (kind, rest) = split_first(rest);
            match kind {
                "resnets" => {
                    let (j, rest) = split_index(rest)?;
                    format!("{block_word}.{original_level}.block.{j}.{}", vae_resnet_part(rest))
                }
                "downsamplers" | "upsamplers" => {
                    let rest = rest.strip_prefix("0.conv")?;
                    format!("{block_word}.{original_level}.{sampler}.conv{rest}")
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{coder}.{inner}"))
}

fn vae_resnet_part(rest: &str) -> String {
    let (layer, tail) = split_first(rest);
    join(if layer == "conv_shortcut" { "nin_shortcut" } else { layer }, tail)
}

/// CLIP ViT-L (`text_encoder`): transformers' names under `prefix` ([`CLIP_L_PREFIX`] in single files).
pub fn clip_l_map(prefix: &str) -> KeyMap {
    let prefix = prefix.to_string();
    KeyMap::new(move |name| Stored::Key(format!("{prefix}{name}")))
}

/// OpenCLIP ViT-bigG (`text_encoder_2`): OpenCLIP's names under `prefix` ([`CLIP_G_PREFIX`] in
/// single files), with the
/// attention's q/k/v fused into `in_proj` and the projection stored transposed.
pub fn clip_g_map(prefix: &str) -> KeyMap {
    let prefix = prefix.to_string();
    KeyMap::new(move |name| match clip_g_name(name) {
        Some(Stored::Key(key)) => Stored::Key(format!("{prefix}{key}")),
        Some(Stored::Rows { key, index, parts }) => Stored::Rows { key: format!("{prefix}{key}"), index, parts },
        Some(Stored::Transposed(key)) => Stored::Transposed(format!("{prefix}{key}")),
        None => Stored::Key(format!("{prefix}?{name}")),
    })
}

fn clip_g_name(name: &str) -> Option<Stored> {
    if name == "text_projection.weight" {
        return Some(Stored::Transposed("text_projection".into()));
    }
    let rest = name.strip_prefix("text_model.")?;
    let key = |k: String| Some(Stored::Key(k));
    if let Some(tail) = rest.strip_prefix("final_layer_norm") {
        return key(format!("ln_final{tail}"));
    }
    match rest {
        "embeddings.token_embedding.weight" => return key("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return key("positional_embedding".into()),
        _ => {}
    }
    let rest = rest.strip_prefix("encoder.layers.")?;
    let (layer, rest) = split_index(rest)?;
    let block = format!("transformer.resblocks.{layer}");
    let (module, param) = rest.rsplit_once('.')?;
    let qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];
    if let Some(index) = qkv.iter().position(|m| *m == module) {
        return Some(Stored::Rows { key: format!("{block}.attn.in_proj_{param}"), index, parts: 3 });
    }
    let original = match module {
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    key(format!("{block}.{original}.{param}"))
}

fn split_first(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or((name, ""))
}

fn split_index(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = split_first(name);
    Some((index.parse().ok()?, rest))
}

/// `base.rest`, or `base` when `rest` is empty.
fn join(base: &str, rest: &str) -> String {
    format!("{base}{}", dotted(rest))
}

fn dotted(rest: &str) -> String {
    let rest = rest.strip_prefix('.').unwrap_or(rest);
    if rest.is_empty() {
        String::new()
    } else {
        format!(".{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::config::UNetConfig;

    /// SDXL base's UNet shape: 3 levels, 2 layers each, attention on levels 1 and 2.
    fn sdxl_plan() -> UNetPlan {
        let config: UNetConfig = serde_json::from_value(serde_json::json!({
            "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816
        }))
        .unwrap();
        config.resolve(std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn unet_names_follow_the_original_layout() {
        let plan = sdxl_plan();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("down_blocks.0.resnets.1.conv2.weight", "input_blocks.2.0.out_layers.3.weight"),
            ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
            ("down_blocks.1.resnets.0.conv_shortcut.bias", "input_blocks.4.0.skip_connection.bias"),
            ("down_blocks.1.attentions.1.proj_in.weight", "input_blocks.5.1.proj_in.weight"),
            (
                "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k.weight",
                "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
            ),
            ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
            ("mid_block.attentions.0.norm.weight", "middle_block.1.norm.weight"),
            ("up_blocks.0.resnets.2.norm1.weight", "output_blocks.2.0.in_layers.0.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
            (
                "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj.weight",
                "output_blocks.3.1.transformer_blocks.1.ff.net.0.proj.weight",
            ),
            ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
            ("up_blocks.2.resnets.2.conv1.weight", "output_blocks.8.0.in_layers.2.weight"),
            ("conv_norm_out.bias", "out.0.bias"),
            ("conv_out.weight", "out.2.weight"),
            // module paths, as LoRA files name them
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0",
            ),
            ("up_blocks.2.resnets.0.conv1", "output_blocks.6.0.in_layers.2"),
        ];
        for (diffusers, original) in cases {
            assert_eq!(unet_name(&plan, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        assert_eq!(unet_name(&plan, "down_blocks.3.resnets.0.conv1.weight"), None);
    }

    #[test]
    fn vae_names_follow_the_original_layout() {
        let cases = [
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
            ("encoder.down_blocks.0.downsamplers.0.conv.bias", "encoder.down.0.downsample.conv.bias"),
            ("decoder.up_blocks.0.resnets.2.norm1.weight", "decoder.up.3.block.2.norm1.weight"),
            ("decoder.up_blocks.2.upsamplers.0.conv.weight", "decoder.up.1.upsample.conv.weight"),
            ("decoder.mid_block.resnets.1.conv2.weight", "decoder.mid.block_2.conv2.weight"),
            ("decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"),
            ("encoder.mid_block.attentions.0.to_q.bias", "encoder.mid.attn_1.q.bias"),
            ("encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (diffusers, original) in cases {
            assert_eq!(vae_name(4, diffusers).as_deref(), Some(original), "{diffusers}");
        }
    }

    #[test]
    fn open_clip_names() {
        assert_eq!(
            clip_g_name("text_model.encoder.layers.3.self_attn.k_proj.bias"),
            Some(Stored::Rows { key: "transformer.resblocks.3.attn.in_proj_bias".into(), index: 1, parts: 3 })
        );
        assert_eq!(
            clip_g_name("text_model.encoder.layers.0.mlp.fc2.weight"),
            Some(Stored::Key("transformer.resblocks.0.mlp.c_proj.weight".into()))
        );
        assert_eq!(clip_g_name("text_projection.weight"), Some(Stored::Transposed("text_projection".into())));
        assert_eq!(
            clip_g_name("text_model.embeddings.position_embedding.weight"),
            Some(Stored::Key("positional_embedding".into()))
        );
        assert_eq!(clip_g_name("text_model.final_layer_norm.bias"), Some(Stored::Key("ln_final.bias".into())));
    }
}
