//! diffusers' `ResnetBlock2D` (`models/resnet.py`) with `time_embedding_norm="default"`:
//! GroupNorm → SiLU → conv, plus the projected time embedding, twice, with a 1×1 shortcut
//! when the channel count changes. `[B, Cin, H, W] -> [B, Cout, H, W]`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{conv2d, silu, Conv2d, GroupNorm, Linear};

/// Shape of a ResNet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, `None` where the block takes none (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetConfig) -> candle_core::Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        Ok(Self {
            norm1: GroupNorm::new(cfg.groups, cin, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: cfg.temb_channels.map(|t| Linear::new(t, cout, vb.pp("time_emb_proj"))).transpose()?,
            norm2: GroupNorm::new(cfg.groups, cout, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: (cin != cout).then(|| conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))).transpose()?,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `x`: [B,Cin,H,W]; `temb`: [B,T] (required iff the block was built with `temb_channels`).
    ///
    /// Takes `x` by value so that it can be freed as soon as the shortcut is taken: at the
    /// VAE's full resolution each of these tensors is 0.5–1 GB, and at most three live at once.
    pub fn forward(&self, x: Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward_group_norm_silu(&x, &self.norm1)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            // [B,T] -> [B,Cout,1,1]
            let t = proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(&x)?,
            None => x,
        };
        let out = self.conv2.forward_group_norm_silu_plus(&h, &self.norm2, Some(&shortcut))?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            super::div_scalar(&out, self.output_scale_factor as f32)
        }
    }
}
