#![no_main]
//! See bitnet_wgpu::fuzz_targets::gguf for the input format.

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitnet_wgpu::fuzz_targets::gguf(data));
