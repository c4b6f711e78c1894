//! bitnet-wgpu: a runtime for BitNet b1.58 ternary language models.
//!
//! Data flow, one module per step: [`config`] + [`load`] (read a Hugging Face model folder,
//! memory-mapped) → [`ternary`] (2-bit packed weights, int8 activations) → [`backend`] (the ops,
//! on the CPU or the GPU) → [`model`] (the forward pass, written once over the backend trait) →
//! [`sampler`] → [`engine`] (generation). [`tokenizer`] turns text and chats into ids.

pub mod backend;
pub mod bench;
pub mod config;
pub mod energy;
pub mod engine;
pub mod error;
pub mod fuzz_targets;
pub mod gguf;
pub mod load;
pub mod model;
pub mod npy;
pub mod perplexity;
pub mod pull;
pub mod sampler;
pub mod serve;
pub mod synthetic;
pub mod ternary;
pub mod tokenizer;

pub use error::{BitnetError, Result};
