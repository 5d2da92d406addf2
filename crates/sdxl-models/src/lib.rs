//! SDXL on candle, faithful to diffusers.
//!
//! Numerics policy: timestep embeddings are computed in f32; scheduler tables are built as
//! diffusers builds them (numpy f64 where numpy computes, rounded to f32 where diffusers stores
//! f32); the VAE decodes in f32. The UNet and text encoders run in the compute dtype chosen at
//! load time.

pub mod checkpoint;
pub mod clip;
pub mod error;
pub mod noise;

pub use error::{Error, Result};
pub mod config;
pub mod key_map;
pub mod lora;
pub mod nn;
pub mod pipeline;
pub mod pixels;
mod random_weights;
pub mod scheduler;
pub mod sgm;
pub mod unet;
pub mod vae;
pub mod weights;
