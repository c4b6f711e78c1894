//! bitnet-wgpu: a runtime for BitNet b1.58 ternary language models.
//!
//! Data flow, one module per step: `config` + `load` (read a Hugging Face model folder) →
//! `ternary` (2-bit packed weights, int8 activations) → `backend` (CPU, later wgpu: the ops) →
//! `model` (the forward pass, written once over the backend trait) → `sampler` → `generate`.

pub mod bench;
pub mod energy;
