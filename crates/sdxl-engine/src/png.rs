//! PNG encoding of generated images.

use std::io::Cursor;

use image::{ImageFormat, RgbImage as ImageBuffer};
use sdxl_models::pipeline::RgbImage;

use crate::{Error, Result};

/// Encodes `image` as an 8-bit RGB PNG.
pub fn encode(image: &RgbImage) -> Result<Vec<u8>> {
    let buffer = ImageBuffer::from_raw(image.width as u32, image.height as u32, image.pixels.clone())
        .ok_or_else(|| Error::InvalidRequest("image buffer does not match its size".into()))?;
    let mut bytes = Cursor::new(Vec::new());
    buffer
        .write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| Error::InvalidRequest(format!("PNG encoding failed: {e}")))?;
    Ok(bytes.into_inner())
}
