//! A validated generation request: every field within its bounds, so code past this point
//! never re-checks user input.

use std::path::PathBuf;

use sdxl_models::pixels::RgbImage;
pub use sdxl_models::scheduler::{Sampler, ScheduleKind, Spacing};

use crate::images::decode_rgb;
use crate::{Error, Result};

/// Where the initial noise comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum NoiseSource {
    /// `torch.randn` with a CPU generator seeded with this value.
    Seed(u64),
    /// A safetensors file holding one f32 tensor `noise` of the latent shape.
    File(PathBuf),
}

/// The bounds a front end accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Width and height when neither the request nor an input image gives one.
    pub default_side: usize,
    pub min_side: usize,
    pub max_side: usize,
    pub max_steps: usize,
    pub max_guidance: f64,
    /// What the front end calls the step count in messages (`steps`, `num_steps`).
    pub steps_field: &'static str,
}

impl Limits {
    /// `sdxl generate`: any size from 8 to 4096 pixels, 1 to 100 steps.
    /// The Workers AI schema: 256–2048 pixels a side, 1–20 `num_steps`.
    pub const SERVER: Limits = Limits {
        default_side: 1024,
        min_side: 256,
        max_side: 2048,
        max_steps: 20,
        max_guidance: 30.0,
        steps_field: "num_steps",
    };

    pub const CLI: Limits = Limits {
        default_side: 1024,
        min_side: 8,
        max_side: 4096,
        max_steps: 100,
        max_guidance: 30.0,
        steps_field: "steps",
    };
}

/// The longest `prompt` or `negative_prompt` accepted, in characters. The text encoders read
/// 77 tokens (a few hundred characters) and drop the rest, so this only stops a client from
/// making the worker tokenise megabytes of text that would be thrown away.
pub const MAX_PROMPT_CHARS: usize = 10_000;

/// A seed for requests that give none, from the process's random hasher keys and the clock.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The sampler and schedule of a request (default: Euler on the model's schedule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sampling {
    pub sampler: Sampler,
    pub schedule: ScheduleKind,
}

impl Sampling {
    /// From the request fields `sampler` and `schedule` (absent: the defaults); an unknown
    /// name, or a pair diffusers does not offer, is an error that names the field and lists
    /// the valid values.
    pub fn parse(sampler: Option<&str>, schedule: Option<&str>) -> Result<Self> {
        let sampler = match sampler {
            None => Sampler::default(),
            Some(name) => Sampler::parse(name).ok_or_else(|| {
                let valid: Vec<&str> = Sampler::ALL.iter().map(|s| s.name()).collect();
                out_of_bounds("sampler", format!("one of {}", valid.join(", ")), format!("{name:?}"))
            })?,
        };
        let schedule = match schedule {
            None => ScheduleKind::default(),
            Some(name) => ScheduleKind::parse(name).ok_or_else(|| {
                let valid: Vec<&str> = ScheduleKind::ALL.iter().map(|s| s.name()).collect();
                out_of_bounds("schedule", format!("one of {}", valid.join(", ")), format!("{name:?}"))
            })?,
        };
        if !sampler.supports(schedule) {
            let valid: Vec<&str> =
                ScheduleKind::ALL.iter().filter(|k| sampler.supports(**k)).map(|k| k.name()).collect();
            return Err(out_of_bounds(
                "schedule",
                format!("one of {} with the sampler {:?}", valid.join(", "), sampler.name()),
                format!("{:?} ({})", schedule.name(), sdxl_models::scheduler::unsupported_pair(sampler, schedule)),
            ));
        }
        Ok(Sampling { sampler, schedule })
    }
}

/// The fields of a request as a front end received them.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// `None`: the input image's width, or the default.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub guidance: f64,
    pub noise: NoiseSource,
    /// Encoded PNG, JPEG or WebP bytes of the img2img / inpainting input.
    pub image: Option<Vec<u8>>,
    /// Encoded bytes of the inpainting mask (white = repaint).
    pub mask: Option<Vec<u8>>,
    /// img2img / inpainting strength, 0–1 (default 1); ignored without an image.
    pub strength: Option<f64>,
    pub sampling: Sampling,
}

/// A decoded input image with its strength and optional mask, at their own sizes.
#[derive(Debug, Clone)]
pub struct SourceImage {
    pub image: RgbImage,
    pub strength: f64,
    /// The mask as decoded (colour kept: diffusers converts it to gray after resizing).
    pub mask: Option<RgbImage>,
}

/// A request whose every field is within [`Limits`].
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub noise: NoiseSource,
    pub source: Option<SourceImage>,
    pub sampling: Sampling,
}

impl GenerateRequest {
    /// Checks `raw` against `limits`; the error names the field and the bound.
    pub fn parse(raw: RawRequest, limits: &Limits) -> Result<Self> {
        for (field, text) in [("prompt", Some(&raw.prompt)), ("negative_prompt", raw.negative_prompt.as_ref())] {
            let chars = text.map_or(0, |t| t.chars().count());
            if chars > MAX_PROMPT_CHARS {
                return Err(out_of_bounds(field, format!("at most {MAX_PROMPT_CHARS} characters long"), chars));
            }
        }
        if !(1..=limits.max_steps).contains(&raw.steps) {
            return Err(out_of_bounds(limits.steps_field, format!("between 1 and {}", limits.max_steps), raw.steps));
        }
        if !raw.guidance.is_finite() || !(0.0..=limits.max_guidance).contains(&raw.guidance) {
            return Err(out_of_bounds("guidance", format!("between 0 and {}", limits.max_guidance), raw.guidance));
        }
        let source = parse_source(&raw, limits.steps_field)?;
        // Sizes default to the input image's, clamped into range, else to the default.
        let default_size = |image_side: Option<usize>| {
            image_side.map_or(limits.default_side, |s| s.clamp(limits.min_side, limits.max_side))
        };
        let width = raw.width.unwrap_or_else(|| default_size(source.as_ref().map(|s| s.image.width)));
        let height = raw.height.unwrap_or_else(|| default_size(source.as_ref().map(|s| s.image.height)));
        let side = |field: &str, value: usize| {
            if (limits.min_side..=limits.max_side).contains(&value) {
                Ok(value)
            } else {
                Err(out_of_bounds(field, format!("between {} and {}", limits.min_side, limits.max_side), value))
            }
        };
        Ok(Self {
            width: side("width", width)?,
            height: side("height", height)?,
            prompt: raw.prompt,
            negative_prompt: raw.negative_prompt,
            steps: raw.steps,
            guidance: raw.guidance,
            noise: raw.noise,
            source,
            sampling: raw.sampling,
        })
    }
}

/// [`Error::OutOfBounds`] for `field`.
fn out_of_bounds(field: &str, bound: String, got: impl std::fmt::Display) -> Error {
    Error::OutOfBounds { field: field.into(), bound, got: got.to_string() }
}

/// Decodes the input image and mask and checks the strength against the step count.
fn parse_source(raw: &RawRequest, steps_field: &str) -> Result<Option<SourceImage>> {
    let Some(image_bytes) = &raw.image else {
        if raw.mask.is_some() {
            return Err(Error::InvalidRequest("`mask` requires `image`".into()));
        }
        return Ok(None);
    };
    let strength = raw.strength.unwrap_or(1.0);
    if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
        return Err(out_of_bounds("strength", "between 0 and 1".into(), strength));
    }
    // diffusers runs the last min(int(steps · strength), steps) timesteps
    if ((raw.steps as f64) * strength) as usize == 0 {
        return Err(Error::InvalidRequest(format!(
            "`strength` × `{steps_field}` must be at least 1 (int({} × {strength}) = 0)",
            raw.steps
        )));
    }
    let image = decode_rgb(image_bytes, "image")?;
    let mask = raw.mask.as_deref().map(|bytes| decode_rgb(bytes, "mask")).transpose()?;
    // A mask of another size would be stretched over the image: almost always a client's
    // mistake (the wrong file, or a mask drawn for another crop), so it is refused.
    if let Some(mask) = mask.as_ref().filter(|m| (m.width, m.height) != (image.width, image.height)) {
        return Err(Error::InvalidRequest(format!(
            "`mask` must be the size of `image` ({}x{}), got {}x{}",
            image.width, image.height, mask.width, mask.height
        )));
    }
    Ok(Some(SourceImage { image, strength, mask }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawRequest {
        RawRequest {
            prompt: "a cat".into(),
            negative_prompt: None,
            width: None,
            height: None,
            steps: 4,
            guidance: 0.0,
            noise: NoiseSource::Seed(1),
            image: None,
            mask: None,
            strength: None,
            sampling: Default::default(),
        }
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(width, height).write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn size_defaults_to_the_input_image_clamped() {
        let parsed = GenerateRequest::parse(RawRequest { image: Some(png(40, 5)), ..raw() }, &Limits::CLI).unwrap();
        assert_eq!((parsed.width, parsed.height), (40, 8));
        let parsed = GenerateRequest::parse(raw(), &Limits::CLI).unwrap();
        assert_eq!((parsed.width, parsed.height), (1024, 1024));
    }

    #[test]
    fn mask_without_image_is_refused() {
        let err = GenerateRequest::parse(RawRequest { mask: Some(png(8, 8)), ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`mask` requires `image`");
    }

    #[test]
    fn prompts_are_bounded_in_length() {
        let long = "a".repeat(MAX_PROMPT_CHARS + 1);
        let err = GenerateRequest::parse(RawRequest { prompt: long.clone(), ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`prompt` must be at most 10000 characters long, got 10001");
        let request = RawRequest { negative_prompt: Some(long), ..raw() };
        let err = GenerateRequest::parse(request, &Limits::CLI).unwrap_err();
        assert!(err.to_string().starts_with("`negative_prompt` must be at most 10000"), "{err}");
        let fits = RawRequest { prompt: "é".repeat(MAX_PROMPT_CHARS), ..raw() };
        assert!(GenerateRequest::parse(fits, &Limits::CLI).is_ok());
    }

    #[test]
    fn mask_of_another_size_than_the_image_is_refused() {
        let request = RawRequest { image: Some(png(16, 8)), mask: Some(png(8, 16)), ..raw() };
        let err = GenerateRequest::parse(request, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`mask` must be the size of `image` (16x8), got 8x16");
        let request = RawRequest { image: Some(png(16, 8)), mask: Some(png(16, 8)), ..raw() };
        assert!(GenerateRequest::parse(request, &Limits::CLI).is_ok());
    }

    #[test]
    fn strength_must_leave_a_step() {
        let request = RawRequest { image: Some(png(8, 8)), strength: Some(0.2), ..raw() };
        let err = GenerateRequest::parse(request, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`strength` × `steps` must be at least 1 (int(4 × 0.2) = 0)");
        let request = RawRequest { image: Some(png(8, 8)), strength: Some(1.5), ..raw() };
        let err = GenerateRequest::parse(request, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`strength` must be between 0 and 1, got 1.5");
    }

    #[test]
    fn accepts_the_defaults() {
        assert!(GenerateRequest::parse(raw(), &Limits::CLI).is_ok());
    }

    #[test]
    fn errors_name_the_field_and_bound() {
        let err = GenerateRequest::parse(RawRequest { width: Some(4100), ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`width` must be between 8 and 4096, got 4100");
        let err = GenerateRequest::parse(RawRequest { height: Some(7), ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`height` must be between 8 and 4096, got 7");
        let err = GenerateRequest::parse(RawRequest { steps: 0, ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`steps` must be between 1 and 100, got 0");
        let err = GenerateRequest::parse(RawRequest { guidance: f64::NAN, ..raw() }, &Limits::CLI).unwrap_err();
        assert!(err.to_string().starts_with("`guidance` must be between 0 and 30"));
    }
}
