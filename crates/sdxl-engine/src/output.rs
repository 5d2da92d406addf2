//! The file formats an image can be answered in: PNG (the default, with the generation
//! parameters in a text chunk), JPEG at a chosen quality, and lossless WebP.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};
use sdxl_models::pixels::RgbImage;

use crate::{Error, Result};

/// An output file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Png,
    /// JPEG at `quality` 1-100.
    Jpeg { quality: u8 },
    /// Lossless WebP (the `image` crate encodes no lossy WebP).
    Webp,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg { .. } => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg { .. } => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    /// Encodes `image`; only PNG carries `parameters`.
    pub fn encode(self, image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
        let (width, height) = (image.width as u32, image.height as u32);
        let mut bytes = Vec::new();
        let encode_error = |e: image::ImageError| Error::Encode(e.to_string());
        match self {
            OutputFormat::Png => return crate::png::encode_with_parameters(image, parameters),
            OutputFormat::Jpeg { quality } => JpegEncoder::new_with_quality(&mut bytes, quality.clamp(1, 100))
                .write_image(&image.pixels, width, height, ExtendedColorType::Rgb8)
                .map_err(encode_error)?,
            OutputFormat::Webp => WebPEncoder::new_lossless(Cursor::new(&mut bytes))
                .write_image(&image.pixels, width, height, ExtendedColorType::Rgb8)
                .map_err(encode_error)?,
        }
        Ok(bytes)
    }
}

/// The media type of an encoded image, from its first bytes.
pub fn content_type_of(bytes: &[u8]) -> &'static str {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        _ => "image/png",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_decodes_to_the_image() {
        let image = RgbImage { width: 16, height: 8, pixels: (0..16 * 8 * 3).map(|i| (i % 251) as u8).collect() };
        for format in [OutputFormat::Png, OutputFormat::Jpeg { quality: 90 }, OutputFormat::Webp] {
            let bytes = format.encode(&image, "p").unwrap();
            assert_eq!(content_type_of(&bytes), format.content_type());
            let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!((decoded.width(), decoded.height()), (16, 8));
            if format != (OutputFormat::Jpeg { quality: 90 }) {
                assert_eq!(decoded.into_raw(), image.pixels, "{format:?} is lossless");
            }
        }
    }
}
