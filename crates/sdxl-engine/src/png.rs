//! PNG encoding of generated images.

use std::io::Cursor;

use image::{ImageFormat, RgbImage as ImageBuffer};
use sdxl_models::pixels::RgbImage;

use crate::{Error, Result};

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

    #[test]
    fn rejects_a_buffer_of_the_wrong_length() {
        let image = RgbImage { width: 2, height: 2, pixels: vec![0; 3] };
        assert!(matches!(encode(&image), Err(Error::Encode(_))));
    }
}
