//! Input images: decoding PNG, JPEG and WebP bytes within limits, conversion to RGB and of
//! masks to gray as PIL converts them, and Lanczos resizing to the generation size.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits};
use sdxl_models::pixels::{GrayImage, RgbImage};

use crate::{Error, Result};

/// The largest input accepted along each side, and the most memory one decode may take.
/// A file that declares more is refused from its header, before any pixel is decoded.
pub const MAX_INPUT_SIDE: u32 = 8192;
/// 256 MiB: an 8192² RGBA image; 16-bit images of that size are refused.
const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;

fn decode(bytes: &[u8], field: &str) -> Result<DynamicImage> {
    let invalid = |message: String| Error::InvalidRequest(format!("`{field}` {message}"));
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(format!("cannot be read: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        _ => return Err(invalid("is not a PNG, JPEG or WebP image".into())),
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = reader;
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => invalid(format!(
            "is larger than {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} pixels or needs too much memory to decode"
        )),
        other => invalid(format!("is not a valid image: {other}")),
    })
}

/// Decodes an input image to 8-bit RGB; alpha is dropped, 16-bit and gray are converted.
pub fn decode_rgb(bytes: &[u8], field: &str) -> Result<RgbImage> {
    let rgb = decode(bytes, field)?.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    Ok(RgbImage { width, height, pixels: rgb.into_raw() })
}

/// How a client's mask marks the area to repaint, where it differs from this engine's white.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskMarks {
    /// Black repaints (AUTOMATIC1111's `inpainting_mask_invert`).
    Black,
    /// Fully transparent pixels repaint (OpenAI's edits); the mask must have an alpha channel.
    Transparent,
}

/// A client's mask re-encoded in this engine's convention, as PNG bytes for
/// [`crate::RawRequest::mask`]: inverted for [`MaskMarks::Black`] (every channel, so gray
/// conversion inverts too), white where alpha is 0 and black elsewhere for
/// [`MaskMarks::Transparent`].
pub fn convert_mask(bytes: &[u8], field: &str, marks: MaskMarks) -> Result<Vec<u8>> {
    let decoded = decode(bytes, field)?;
    let converted = match marks {
        MaskMarks::Black => {
            let mut rgb = decoded.to_rgb8();
            rgb.pixels_mut().for_each(|p| p.0 = p.0.map(|c| 255 - c));
            DynamicImage::ImageRgb8(rgb)
        }
        MaskMarks::Transparent => {
            if !decoded.color().has_alpha() {
                return Err(Error::InvalidRequest(format!(
                    "`{field}` must have an alpha channel: its fully transparent pixels mark what to edit"
                )));
            }
            let rgba = decoded.to_rgba8();
            let gray = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([if rgba.get_pixel(x, y).0[3] == 0 { 255 } else { 0 }])
            });
            DynamicImage::ImageLuma8(gray)
        }
    };
    let mut png = Vec::new();
    converted
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(png)
}

/// A mask in gray, as PIL's `convert("L")` computes it (ITU-R 601-2 luma in 16-bit fixed
/// point), so a colour mask binarises exactly as diffusers binarises it. diffusers resizes a
/// mask in its own mode and converts it afterwards, so call this after [`resize_rgb`].
pub fn to_gray(mask: &RgbImage) -> GrayImage {
    let pixels = mask.pixels.chunks_exact(3).map(|p| pil_luma([p[0], p[1], p[2]])).collect();
    GrayImage { width: mask.width, height: mask.height, pixels }
}

/// PIL's `L24`: `(R·19595 + G·38470 + B·7471 + 0x8000) >> 16`.
fn pil_luma([r, g, b]: [u8; 3]) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// Resizes with a Lanczos-3 filter (diffusers resizes with PIL's `LANCZOS`); same size is a copy.
pub fn resize_rgb(image: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    if (image.width, image.height) == (width, height) {
        return Ok(image.clone());
    }
    let buffer = image::RgbImage::from_raw(image.width as u32, image.height as u32, image.pixels.clone())
        .ok_or_else(|| Error::InvalidRequest("image buffer does not match its size".into()))?;
    let resized = image::imageops::resize(&buffer, width as u32, height as u32, FilterType::Lanczos3);
    Ok(RgbImage { width, height, pixels: resized.into_raw() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn pil_luma_matches_pil_values() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
        assert_eq!(pil_luma([255, 255, 255]), 255);
        assert_eq!(pil_luma([255, 0, 0]), 76);
        assert_eq!(pil_luma([0, 255, 0]), 150);
        assert_eq!(pil_luma([0, 0, 255]), 29);
        assert_eq!(pil_luma([128, 128, 128]), 128);
    }

    #[test]
    fn gray_keeps_gray_values() {
        let mask = RgbImage { width: 2, height: 1, pixels: vec![127, 127, 127, 200, 0, 0] };
        assert_eq!(to_gray(&mask).pixels, vec![127, 60]);
    }

    #[test]
    fn rgba_drops_alpha() {
        let rgba = image::RgbaImage::from_raw(1, 1, vec![10, 20, 30, 0]).unwrap();
        let decoded = decode_rgb(&png(DynamicImage::ImageRgba8(rgba)), "image").unwrap();
        assert_eq!(decoded.pixels, vec![10, 20, 30]);
    }

    #[test]
    fn garbage_is_refused_naming_the_field() {
        let err = decode_rgb(b"definitely not an image", "image").unwrap_err();
        assert!(err.to_string().starts_with("`image` is not a PNG, JPEG or WebP image"), "{err}");
    }

    #[test]
    fn oversized_header_is_refused_before_decoding() {
        // A PNG header declaring 100000×100000 with no pixel data behind it.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        bytes.extend(13u32.to_be_bytes());
        bytes.extend(&ihdr);
        bytes.extend(crc32(&ihdr).to_be_bytes());
        let err = decode_rgb(&bytes, "image").unwrap_err();
        assert!(err.to_string().contains("larger than 8192x8192"), "{err}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn masks_convert_to_white_means_repaint() {
        let encode = |image: DynamicImage| {
            let mut png = Vec::new();
            image.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
            png
        };
        let gray_of = |png: &[u8]| decode_rgb(png, "m").map(|rgb| to_gray(&rgb).pixels).unwrap();
        // transparent (alpha 0) is the edit area, whatever its colour
        let rgba =
            image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba(if x == 0 { [9, 9, 9, 0] } else { [0, 0, 0, 255] }));
        let png = convert_mask(&encode(DynamicImage::ImageRgba8(rgba)), "mask", MaskMarks::Transparent).unwrap();
        assert_eq!(gray_of(&png), vec![255, 0]);
        let opaque = encode(DynamicImage::ImageRgb8(image::RgbImage::new(2, 1)));
        let err = convert_mask(&opaque, "mask", MaskMarks::Transparent).unwrap_err();
        assert!(err.to_string().contains("`mask` must have an alpha channel"), "{err}");
        let black_white = image::RgbImage::from_fn(2, 1, |x, _| image::Rgb(if x == 0 { [0; 3] } else { [255; 3] }));
        let png = convert_mask(&encode(DynamicImage::ImageRgb8(black_white)), "mask", MaskMarks::Black).unwrap();
        assert_eq!(gray_of(&png), vec![255, 0]);
    }
}
