//! Golden test: the VAE decoder against diffusers' `AutoencoderKL.decode`.

mod common;

use candle_core::{Device, Tensor};
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
fn tiled_decode_matches_diffusers_enable_tiling() {
    for model in MODELS {
        let vae = Vae::load(&fixtures().join(model).join("vae"), &Device::Cpu).expect("load vae");
        let g = golden(&format!("{model}/vae_tiled.safetensors"));
        let decoded = vae.decode_tiled(&g["latents"]).expect("decode");
        assert_close(&format!("{model} tiled decode"), &decoded, &g["decoded"], TOL);
        // and the tiles are visible: one piece decodes differently
        let whole = vae.decode(&g["latents"]).expect("decode");
        let seam = (&whole - &decoded).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(seam > 1e-2, "{model}: tiled and whole decodes agree ({seam}), so tiling did not happen");
    }
}

#[test]
fn decode_tiles_only_images_larger_than_1024() {
    let vae = Vae::load(&fixtures().join("tiny-sdxl").join("vae"), &Device::Cpu).expect("load vae");
    let factor = vae.scale_factor();
    for (h, tiled) in
        [(sdxl_models::vae::TILED_ABOVE / factor, false), (sdxl_models::vae::TILED_ABOVE / factor + 1, true)]
    {
        let latents = Tensor::randn(0f32, 1.0, (1, 4, h, 3), &Device::Cpu).unwrap();
        let auto = vae.decode(&latents).expect("decode");
        let expected = if tiled { vae.decode_tiled(&latents) } else { vae.decode_in_one_piece(&latents) };
        let difference =
            (&auto - &expected.unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(difference, 0.0, "{h} latent rows");
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
