//! Every case of tests/gpu_kernels.rs again with the kernels' workgroup-memory reductions (the
//! fallback for devices without subgroups, or `BITNET_GPU_NO_SUBGROUPS=1`), so that both
//! variants of shaders/reduce_*.wgsl are checked against the CPU on a device that has
//! subgroups (lavapipe in CI).

include!("gpu_kernels.rs");
