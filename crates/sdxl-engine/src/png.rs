//! PNG encoding of generated images, and the text chunk that records how one was made.

use std::io::Cursor;

use image::{ImageFormat, RgbImage as ImageBuffer};
use sdxl_models::pixels::RgbImage;

use crate::{Error, GenerateRequest, NoiseSource, Result};

/// Keyword of the text chunk holding the generation parameters, in the text format that
/// AUTOMATIC1111's web UI writes and that model sites and other SDXL tools read.
pub const PARAMETERS_KEY: &str = "parameters";

/// How `request` was generated with `model`, as AUTOMATIC1111 writes it: the prompt, a
/// `Negative prompt:` line when there is one, then
/// `Steps: 4, Sampler: Euler, CFG scale: 0, Seed: 42, Size: 1024x1024, Model: name`
/// (no seed for noise read from a file; the strength of an img2img run last).
pub fn parameters_text(request: &GenerateRequest, model: &str) -> String {
    let mut text = request.prompt.clone();
    if let Some(negative) = &request.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    text.push_str(&format!("\nSteps: {}, Sampler: {}", request.steps, request.sampling.sampler.label()));
    if let Some(schedule) = request.sampling.schedule.label() {
        text.push_str(&format!(", Schedule type: {schedule}"));
    }
    text.push_str(&format!(", CFG scale: {}", request.guidance));
    if let NoiseSource::Seed(seed) = request.noise {
        text.push_str(&format!(", Seed: {seed}"));
    }
    text.push_str(&format!(", Size: {}x{}, Model: {model}", request.width, request.height));
    if let Some(source) = &request.source {
        text.push_str(&format!(", Denoising strength: {}", source.strength));
    }
    text
}

/// Encodes `image` as an 8-bit RGB PNG with `parameters` in an uncompressed UTF-8 (iTXt)
/// chunk before the image data.
pub fn encode_with_parameters(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let encode_error = |e: png::EncodingError| Error::Encode(e.to_string());
    if image.pixels.len() != image.width * image.height * 3 {
        return Err(Error::Encode(format!(
            "{} bytes do not make a {}x{} RGB image",
            image.pixels.len(),
            image.width,
            image.height
        )));
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.add_itxt_chunk(PARAMETERS_KEY.to_string(), parameters.to_string()).map_err(encode_error)?;
    let mut writer = encoder.write_header().map_err(encode_error)?;
    writer.write_image_data(&image.pixels).map_err(encode_error)?;
    writer.finish().map_err(encode_error)?;
    Ok(bytes)
}

/// The text of a PNG's `parameters` chunk (UTF-8 or Latin-1, anywhere in the file), if it
/// has one.
pub fn read_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let invalid = |e: png::DecodingError| Error::InvalidRequest(format!("not a readable PNG: {e}"));
    let mut reader = png::Decoder::new(Cursor::new(png_bytes)).read_info().map_err(invalid)?;
    // chunks after the image data are read too (the pixels are skipped)
    reader.finish().map_err(invalid)?;
    let info = reader.info();
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some).map_err(invalid);
    }
    if let Some(chunk) = info.uncompressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return Ok(Some(chunk.text.clone()));
    }
    match info.compressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        Some(chunk) => chunk.get_text().map(Some).map_err(invalid),
        None => Ok(None),
    }
}

/// Encodes `image` as an 8-bit RGB PNG.
pub fn encode(image: &RgbImage) -> Result<Vec<u8>> {
    let buffer =
        ImageBuffer::from_raw(image.width as u32, image.height as u32, image.pixels.clone()).ok_or_else(|| {
            Error::Encode(format!(
                "{} bytes do not make a {}x{} RGB image",
                image.pixels.len(),
                image.width,
                image.height
            ))
        })?;
    let mut bytes = Cursor::new(Vec::new());
    buffer.write_to(&mut bytes, ImageFormat::Png).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_decodable_png() {
        let image = RgbImage { width: 2, height: 1, pixels: vec![255, 0, 0, 0, 0, 255] };
        let png = encode(&image).unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (2, 1));
        assert_eq!(decoded.as_raw(), &image.pixels);
    }

    fn request(negative: Option<&str>, noise: NoiseSource) -> GenerateRequest {
        let raw = crate::RawRequest {
            prompt: "a café at dusk".into(),
            negative_prompt: negative.map(String::from),
            width: Some(1024),
            height: Some(768),
            steps: 4,
            guidance: 0.0,
            noise,
            image: None,
            mask: None,
            strength: None,
            sampling: Default::default(),
        };
        GenerateRequest::parse(raw, &crate::Limits::CLI).unwrap()
    }

    #[test]
    fn parameters_are_written_as_automatic1111_does() {
        let text = parameters_text(&request(Some("blurry"), NoiseSource::Seed(42)), "sdxl-lightning");
        assert_eq!(
            text,
            "a café at dusk\nNegative prompt: blurry\n\
             Steps: 4, Sampler: Euler, CFG scale: 0, Seed: 42, Size: 1024x768, Model: sdxl-lightning"
        );
        let from_file = parameters_text(&request(None, NoiseSource::File("n.safetensors".into())), "m");
        assert_eq!(from_file, "a café at dusk\nSteps: 4, Sampler: Euler, CFG scale: 0, Size: 1024x768, Model: m");
    }

    #[test]
    fn parameters_survive_a_round_trip_and_the_pixels_are_unchanged() {
        let image = RgbImage { width: 3, height: 2, pixels: (0..18).map(|v| v * 13).collect() };
        let text = "a café\nSteps: 4, Seed: 1";
        let png = encode_with_parameters(&image, text).unwrap();
        assert_eq!(read_parameters(&png).unwrap().as_deref(), Some(text));
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded.as_raw(), &image.pixels);
        // a PNG without the chunk has none, and bytes that are no PNG are an error
        assert_eq!(read_parameters(&encode(&image).unwrap()).unwrap(), None);
        assert!(read_parameters(b"not a png").is_err());
    }

    #[test]
    fn rejects_a_buffer_of_the_wrong_length() {
        let image = RgbImage { width: 2, height: 2, pixels: vec![0; 3] };
        assert!(matches!(encode(&image), Err(Error::Encode(_))));
        assert!(matches!(encode_with_parameters(&image, "x"), Err(Error::Encode(_))));
    }
}
