//! The WGSL kernels: sources (one kernel family per file under `shaders/`, compiled into the
//! binary with `include_str!`), their binding signatures, and the caches of shader modules,
//! bind group layouts and pipelines.
//!
//! A pipeline is specialised by WGSL `override` constants (shape numbers such as `COLS`, `HD`,
//! `EPS`) and cached under (kernel, constants): a model creates a handful of pipelines at its
//! first step and none afterwards. Bind group layouts are created once per binding signature
//! and shared by every kernel with that signature.

use std::collections::HashMap;

use crate::error::{BitnetError, Result};

/// Prepended to every kernel file: the `Step` uniform and the 2-D workgroup fold.
const PRELUDE: &str = include_str!("../../../shaders/common.wgsl");
/// Prepended after it: the variant's `Thread`, `thread_index`, `wg_reduce`, `lanes_reduce` and
/// `wg_argmax`, built on subgroup operations where the device has them, else on workgroup
/// memory; the typed reductions kernels call (`wg_sum_f32`, `lanes_sum_i32`, ...) are in
/// common.wgsl over them, so the kernels are the same either way.
const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/reduce_subgroup.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../../shaders/reduce_workgroup.wgsl");

/// How a kernel uses one binding (its index is the position in [`Kernel::bindings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bind {
    Uniform,
    Read,
    ReadWrite,
}

/// One entry point of one shader file.
#[derive(Debug)]
pub struct Kernel {
    /// File name under `shaders/`, for messages.
    pub file: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Bind],
}

use Bind::{Read as R, ReadWrite as RW, Uniform as U};

macro_rules! kernel {
    ($name:ident, $file:literal, $entry:literal, [$($b:expr),* $(,)?]) => {
        pub static $name: Kernel = Kernel {
            file: $file,
            source: include_str!(concat!("../../../shaders/", $file)),
            entry: $entry,
            bindings: &[$($b),*],
        };
    };
}

// Binding 0 is always the Step uniform. Shapes of the other bindings are in the .wgsl files.
kernel!(ROW_OPS, "row_ops.wgsl", "row_ops", [U, R, R, RW, RW, RW]);
kernel!(MATVEC, "ternary_matmul.wgsl", "matvec", [U, U, R, R, R, RW]);
kernel!(
    MATMUL_TILED,
    "ternary_matmul.wgsl",
    "matmul_tiled",
    [U, U, R, R, R, RW]
);
kernel!(
    MATVEC_MULTI,
    "ternary_matmul.wgsl",
    "matvec_multi",
    [U, U, R, R, R, RW]
);
kernel!(
    MATVEC_MULTI_QKV,
    "ternary_matmul.wgsl",
    "matvec_multi_qkv",
    [U, U, R, R, R, RW, R, R, RW, RW]
);
kernel!(
    MATVEC_QKV,
    "ternary_matmul.wgsl",
    "matvec_qkv",
    [U, U, R, R, R, RW, R, R, RW, RW]
);
kernel!(
    MATMUL_TILED_QKV,
    "ternary_matmul.wgsl",
    "matmul_tiled_qkv",
    [U, U, R, R, R, RW, R, R, RW, RW]
);
// the prologue variants: q / meta written (3, 4), the f32 input and norm weight at 10, 11
// (6..9 are the q|k|v extras, dummies for matvec_pro)
kernel!(
    MATVEC_PRO,
    "ternary_matmul.wgsl",
    "matvec_pro",
    [U, U, R, RW, RW, RW, R, R, RW, RW, R, R]
);
kernel!(
    MATVEC_QKV_PRO,
    "ternary_matmul.wgsl",
    "matvec_qkv_pro",
    [U, U, R, RW, RW, RW, R, R, RW, RW, R, R]
);
kernel!(ATTEND, "attention.wgsl", "attend", [U, R, R, R, RW, R]);
kernel!(
    ATTEND_TILED,
    "attention.wgsl",
    "attend_tiled",
    [U, R, R, R, RW, R]
);
kernel!(
    ATTEND_SPLIT,
    "attention.wgsl",
    "attend_split",
    [U, R, R, R, RW, R]
);
kernel!(
    ATTEND_COMBINE,
    "attention.wgsl",
    "attend_combine",
    [U, R, RW, R]
);
kernel!(EMBED, "embedding.wgsl", "embed", [U, U, R, R, RW]);
kernel!(
    LM_HEAD,
    "embedding.wgsl",
    "lm_head",
    [U, U, R, R, RW, R, R, RW]
);
kernel!(
    ARGMAX_PARTIAL,
    "argmax.wgsl",
    "argmax_partial",
    [U, R, RW, RW]
);
kernel!(ARGMAX_FINAL, "argmax.wgsl", "argmax_final", [U, R, RW, RW]);
kernel!(SAMPLE, "sample.wgsl", "sample_token", [U, RW, R, R, R, RW]);
kernel!(REDUCE_CHECK, "reduce_check.wgsl", "reduce_check", [U, RW]);

/// Every kernel, for tests that compile them all.
pub static ALL: [&Kernel; 19] = [
    &ROW_OPS,
    &MATVEC,
    &MATMUL_TILED,
    &MATVEC_QKV,
    &MATVEC_MULTI,
    &MATVEC_MULTI_QKV,
    &MATMUL_TILED_QKV,
    &MATVEC_PRO,
    &MATVEC_QKV_PRO,
    &ATTEND,
    &ATTEND_TILED,
    &ATTEND_SPLIT,
    &ATTEND_COMBINE,
    &EMBED,
    &LM_HEAD,
    &ARGMAX_PARTIAL,
    &ARGMAX_FINAL,
    &SAMPLE,
    &REDUCE_CHECK,
];

/// Override constants of one pipeline: (name, value). Values are f64 as wgpu takes them; every
/// u32 and f32 is exactly representable.
pub type Constants = Vec<(&'static str, f64)>;

/// Most override constants one pipeline sets.
pub const MAX_CONSTANTS: usize = 12;

/// (file, entry, constants as (name, f64 bits), padded with ("", 0)): a fixed-size key, so a
/// lookup on the per-token path allocates nothing.
type PipelineKey = (
    &'static str,
    &'static str,
    [(&'static str, u64); MAX_CONSTANTS],
);

/// Shader modules, layouts and pipelines, created on first use and kept for the device's life.
pub struct PipelineCache {
    /// Kernels are built with reduce_subgroup.wgsl (else reduce_workgroup.wgsl).
    subgroups: bool,
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    layouts: HashMap<&'static [Bind], (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
}

impl PipelineCache {
    pub fn new(subgroups: bool) -> Self {
        PipelineCache {
            subgroups,
            modules: HashMap::new(),
            layouts: HashMap::new(),
            pipelines: HashMap::new(),
        }
    }

    /// Whether the kernels use subgroup operations.
    pub fn subgroups(&self) -> bool {
        self.subgroups
    }

    /// The bind group layout of `k` (shared by all kernels with the same signature).
    pub fn bind_group_layout(
        &mut self,
        device: &wgpu::Device,
        k: &'static Kernel,
    ) -> wgpu::BindGroupLayout {
        self.layout(device, k.bindings).0.clone()
    }

    fn layout(
        &mut self,
        device: &wgpu::Device,
        sig: &'static [Bind],
    ) -> &(wgpu::BindGroupLayout, wgpu::PipelineLayout) {
        self.layouts.entry(sig).or_insert_with(|| {
            let entries: Vec<wgpu::BindGroupLayoutEntry> = sig
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                    binding: i as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: match b {
                            Bind::Uniform => wgpu::BufferBindingType::Uniform,
                            Bind::Read => wgpu::BufferBindingType::Storage { read_only: true },
                            Bind::ReadWrite => {
                                wgpu::BufferBindingType::Storage { read_only: false }
                            }
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("bitnet bind group layout"),
                entries: &entries,
            });
            let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("bitnet pipeline layout"),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
            (bgl, pl)
        })
    }

    /// The pipeline of `k` specialised with `constants`; compile errors become `BitnetError::Gpu`.
    pub fn pipeline(
        &mut self,
        device: &wgpu::Device,
        k: &'static Kernel,
        constants: &[(&'static str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        assert!(
            constants.len() <= MAX_CONSTANTS,
            "{}: too many constants",
            k.entry
        );
        let mut consts = [("", 0u64); MAX_CONSTANTS];
        for (slot, &(n, v)) in consts.iter_mut().zip(constants) {
            *slot = (n, v.to_bits());
        }
        let key: PipelineKey = (k.file, k.entry, consts);
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        if !self.modules.contains_key(k.file) {
            let reduce = if self.subgroups {
                REDUCE_SUBGROUP
            } else {
                REDUCE_WORKGROUP
            };
            let source = format!("{PRELUDE}\n{reduce}\n{}", k.source);
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(k.file),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            self.modules.insert(k.file, module);
        }
        let layout = self.layout(device, k.bindings).1.clone();
        let module = &self.modules[k.file];
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.entry),
            layout: Some(&layout),
            module,
            entry_point: Some(k.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            // A module that failed to compile stays broken: forget it so that the message repeats.
            self.modules.remove(k.file);
            return Err(BitnetError::Gpu(format!(
                "kernel {}::{} {constants:?}: {e}",
                k.file, k.entry
            )));
        }
        self.pipelines.insert(key, pipeline.clone());
        Ok(pipeline)
    }

    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }
}
