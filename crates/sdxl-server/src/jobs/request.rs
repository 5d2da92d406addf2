//! A job's request as the store keeps it: the fields of the run request after the server's
//! defaults were applied and the seed was drawn, so every run of the job is the same
//! generation. Input images keep their encoded bytes (base64 in the JSON).

use base64::Engine as _;
use sdxl_engine::{NoiseSource, RawRequest, Sampling};
use serde::{Deserialize, Serialize};

use super::StoreError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub guidance: f64,
    /// A string: JSON readers elsewhere (PostgreSQL's, JavaScript) lose 64-bit integers.
    pub seed: String,
    pub strength: Option<f64>,
    /// Base64 of the encoded input image.
    pub image: Option<String>,
    /// Base64 of the encoded mask.
    pub mask: Option<String>,
    /// The sampler and schedule names; absent in jobs stored before there were more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

impl StoredRequest {
    /// `raw` with its noise given by `seed`.
    pub fn new(raw: &RawRequest, seed: u64) -> Self {
        let encode = |bytes: &Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
        StoredRequest {
            prompt: raw.prompt.clone(),
            negative_prompt: raw.negative_prompt.clone(),
            width: raw.width,
            height: raw.height,
            steps: raw.steps,
            guidance: raw.guidance,
            seed: seed.to_string(),
            strength: raw.strength,
            image: raw.image.as_ref().map(encode),
            mask: raw.mask.as_ref().map(encode),
            sampler: Some(raw.sampling.sampler.name().into()),
            schedule: Some(raw.sampling.schedule.name().into()),
        }
    }

    pub fn seed(&self) -> Result<u64, StoreError> {
        self.seed.parse().map_err(|_| StoreError(format!("bad seed {:?} in a stored request", self.seed)))
    }

    /// Back to the engine's raw request.
    pub fn to_raw(&self) -> Result<RawRequest, StoreError> {
        let decode = |text: &String| {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| StoreError(format!("bad image in a stored request: {e}")))
        };
        Ok(RawRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            noise: NoiseSource::Seed(self.seed()?),
            image: self.image.as_ref().map(decode).transpose()?,
            mask: self.mask.as_ref().map(decode).transpose()?,
            strength: self.strength,
            sampling: Sampling::parse(self.sampler.as_deref(), self.schedule.as_deref())
                .map_err(|e| StoreError(format!("bad sampling in a stored request: {e}")))?,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a stored request serialises")
    }

    pub fn from_json(text: &str) -> Result<Self, StoreError> {
        serde_json::from_str(text).map_err(|e| StoreError(format!("bad stored request: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_the_store() {
        let raw = RawRequest {
            prompt: "a cat".into(),
            negative_prompt: Some("dog".into()),
            width: None,
            height: Some(512),
            steps: 4,
            guidance: 1.5,
            noise: NoiseSource::Seed(0),
            image: Some(vec![1, 2, 3, 255]),
            mask: Some(vec![0]),
            strength: Some(0.5),
            sampling: Sampling::parse(Some("dpmpp_2m_sde"), Some("karras")).unwrap(),
        };
        let stored = StoredRequest::new(&raw, u64::MAX);
        let back = StoredRequest::from_json(&stored.to_json()).unwrap();
        assert_eq!(back, stored);
        let again = back.to_raw().unwrap();
        assert_eq!(again.noise, NoiseSource::Seed(u64::MAX));
        assert_eq!(again.sampling, raw.sampling);
        assert_eq!((again.image, again.mask), (raw.image, raw.mask));
        assert_eq!((again.width, again.height, again.steps, again.strength), (None, Some(512), 4, Some(0.5)));
    }
}
