//! Golden test: the tiny decoder (TAESD-XL) against diffusers' `AutoencoderTiny` as the SDXL
//! pipeline decodes with it: `vae.decode(latents / scaling_factor)`, then
//! `VaeImageProcessor.postprocess` to 8-bit RGB. Fixtures: `tools/parity/make_tiny_decoder_fixtures.py`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, golden, Tol};
use sdxl_models::nn::div_scalar;
use sdxl_models::pixels::RgbImage;
use sdxl_models::vae::tiny::{TinyDecoder, TinyDecoderConfig};

/// f32 decoder output against torch f32.
const TOL: Tol = Tol { atol: 1e-4, rtol: 1e-3 };
/// 8-bit images: the largest and the mean difference allowed, in levels of 255. A value that
/// lands within float noise of a rounding boundary may round the other way; nothing else may
/// differ.
const MAX_LEVELS: u8 = 3;
const MEAN_LEVELS: f64 = 0.1;

const CASES: [&str; 3] = ["square_16x16", "wide_8x24", "batch2_odd_5x7"];

fn model_dir() -> PathBuf {
    fixtures().join("tiny-taesd")
}

fn decoder() -> TinyDecoder {
    TinyDecoder::load(&model_dir(), &Device::Cpu).expect("load the tiny decoder")
}

/// What the pipeline does after the last step: `latents / scaling_factor`, decode, bytes;
/// `[B,H,W,3]` interleaved, images one after another.
fn decode_to_bytes(decoder: &TinyDecoder, latents: &Tensor) -> Vec<u8> {
    let scaled = div_scalar(latents, decoder.config().scaling_factor as f32).unwrap();
    let decoded = decoder.decode(&scaled).expect("decode");
    (0..decoded.dim(0).unwrap())
        .flat_map(|i| RgbImage::from_tensor(&decoded.narrow(0, i, 1).unwrap()).expect("to bytes").pixels)
        .collect()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    assert_eq!(t.dtype(), DType::U8);
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// (largest, mean) absolute difference in levels.
fn difference(actual: &[u8], expected: &[u8]) -> (u8, f64) {
    assert_eq!(actual.len(), expected.len(), "image sizes");
    let max = actual.iter().zip(expected).map(|(a, e)| a.abs_diff(*e)).max().unwrap_or(0);
    let sum: u64 = actual.iter().zip(expected).map(|(a, e)| u64::from(a.abs_diff(*e))).sum();
    (max, sum as f64 / actual.len() as f64)
}

fn assert_images_match(what: &str, actual: &[u8], expected: &[u8]) {
    let (max, mean) = difference(actual, expected);
    eprintln!("{what}: max {max}, mean {mean:.5} levels over {} values", actual.len());
    assert!(
        max <= MAX_LEVELS && mean <= MEAN_LEVELS,
        "{what}: max {max}, mean {mean} levels (allowed {MAX_LEVELS}, {MEAN_LEVELS})"
    );
}

#[test]
fn decoded_images_match_diffusers() {
    let decoder = decoder();
    let g = golden("tiny-taesd/decode.safetensors");
    for case in CASES {
        let latents = &g[&format!("{case}_latents")];
        let expected = &g[&format!("{case}_image")];
        let (b, _, h, w) = latents.dims4().unwrap();
        assert_eq!(expected.dims(), [b, 8 * h, 8 * w, 3], "{case}: golden image shape");
        assert_images_match(case, &decode_to_bytes(&decoder, latents), &bytes(expected));
    }
}

#[test]
fn decoder_output_matches_diffusers_in_f32() {
    let decoder = decoder();
    let g = golden("tiny-taesd/decode.safetensors");
    let case = "batch2_odd_5x7";
    let decoded = decoder.decode(&g[&format!("{case}_latents")]).expect("decode"); // scaling_factor 1
    let expected = &g[&format!("{case}_decoded")];
    let gap = (&decoded - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("{case}: f32 max |difference| {gap:e}");
    assert_close(case, &decoded, expected, TOL);
}

#[test]
fn pipeline_latents_decode_to_diffusers_image() {
    // tiny-sdxl's txt2img with `pipe.vae = AutoencoderTiny(...)`: its final latents, decoded
    let decoder = decoder();
    let g = golden("tiny-taesd/pipeline.safetensors");
    assert_images_match(
        "pipeline_g0_64x64_4steps",
        &decode_to_bytes(&decoder, &g["final_latents"]),
        &bytes(&g["image"]),
    );
}

#[test]
fn one_changed_latent_changes_the_image_and_batches_decode_alone() {
    let decoder = decoder();
    let g = golden("tiny-taesd/decode.safetensors");
    let latents = &g["square_16x16_latents"];
    let original = decode_to_bytes(&decoder, latents);
    // nudge latent (channel 0, row 5, column 7) by 0.5
    let mut values = latents.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[5 * 16 + 7] += 0.5;
    let nudged = Tensor::from_vec(values, latents.dims(), &Device::Cpu).unwrap();
    let changed = decode_to_bytes(&decoder, &nudged);
    let moved = original.iter().zip(&changed).filter(|(a, b)| a != b).count();
    assert!(moved > 100, "nudging one latent changed only {moved} pixel values");

    // batch of two equals two singles, bit for bit
    let pair = &g["batch2_odd_5x7_latents"];
    let both = decoder.decode(pair).unwrap();
    for i in 0..2 {
        let alone = decoder.decode(&pair.narrow(0, i, 1).unwrap()).unwrap();
        let gap = (both.narrow(0, i, 1).unwrap() - alone).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(gap.to_scalar::<f32>().unwrap(), 0.0, "image {i} of the batch");
    }
}

#[test]
fn reads_the_config_of_the_fixture() {
    let config = decoder().config().clone();
    assert_eq!(config.decoder_block_out_channels, [8; 4]);
    assert_eq!(config.num_decoder_blocks, [3, 3, 3, 1]);
    assert_eq!((config.latent_channels, config.scaling_factor, config.scale_factor()), (4, 1.0, 8));
}

/// The fixture's tensors, and a writer for variants of them.
fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir().join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap()
}

fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

#[test]
fn the_original_taesd_layout_loads_to_the_same_decoder() {
    // taesdxl_decoder.safetensors: decoder only, `decoder.layers.{i}` stored as `{i+1}`
    let tmp = tempfile::tempdir().unwrap();
    let original: HashMap<String, Tensor> = fixture_tensors()
        .into_iter()
        .filter_map(|(name, t)| {
            let rest = name.strip_prefix("decoder.layers.")?;
            let (index, tail) = rest.split_once('.')?;
            Some((format!("{}.{tail}", index.parse::<usize>().unwrap() + 1), t))
        })
        .collect();
    let path = write(tmp.path(), "taesd_decoder.safetensors", &original);
    let config = TinyDecoderConfig::load(&model_dir().join("config.json")).unwrap();
    let from_original = TinyDecoder::load_file(&path, config.clone(), &Device::Cpu).expect("original layout");
    let from_single_diffusers_file =
        TinyDecoder::load_file(&model_dir().join("diffusion_pytorch_model.safetensors"), config, &Device::Cpu)
            .expect("diffusers layout");
    let latents = &golden("tiny-taesd/decode.safetensors")["wide_8x24_latents"];
    let expected = decode_to_bytes(&decoder(), latents);
    assert_eq!(decode_to_bytes(&from_original, latents), expected);
    assert_eq!(decode_to_bytes(&from_single_diffusers_file, latents), expected);
}

#[test]
fn missing_or_unexpected_decoder_tensors_are_errors_that_name_them() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TinyDecoderConfig::load(&model_dir().join("config.json")).unwrap();

    let mut missing = fixture_tensors();
    missing.remove("decoder.layers.6.weight").expect("the first upsampling convolution");
    let path = write(tmp.path(), "missing.safetensors", &missing);
    let error = TinyDecoder::load_file(&path, config.clone(), &Device::Cpu).err().expect("a missing tensor fails");
    assert!(error.to_string().contains("decoder.layers.6.weight"), "{error}");

    // a bias on a convolution diffusers builds with bias=False
    let mut extra = fixture_tensors();
    extra.insert("decoder.layers.6.bias".into(), Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap());
    let path = write(tmp.path(), "extra.safetensors", &extra);
    let error = TinyDecoder::load_file(&path, config.clone(), &Device::Cpu).err().expect("an unused tensor fails");
    assert!(error.to_string().contains("decoder.layers.6.bias"), "{error}");

    // a config that does not match the shapes (TAESD-XL's 64 channels against the fixture's 8)
    let wrong = TinyDecoderConfig::default();
    let path = model_dir().join("diffusion_pytorch_model.safetensors");
    let error = TinyDecoder::load_file(&path, wrong, &Device::Cpu).err().expect("a shape mismatch fails");
    assert!(error.to_string().contains("decoder.layers.0.weight"), "{error}");
}
