//! CLIP: the BPE tokenizer and the two SDXL text encoders.

pub mod text_model;
pub mod tokenizer;
