//! Golden test: both CLIP text encoders against transformers, on the golden token ids.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, golden, values, Tol, MODELS};
use sdxl_models::clip::text_model::ClipTextModel;

/// f32 against torch f32.
const TOL: Tol = Tol { atol: 1e-5, rtol: 1e-4 };

#[test]
fn text_encoders_match_transformers() {
    for model in MODELS {
        let dir = fixtures().join(model);
        let encoder_1 =
            ClipTextModel::load(&dir.join("text_encoder"), false, DType::F32, &Device::Cpu).expect("load text_encoder");
        let encoder_2 = ClipTextModel::load(&dir.join("text_encoder_2"), true, DType::F32, &Device::Cpu)
            .expect("load text_encoder_2");
        let g = golden(&format!("{model}/text.safetensors"));
        for p in ["cat", "empty", "eot"] {
            let ids =
                |name: &str| vec![values(&g[&format!("{p}_{name}")]).iter().map(|&v| v as u32).collect::<Vec<u32>>()];
            let first = encoder_1.forward(&ids("ids")).expect("encode 1");
            assert_close(&format!("{model} {p} hidden_1"), &first.penultimate, &g[&format!("{p}_hidden_1")], TOL);
            assert!(first.pooled.is_none(), "text_encoder has no projection");
            let second = encoder_2.forward(&ids("ids_2")).expect("encode 2");
            assert_close(&format!("{model} {p} hidden_2"), &second.penultimate, &g[&format!("{p}_hidden_2")], TOL);
            let pooled = second.pooled.expect("text_encoder_2 pools");
            assert_close(&format!("{model} {p} pooled_2"), &pooled, &g[&format!("{p}_pooled_2")], TOL);
        }
    }
}
