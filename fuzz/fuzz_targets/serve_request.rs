#![no_main]
//! See bitnet_wgpu::fuzz_targets::serve_request for the input format.

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitnet_wgpu::fuzz_targets::serve_request(data));
