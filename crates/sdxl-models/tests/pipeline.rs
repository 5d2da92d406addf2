//! Golden test: the txt2img pipeline's own stages against diffusers: `encode_prompt` (with a
//! negative prompt and with zeroed negatives) and the latents after every denoising step.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, golden, Tol, MODELS};
use sdxl_models::clip::text_model::ClipTextModel;
use sdxl_models::clip::tokenizer::ClipTokenizer;
use sdxl_models::pipeline::{Components, Decoder, Generation, Pipeline};
use sdxl_models::scheduler::{Sampler, Scheduler};
use sdxl_models::unet::UNet;
use sdxl_models::vae::Vae;
use serde::Deserialize;

/// Text embeddings: f32 against torch f32.
const TEXT_TOL: Tol = Tol { atol: 1e-5, rtol: 1e-4 };
/// Latents after several UNet evaluations: differences compound over steps.
const LATENT_TOL: Tol = Tol { atol: 2e-4, rtol: 1e-3 };

fn load(dir: &Path) -> Pipeline {
    let cpu = Device::Cpu;
    let parts = Components {
        tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer")).expect("tokenizer"),
        tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2")).expect("tokenizer_2"),
        text_encoder: ClipTextModel::load(&dir.join("text_encoder"), false, DType::F32, &cpu).expect("text_encoder"),
        text_encoder_2: ClipTextModel::load(&dir.join("text_encoder_2"), true, DType::F32, &cpu)
            .expect("text_encoder_2"),
        unet: UNet::load(&dir.join("unet"), DType::F32, &cpu).expect("unet"),
        vae: Vae::load(&dir.join("vae"), &cpu).expect("vae"),
        tiny_decoder: None,
        decoder: Decoder::Vae,
        scheduler: Scheduler::load(&dir.join("scheduler/scheduler_config.json")).expect("scheduler"),
        force_zeros_for_empty_prompt: true,
    };
    Pipeline::new(parts, &cpu)
}

#[test]
fn encode_prompt_matches_diffusers() {
    for model in MODELS {
        let pipeline = load(&fixtures().join(model));
        let g = golden(&format!("{model}/text.safetensors"));
        let prompt = "a photo of a cat wearing a tiny hat";
        for (negative, key) in [(Some("blurry"), "blurry"), (None, "zeros")] {
            let text = pipeline.encode_prompt(prompt, negative, true).expect("encode");
            let expected_context = Tensor::cat(
                &[
                    &g[&format!("encode_cat_{key}_negative_prompt_embeds")],
                    &g[&format!("encode_cat_{key}_prompt_embeds")],
                ],
                0,
            )
            .unwrap();
            let expected_pooled = Tensor::cat(
                &[&g[&format!("encode_cat_{key}_negative_pooled")], &g[&format!("encode_cat_{key}_pooled")]],
                0,
            )
            .unwrap();
            assert_close(&format!("{model} {key} context"), &text.context, &expected_context, TEXT_TOL);
            assert_close(&format!("{model} {key} pooled"), &text.pooled, &expected_pooled, TEXT_TOL);
        }
    }
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    noise: String,
    latents: Option<String>,
}

#[test]
fn latents_after_each_step_match_diffusers() {
    for model in MODELS {
        let pipeline = load(&fixtures().join(model));
        let cases_path = fixtures().join("golden").join(model).join("cases.json");
        let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(cases_path).unwrap()).unwrap();
        let case = cases.iter().find(|c| c.latents.is_some()).expect("a traced case");
        let traced = golden(&format!("{model}/{}", case.latents.as_ref().unwrap()));
        let noise = golden(&format!("{model}/{}", case.noise))["noise"].clone();
        let request = Generation {
            prompt: &case.prompt,
            negative_prompt: case.negative_prompt.as_deref(),
            width: case.width,
            height: case.height,
            steps: case.steps,
            guidance: case.guidance,
            source: None,
            sampler: Sampler::Euler,
            schedule: Default::default(),
            seed: 0,
        };
        let mut seen = 0;
        pipeline
            .generate(&request, &noise, &mut |progress| {
                let i = progress.step - 1;
                assert_close(&format!("{model} step {i}"), progress.latents, &traced[&format!("step_{i}")], LATENT_TOL);
                seen += 1;
                std::ops::ControlFlow::Continue(())
            })
            .expect("txt2img");
        assert_eq!(seen, case.steps);
    }
}

#[test]
fn a_step_callback_that_breaks_cancels_the_run() {
    let pipeline = load(&fixtures().join("tiny-sdxl"));
    let noise = Tensor::zeros(&pipeline.latent_shape(64, 64), DType::F32, &Device::Cpu).unwrap();
    let request = Generation {
        prompt: "a cat",
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 4,
        guidance: 0.0,
        source: None,
        sampler: Sampler::Euler,
        schedule: Default::default(),
        seed: 0,
    };
    let mut seen = Vec::new();
    let result = pipeline.generate(&request, &noise, &mut |progress| {
        seen.push(progress.step);
        if progress.step == 2 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    });
    assert!(matches!(result, Err(sdxl_models::Error::Cancelled)), "got {result:?}");
    assert_eq!(seen, [1, 2], "no step runs after the callback breaks");
}
