//! Finding a GPU: listing adapters, choosing one (`auto` never picks a software rasteriser,
//! `gpu` accepts one), and estimating whether a model fits.

use crate::config::ModelConfig;
use crate::model::ModelOptions;

/// The backends searched: Vulkan, Metal, DX12 (and whatever `WGPU_BACKEND` names instead).
/// GL is left out: its compute support is too uneven for these kernels.
pub fn backends() -> wgpu::Backends {
    wgpu::Backends::PRIMARY.with_env()
}

pub fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

/// What `bitnet info` shows about one adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    /// "Vulkan", "Metal", "Dx12", ...
    pub backend: String,
    /// "DiscreteGpu", "IntegratedGpu", "VirtualGpu", "Cpu", "Other".
    pub device_type: String,
    pub driver: String,
    /// A software rasteriser (llvmpipe/lavapipe, SwiftShader, WARP): `auto` never picks it.
    pub software: bool,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    /// (min, max) subgroup size where the adapter has `Features::SUBGROUP`.
    pub subgroups: Option<(u32, u32)>,
    /// The kernels' tile sizes a backend on this adapter uses (environment overrides included).
    pub tiles: super::TileShapes,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}{}; driver {}; max buffer {} MiB, max binding {} MiB; {})",
            self.name,
            self.backend,
            self.device_type,
            if self.software { ", software" } else { "" },
            if self.driver.is_empty() {
                "?"
            } else {
                &self.driver
            },
            self.max_buffer_size >> 20,
            self.max_storage_buffer_binding_size >> 20,
            match self.subgroups {
                Some((lo, hi)) if lo == hi => format!("subgroups of {lo}"),
                Some((lo, hi)) => format!("subgroups of {lo}-{hi}"),
                None => "no subgroups".to_string(),
            }
        )
    }
}

/// Is this a software adapter? `DeviceType::Cpu` or a known software driver name (lavapipe
/// reports itself as "llvmpipe", WARP as "Microsoft Basic Render Driver").
pub fn is_software(info: &wgpu::AdapterInfo) -> bool {
    if info.device_type == wgpu::DeviceType::Cpu {
        return true;
    }
    let name = format!("{} {}", info.name, info.driver).to_lowercase();
    [
        "llvmpipe",
        "lavapipe",
        "swiftshader",
        "softpipe",
        "basic render",
        "warp",
    ]
    .iter()
    .any(|s| name.contains(s))
}

pub fn summarize(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let limits = a.limits();
    let software = is_software(&info);
    AdapterSummary {
        tiles: super::TileShapes::for_adapter(info.device_type, software, &limits)
            .with_env(&limits),
        software,
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        max_buffer_size: limits.max_buffer_size,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        subgroups: a
            .features()
            .contains(wgpu::Features::SUBGROUP)
            .then_some((info.subgroup_min_size, info.subgroup_max_size)),
    }
}

fn enumerate() -> Vec<wgpu::Adapter> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(backends()))
}

/// Every adapter wgpu finds on this machine.
pub fn list_adapters() -> Vec<AdapterSummary> {
    enumerate().iter().map(summarize).collect()
}

/// Which adapters may be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The best hardware GPU (discrete, then integrated, then virtual); never a software one.
    Auto,
    /// Any GPU, software rasterisers included (last), e.g. lavapipe in CI.
    Gpu,
}

/// Preference rank of an adapter under `choice` (lower is better); None = not eligible.
pub fn rank(choice: AdapterChoice, device_type: wgpu::DeviceType, software: bool) -> Option<u8> {
    if software {
        return (choice == AdapterChoice::Gpu).then_some(10);
    }
    Some(match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => return (choice == AdapterChoice::Gpu).then_some(10),
    })
}

/// Picks an adapter. `name_substring` (case-insensitive) restricts the candidates. The error
/// says why none qualified and lists what was found.
pub fn select_adapter(
    choice: AdapterChoice,
    name_substring: Option<&str>,
) -> Result<wgpu::Adapter, String> {
    let all = enumerate();
    if all.is_empty() {
        return Err(
            "no GPU adapter found (no Vulkan/Metal/DX12 driver; on Linux install \
             mesa-vulkan-drivers for a software one)"
                .into(),
        );
    }
    let found: Vec<String> = all.iter().map(|a| summarize(a).to_string()).collect();
    let mut best: Option<(u8, usize)> = None;
    for (i, a) in all.iter().enumerate() {
        let info = a.get_info();
        if let Some(s) = name_substring {
            if !info.name.to_lowercase().contains(&s.to_lowercase()) {
                continue;
            }
        }
        if let Some(r) = rank(choice, info.device_type, is_software(&info)) {
            if best.is_none_or(|(b, _)| r < b) {
                best = Some((r, i));
            }
        }
    }
    match best {
        Some((_, i)) => Ok(all.into_iter().nth(i).expect("index from enumerate")),
        None => {
            let why = match (name_substring, choice) {
                (Some(s), _) => format!("no adapter name contains {s:?}"),
                (None, AdapterChoice::Auto) => {
                    "only software adapters found (auto never uses one; --device gpu does)".into()
                }
                (None, AdapterChoice::Gpu) => "no usable adapter".into(),
            };
            Err(format!("{why}; found: {}", found.join("; ")))
        }
    }
}

/// Device memory a model needs on this backend, by kind (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    pub ternary: u64,
    pub embedding: u64,
    pub kv_cache: u64,
    pub activations: u64,
    /// The largest single buffer (must be ≤ max_buffer_size; the float matrices are chunked so
    /// this is at most one chunk).
    pub largest_buffer: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.ternary + self.embedding + self.kv_cache + self.activations
    }
}

/// Bytes needed for `config` with `options` (float matrices in their file dtype of `elem_bytes`).
pub fn estimate_memory(c: &ModelConfig, o: &ModelOptions, elem_bytes: u64) -> MemoryEstimate {
    let (h, i, l) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
    );
    let (qd, kvd, v) = (c.q_dim() as u64, c.kv_dim() as u64, c.vocab_size as u64);
    let g = |cols: u64| cols.div_ceil(16) * 4; // bytes per repacked row
    let ternary = l * (qd * g(h) + 2 * kvd * g(h) + h * g(qd) + 2 * i * g(h) + h * g(i));
    let emb_row = (h * elem_bytes).div_ceil(4) * 4;
    // the embedding, plus the LM head unless it is the tied embedding itself
    let head = match o.lm_head {
        crate::backend::HeadFormat::Q8 => v * 4 * super::layout::q8_row_words(h as usize) as u64,
        _ if c.tie_word_embeddings => 0,
        _ => v * emb_row,
    };
    let embedding = v * emb_row + head;
    let kv_bytes = o.kv_dtype::<super::WgpuBackend>().bytes();
    let kv_cache = 2 * l * o.slots as u64 * o.ctx as u64 * kvd * kv_bytes;
    let b = o.max_batch as u64;
    let f32s = b * (4 * h + 2 * qd + 2 * kvd + 4 * i) + o.max_logit_rows as u64 * v;
    let q8 = b * (g(h) + g(qd) + g(i)) + 3 * b * 8;
    // the split attention's partials, sized for the largest step it serves (one per context)
    // (wider steps of single rows of many slots use it up to 64 rows)
    let split_max = if o.slots > super::ATTN_SPLIT_MAX_TOKENS {
        super::attention::ATTN_SPLIT_WIDE_MAX_TOKENS
    } else {
        super::ATTN_SPLIT_MAX_TOKENS
    };
    let split_rows = o.max_batch.clamp(1, split_max);
    let partials = super::attention::partials_bytes(
        split_rows.next_power_of_two().max(4),
        c.num_attention_heads,
        o.ctx,
        c.head_dim,
    );
    let activations = f32s * 4 + q8 + partials;
    let largest_buffer = [
        i * g(h),
        h * g(i),
        o.slots as u64 * o.ctx as u64 * kvd * kv_bytes,
        o.max_logit_rows as u64 * v * 4,
        partials,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    MemoryEstimate {
        ternary,
        embedding,
        kv_cache,
        activations,
        largest_buffer,
    }
}

/// Whether the model is likely to fit the adapter. wgpu has no free-memory query, so this is a
/// heuristic: every buffer must fit `max_buffer_size` (exact), and the total must stay under a
/// budget: for integrated and software adapters (which use system memory) 75 % of physical
/// memory when the OS tells us (Linux `/proc/meminfo`); for discrete GPUs we cannot know the
/// VRAM size, so we only check the per-buffer limits and rely on allocation errors, which
/// `WgpuBackend` turns into `BitnetError::Gpu("out of device memory ...")` at upload.
pub fn check_fits(
    est: &MemoryEstimate,
    info: &wgpu::AdapterInfo,
    limits: &wgpu::Limits,
) -> Result<(), String> {
    if est.largest_buffer > limits.max_buffer_size {
        return Err(format!(
            "a {} MiB buffer exceeds the adapter's max_buffer_size of {} MiB",
            est.largest_buffer >> 20,
            limits.max_buffer_size >> 20
        ));
    }
    let shared = is_software(info) || info.device_type == wgpu::DeviceType::IntegratedGpu;
    if shared {
        if let Some(ram) = system_memory_bytes() {
            let budget = ram / 4 * 3;
            if est.total() > budget {
                return Err(format!(
                    "the model needs {} MiB of device memory but this adapter shares system \
                     memory and 75% of it is {} MiB",
                    est.total() >> 20,
                    budget >> 20
                ));
            }
        }
    }
    Ok(())
}

/// Physical memory from `/proc/meminfo` (Linux); None elsewhere.
pub fn system_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_never_ranks_software_and_prefers_discrete() {
        use wgpu::DeviceType as D;
        assert_eq!(rank(AdapterChoice::Auto, D::Cpu, true), None);
        assert_eq!(rank(AdapterChoice::Auto, D::IntegratedGpu, true), None);
        assert!(rank(AdapterChoice::Gpu, D::Cpu, true).is_some());
        let d = rank(AdapterChoice::Auto, D::DiscreteGpu, false).unwrap();
        let i = rank(AdapterChoice::Auto, D::IntegratedGpu, false).unwrap();
        let s = rank(AdapterChoice::Gpu, D::Cpu, true).unwrap();
        assert!(d < i && i < s);
    }

    #[test]
    fn software_names_are_recognised() {
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Other, wgpu::Backend::Vulkan);
        info.name = "llvmpipe (LLVM 15.0.6, 256 bits)".into();
        assert!(is_software(&info));
        info.name = "NVIDIA H100".into();
        info.device_type = wgpu::DeviceType::DiscreteGpu;
        assert!(!is_software(&info));
    }

    #[test]
    fn memory_estimate_of_2b4t_is_in_the_expected_range() {
        let c = ModelConfig::bitnet_2b4t();
        let o = ModelOptions::for_config(&c);
        let e = estimate_memory(&c, &o, 2);
        // 2.08 B ternary weights at 2 bits = 521 MB; embedding 657 MB bf16.
        assert!((500e6..560e6).contains(&(e.ternary as f64)), "{e:?}");
        assert!((650e6..660e6).contains(&(e.embedding as f64)), "{e:?}");
        // f16 KV cache, 4096 positions: 30 · 2 · 4096 · 640 · 2 B = 315 MB; f32 twice that.
        assert_eq!(e.kv_cache, 30 * 2 * 4096 * 640 * 2);
        let o32 = ModelOptions {
            kv_cache: Some(crate::backend::KvDtype::F32),
            ..o
        };
        assert_eq!(
            estimate_memory(&c, &o32, 2).kv_cache,
            30 * 2 * 4096 * 640 * 4
        );
        // the split attention's partials are part of the activations: rows × 20 heads × one
        // block per 64 positions × 130 floats (max, sum, 128 outputs), so they alone grow with
        // the context
        let rows = o.max_batch.clamp(1, 16).next_power_of_two().max(4) as u64;
        let o2 = ModelOptions { ctx: 8192, ..o };
        assert_eq!(
            estimate_memory(&c, &o2, 2).activations - e.activations,
            rows * 20 * 64 * 130 * 4
        );
    }
}
