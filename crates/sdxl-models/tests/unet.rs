//! Golden test: one UNet forward against diffusers' `UNet2DConditionModel` on both tiny
//! models, on an odd latent grid (6×5) so the up path must return to the skip sizes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, golden, values, Tol, MODELS};
use sdxl_models::unet::{Conditioning, UNet};

/// f32 against torch f32: differences are summation order only.
const TOL: Tol = Tol { atol: 1e-4, rtol: 1e-3 };

fn time_ids(t: &Tensor) -> Vec<[f32; 6]> {
    values(t).chunks(6).map(|row| row.try_into().expect("six time ids")).collect()
}

#[test]
fn unet_forward_matches_diffusers() {
    for model in MODELS {
        let unet = UNet::load(&fixtures().join(model).join("unet"), DType::F32, &Device::Cpu).expect("load unet");
        let g = golden(&format!("{model}/unet.safetensors"));
        for prefix in ["", "b1_"] {
            let get = |name: &str| &g[&format!("{prefix}{name}")];
            let timestep = values(get("timestep"))[0];
            let ids = time_ids(get("time_ids"));
            let cond =
                Conditioning { context: get("encoder_hidden_states"), text_embeds: get("text_embeds"), time_ids: &ids };
            let output = unet.forward(get("sample"), timestep, &cond).expect("forward");
            assert_close(&format!("{model} {prefix}output"), &output, get("output"), TOL);
        }
    }
}
