//! A validated generation request: every field within its bounds, so code past this point
//! never re-checks user input.

use std::path::PathBuf;

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
    pub min_side: usize,
    pub max_side: usize,
    pub max_steps: usize,
    pub max_guidance: f64,
}

impl Limits {
    /// `sdxl generate`: any size from 8 to 4096 pixels, 1 to 100 steps.
    pub const CLI: Limits = Limits { min_side: 8, max_side: 4096, max_steps: 100, max_guidance: 30.0 };
}

/// The fields of a request as a front end received them.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub noise: NoiseSource,
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
}

impl GenerateRequest {
    /// Checks `raw` against `limits`; the error names the field and the bound.
    pub fn parse(raw: RawRequest, limits: &Limits) -> Result<Self> {
        let side = |field: &str, value: usize| {
            if (limits.min_side..=limits.max_side).contains(&value) {
                Ok(value)
            } else {
                Err(Error::InvalidRequest(format!(
                    "`{field}` must be between {} and {}, got {value}",
                    limits.min_side, limits.max_side
                )))
            }
        };
        let width = side("width", raw.width)?;
        let height = side("height", raw.height)?;
        if !(1..=limits.max_steps).contains(&raw.steps) {
            return Err(Error::InvalidRequest(format!(
                "`steps` must be between 1 and {}, got {}",
                limits.max_steps, raw.steps
            )));
        }
        if !raw.guidance.is_finite() || !(0.0..=limits.max_guidance).contains(&raw.guidance) {
            return Err(Error::InvalidRequest(format!(
                "`guidance` must be between 0 and {}, got {}",
                limits.max_guidance, raw.guidance
            )));
        }
        Ok(Self {
            prompt: raw.prompt,
            negative_prompt: raw.negative_prompt,
            width,
            height,
            steps: raw.steps,
            guidance: raw.guidance,
            noise: raw.noise,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawRequest {
        RawRequest {
            prompt: "a cat".into(),
            negative_prompt: None,
            width: 1024,
            height: 1024,
            steps: 4,
            guidance: 0.0,
            noise: NoiseSource::Seed(1),
        }
    }

    #[test]
    fn accepts_the_defaults() {
        assert!(GenerateRequest::parse(raw(), &Limits::CLI).is_ok());
    }

    #[test]
    fn errors_name_the_field_and_bound() {
        let err = GenerateRequest::parse(RawRequest { width: 4100, ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`width` must be between 8 and 4096, got 4100");
        let err = GenerateRequest::parse(RawRequest { height: 7, ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`height` must be between 8 and 4096, got 7");
        let err = GenerateRequest::parse(RawRequest { steps: 0, ..raw() }, &Limits::CLI).unwrap_err();
        assert_eq!(err.to_string(), "`steps` must be between 1 and 100, got 0");
        let err = GenerateRequest::parse(RawRequest { guidance: f64::NAN, ..raw() }, &Limits::CLI).unwrap_err();
        assert!(err.to_string().starts_with("`guidance` must be between 0 and 30"));
    }
}
