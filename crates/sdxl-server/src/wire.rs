//! The request bodies as clients send them, parsed straight into bounded types: image and
//! mask byte arrays become `Vec<u8>` element by element (never a generic JSON value), and
//! every schema error names its field.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::ApiError;

/// The Workers AI input of `@cf/bytedance/stable-diffusion-xl-lightning`. Unknown fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RunRequest {
    /// A text description of the image you want to generate.
    #[schema(min_length = 1)]
    pub prompt: String,
    /// Text describing elements to avoid in the generated image.
    pub negative_prompt: Option<String>,
    /// The height of the generated image in pixels (default: the input image's, else 1024).
    #[schema(minimum = 256, maximum = 2048)]
    pub height: Option<usize>,
    /// The width of the generated image in pixels (default: the input image's, else 1024).
    #[schema(minimum = 256, maximum = 2048)]
    pub width: Option<usize>,
    /// For img2img: the bytes of a PNG, JPEG or WebP file, as integers 0-255.
    #[schema(value_type = Option<Vec<u8>>)]
    pub image: Option<ByteArray>,
    /// For img2img: the same file, base64-encoded (a `data:` prefix is allowed).
    pub image_b64: Option<String>,
    /// For inpainting: the bytes of the mask image (white = repaint), as integers 0-255.
    #[schema(value_type = Option<Vec<u8>>)]
    pub mask: Option<ByteArray>,
    /// The number of diffusion steps.
    #[schema(minimum = 1, maximum = 20, default = 20)]
    pub num_steps: Option<usize>,
    /// How strongly to transform the input image, 0-1.
    #[schema(minimum = 0.0, maximum = 1.0, default = 1.0)]
    pub strength: Option<f64>,
    /// Classifier-free guidance scale; guidance runs only above 1.
    #[schema(minimum = 0.0, maximum = 30.0, default = 7.5)]
    pub guidance: Option<f64>,
    /// Random seed for reproducibility (0 to 2^64-1); random when absent.
    pub seed: Option<u64>,
}

/// Bytes sent as a JSON array of integers 0-255.
#[derive(Debug, Default)]
pub struct ByteArray(pub Vec<u8>);

impl<'de> Deserialize<'de> for ByteArray {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = ByteArray;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of integers between 0 and 255")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteArray, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(value) = seq.next_element::<f64>()? {
                    if value.fract() != 0.0 || !(0.0..=255.0).contains(&value) {
                        return Err(de::Error::custom(format!(
                            "items must be integers between 0 and 255, got {value}"
                        )));
                    }
                    bytes.push(value as u8);
                }
                Ok(ByteArray(bytes))
            }
        }
        deserializer.deserialize_seq(BytesVisitor)
    }
}

/// Parses a JSON body; errors name the field path (`width: invalid type: …`).
pub fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::BadRequest(format!("`{path}`: {inner}"))
        }
    })
}

/// Decodes `image_b64`: standard base64, padding optional, an optional `data:…;base64,` prefix.
pub fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(payload.trim()).map_err(|e| ApiError::BadRequest(format!("`{field}` is not valid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_arrays_are_bounded() {
        let ok: RunRequest = parse_json(br#"{"prompt":"x","image":[0,255,7.0]}"#).unwrap();
        assert_eq!(ok.image.unwrap().0, vec![0, 255, 7]);
        let err = parse_json::<RunRequest>(br#"{"prompt":"x","image":[1,300]}"#).unwrap_err();
        assert!(err.to_string().starts_with("`image`: items must be integers between 0 and 255, got 300"), "{err}");
        let err = parse_json::<RunRequest>(br#"{"prompt":"x","mask":[1.5]}"#).unwrap_err();
        assert!(err.to_string().starts_with("`mask`: items must be integers"), "{err}");
    }

    #[test]
    fn schema_errors_name_the_field() {
        let err = parse_json::<RunRequest>(br#"{"prompt":"x","width":"wide"}"#).unwrap_err();
        assert!(err.to_string().starts_with("`width`: invalid type"), "{err}");
        let err = parse_json::<RunRequest>(br#"{"width":256}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `prompt`"), "{err}");
        let err = parse_json::<RunRequest>(b"not json").unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON body"), "{err}");
    }

    #[test]
    fn base64_accepts_data_urls_and_missing_padding() {
        assert_eq!(decode_base64("image_b64", "data:image/png;base64,AAE=").unwrap(), vec![0, 1]);
        assert_eq!(decode_base64("image_b64", "AAE").unwrap(), vec![0, 1]);
        assert!(decode_base64("image_b64", "***").is_err());
    }
}
