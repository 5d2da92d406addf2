//! Golden test: the VAE decoder against diffusers' `AutoencoderKL.decode`.

mod common;

use candle_core::Device;
use common::{assert_close, fixtures, golden, Tol, MODELS};
use sdxl_models::vae::Vae;

/// f32 against torch f32.
const TOL: Tol = Tol { atol: 1e-4, rtol: 1e-3 };

#[test]
fn vae_decode_matches_diffusers() {
    for model in MODELS {
        let vae = Vae::load(&fixtures().join(model).join("vae"), &Device::Cpu).expect("load vae");
        let g = golden(&format!("{model}/vae.safetensors"));
        let decoded = vae.decode(&g["latents"]).expect("decode");
        assert_close(&format!("{model} decoded"), &decoded, &g["decoded"], TOL);
    }
}

#[test]
fn vae_encoder_mean_matches_diffusers() {
    for model in MODELS {
        let vae = Vae::load(&fixtures().join(model).join("vae"), &Device::Cpu).expect("load vae");
        let g = golden(&format!("{model}/vae.safetensors"));
        let mean = vae.encode_mean(&g["enc_image"]).expect("encode");
        assert_close(&format!("{model} encoder mean"), &mean, &g["enc_mean"], TOL);
    }
}
