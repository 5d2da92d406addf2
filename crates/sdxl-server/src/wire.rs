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
    #[serde(default, deserialize_with = "optional_integer")]
    pub height: Option<usize>,
    /// The width of the generated image in pixels (default: the input image's, else 1024).
    #[schema(minimum = 256, maximum = 2048)]
    #[serde(default, deserialize_with = "optional_integer")]
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
    #[serde(default, deserialize_with = "optional_integer")]
    pub num_steps: Option<usize>,
    /// How strongly to transform the input image, 0-1.
    #[schema(minimum = 0.0, maximum = 1.0, default = 1.0)]
    pub strength: Option<f64>,
    /// Classifier-free guidance scale; guidance runs only above 1.
    #[schema(minimum = 0.0, maximum = 30.0, default = 7.5)]
    pub guidance: Option<f64>,
    /// Random seed for reproducibility (0 to 2^64-1); random when absent.
    #[serde(default, deserialize_with = "optional_integer")]
    pub seed: Option<u64>,
    /// The sampler (an extension): euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddim, unipc or
    /// lcm, each as its diffusers scheduler class computes it (default euler).
    pub sampler: Option<String>,
    /// The schedule (an extension): model (the model's own), karras, leading, linspace or
    /// trailing; `karras` needs a sampler that has it.
    pub schedule: Option<String>,
}

/// An optional integer field as JSON Schema's `integer` means it: `1024`, `1024.0` and
/// `1.024e3` are the same number, so any number without a fractional part is taken, however it
/// is written; absent or `null` is `None`. (serde alone refuses `1024.0` for a `usize`.)
pub fn optional_integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct IntegerVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for IntegerVisitor<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a non-negative integer of at most {} bits", std::mem::size_of::<T>() * 8)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
            T::try_from(value).map(Some).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(value), &self))
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
            match u64::try_from(value) {
                Ok(value) => self.visit_u64(value),
                Err(_) => Err(E::invalid_value(de::Unexpected::Signed(value), &self)),
            }
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
            // 2^64 is the first float past u64::MAX
            if value.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&value) {
                self.visit_u64(value as u64)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(value), &self))
            }
        }
    }
    deserializer.deserialize_option(IntegerVisitor(std::marker::PhantomData))
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
    if nested_deeper_than(body, MAX_NESTING) {
        return Err(ApiError::BadRequest(format!("JSON body is nested deeper than {MAX_NESTING} levels")));
    }
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

/// The deepest nesting of arrays and objects a body may have. The schema needs two levels;
/// serde_json refuses over 128 in the fields it reads, but skips unknown fields at any depth.
pub const MAX_NESTING: usize = 32;

/// Whether `json` opens more than `max` arrays or objects inside one another (outside
/// strings); a linear scan that stops at the first level too deep.
fn nested_deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
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
    fn integers_may_be_written_as_floats() {
        let ok: RunRequest =
            parse_json(br#"{"prompt":"x","width":512.0,"height":5.12e2,"num_steps":4,"seed":null}"#).unwrap();
        assert_eq!((ok.width, ok.height, ok.num_steps, ok.seed), (Some(512), Some(512), Some(4), None));
        let ok: RunRequest = parse_json(br#"{"prompt":"x","seed":18446744073709551615}"#).unwrap();
        assert_eq!(ok.seed, Some(u64::MAX));
        for bad in [
            r#"{"prompt":"x","width":512.5}"#,
            r#"{"prompt":"x","width":-1}"#,
            r#"{"prompt":"x","seed":18446744073709551616}"#,
            r#"{"prompt":"x","seed":1e20}"#,
        ] {
            let err = parse_json::<RunRequest>(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("invalid value") && err.contains("non-negative integer"), "{bad}: {err}");
        }
        let err = parse_json::<RunRequest>(br#"{"prompt":"x","num_steps":"4"}"#).unwrap_err();
        assert!(err.to_string().starts_with("`num_steps`: invalid type: string"), "{err}");
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
    fn deep_nesting_is_refused_even_in_unknown_fields() {
        let deep = |n: usize| format!(r#"{{"prompt":"x","extra":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        let err = parse_json::<RunRequest>(deep(MAX_NESTING).as_bytes()).unwrap_err();
        assert_eq!(err.to_string(), "JSON body is nested deeper than 32 levels");
        assert!(parse_json::<RunRequest>(deep(MAX_NESTING - 1).as_bytes()).is_ok());
        // brackets inside strings, escaped quotes included, do not count
        let quoted = format!(r#"{{"prompt":"\"{}"}}"#, "[".repeat(100));
        assert!(parse_json::<RunRequest>(quoted.as_bytes()).is_ok());
    }

    #[test]
    fn base64_accepts_data_urls_and_missing_padding() {
        assert_eq!(decode_base64("image_b64", "data:image/png;base64,AAE=").unwrap(), vec![0, 1]);
        assert_eq!(decode_base64("image_b64", "AAE").unwrap(), vec![0, 1]);
        assert!(decode_base64("image_b64", "***").is_err());
    }
}
