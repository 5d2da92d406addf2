//! CLIP: the BPE tokenizer and the two SDXL text encoders.

pub mod tokenizer;
pub mod text_model;
