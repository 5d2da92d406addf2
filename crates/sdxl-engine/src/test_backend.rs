//! A stand-in for the model, for load and fault tests of the server (`test-backend` feature):
//! every denoising step is a sleep of a fixed length, cancellation is honoured between steps
//! like the real pipeline, and the image is a small one derived from the prompt and seed, so
//! equal requests get equal bytes. The queue, worker, HTTP and PNG paths are the real ones.

use std::ops::ControlFlow;
use std::time::Duration;

use sdxl_models::pixels::RgbImage;

use crate::queue::Step;
use crate::{Backend, Error, GenerateRequest, NoiseSource, Result};

/// Side of the square image every request gets.
const SIDE: usize = 8;

pub struct DelayBackend {
    /// How long each denoising step takes.
    pub step: Duration,
}

impl Backend for DelayBackend {
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        for step in 1..=request.steps {
            std::thread::sleep(self.step);
            if on_step(&Step { done: step, total: request.steps, latents: None }).is_break() {
                return Err(Error::Cancelled);
            }
        }
        let seed = match &request.noise {
            NoiseSource::Seed(seed) => *seed,
            NoiseSource::File(_) => 0,
        };
        // FNV-1a over the prompt and seed, then one byte per pixel channel
        let mut state = request
            .prompt
            .bytes()
            .chain(seed.to_le_bytes())
            .fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
        let pixels = (0..SIDE * SIDE * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 56) as u8
            })
            .collect();
        Ok(RgbImage { width: SIDE, height: SIDE, pixels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, RawRequest};

    fn request(prompt: &str, seed: u64, steps: usize) -> GenerateRequest {
        let raw = RawRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            width: Some(64),
            height: Some(64),
            steps,
            guidance: 0.0,
            noise: NoiseSource::Seed(seed),
            image: None,
            mask: None,
            strength: None,
            sampling: Default::default(),
        };
        GenerateRequest::parse(raw, &Limits::CLI).unwrap()
    }

    #[test]
    fn equal_requests_give_equal_images_and_each_step_is_reported() {
        let mut backend = DelayBackend { step: Duration::from_millis(1) };
        let mut steps = Vec::new();
        let a = backend.generate(&request("cat", 1, 3), &mut |s| {
            steps.push((s.done, s.total));
            ControlFlow::Continue(())
        });
        assert_eq!(steps, [(1, 3), (2, 3), (3, 3)]);
        let a = a.unwrap();
        let again = backend.generate(&request("cat", 1, 3), &mut |_| ControlFlow::Continue(())).unwrap();
        let other = backend.generate(&request("cat", 2, 3), &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(a, again);
        assert_ne!(a, other);
    }

    #[test]
    fn a_break_cancels_at_that_step() {
        let mut backend = DelayBackend { step: Duration::from_millis(1) };
        let mut seen = 0;
        let result = backend.generate(&request("cat", 1, 5), &mut |s| {
            seen = s.done;
            if s.done == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(matches!(result, Err(Error::Cancelled)));
        assert_eq!(seen, 2);
    }
}
