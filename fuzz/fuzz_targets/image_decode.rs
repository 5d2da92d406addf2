//! Encoded PNG, JPEG or WebP bytes as a client uploads them. Decoding must never panic, and
//! what decodes must be within `MAX_INPUT_SIDE` with an RGB buffer of exactly its size.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sdxl_engine::images::{decode_rgb, MAX_INPUT_SIDE};

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = decode_rgb(data, "image") {
        let max = MAX_INPUT_SIDE as usize;
        assert!(image.width <= max && image.height <= max, "{}x{} decoded", image.width, image.height);
        assert_eq!(image.pixels.len(), image.width * image.height * 3, "buffer size");
    }
});
