//! A Workers AI run-route body, through everything a client controls: JSON schema, base64,
//! image and mask decoding, and the bounds of `Limits::SERVER`. It must never panic; what it
//! accepts must be within bounds, and what it refuses must be the client's fault (4xx).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sdxl_engine::{Limits, NoiseSource};
use sdxl_server::{validate_run_body, ServerConfig};

fuzz_target!(|data: &[u8]| {
    let config = ServerConfig::default();
    match validate_run_body(data, &config) {
        Ok((request, seed)) => {
            let limits = Limits::SERVER;
            let sides = limits.min_side..=limits.max_side;
            assert!(sides.contains(&request.width), "width {} out of bounds", request.width);
            assert!(sides.contains(&request.height), "height {} out of bounds", request.height);
            assert!((1..=limits.max_steps).contains(&request.steps), "steps {} out of bounds", request.steps);
            assert!(
                request.guidance.is_finite() && (0.0..=limits.max_guidance).contains(&request.guidance),
                "guidance {} out of bounds",
                request.guidance
            );
            assert!(!request.prompt.is_empty(), "empty prompt accepted");
            for text in std::iter::once(&request.prompt).chain(&request.negative_prompt) {
                assert!(text.chars().count() <= sdxl_engine::request::MAX_PROMPT_CHARS, "overlong prompt accepted");
            }
            assert_eq!(request.noise, NoiseSource::Seed(seed), "seed header differs from the noise seed");
            if let Some(max) = config.max_pixels {
                assert!(request.width * request.height <= max);
            }
            if let Some(source) = &request.source {
                let image = &source.image;
                assert!(
                    source.strength.is_finite() && (0.0..=1.0).contains(&source.strength),
                    "strength {} out of bounds",
                    source.strength
                );
                assert!(((request.steps as f64) * source.strength) as usize >= 1, "no step left to run");
                assert_eq!(image.pixels.len(), image.width * image.height * 3, "image buffer size");
                if let Some(mask) = &source.mask {
                    assert_eq!((mask.width, mask.height), (image.width, image.height), "mask size");
                    assert_eq!(mask.pixels.len(), mask.width * mask.height * 3, "mask buffer size");
                }
            }
        }
        Err(error) => {
            let (status, _code) = error.status_and_code();
            assert!(status.is_client_error(), "refused with {status}: {error}");
        }
    }
});
