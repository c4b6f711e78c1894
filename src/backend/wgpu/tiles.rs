//! Tile sizes of the kernels whose best shape depends on the adapter: chosen once per device from
//! its class (discrete, integrated, software) and the limits it reports, not one size for all.
//!
//! - The tiled prefill matmul's k-step (`TK` in shaders/ternary_matmul.wgsl): 8 column groups
//!   (128 columns) where the workgroup memory holds the 24 KiB double buffer, halving the
//!   barriers per row of weights; else 4 groups in 12 KiB, which every WebGPU adapter has
//!   (16 KiB is the guaranteed minimum).
//! - Its tokens per thread (`TJ`, 16 · TJ tokens per tile): 4 on every class for steps of more
//!   than 32 tokens. Software adapters were the candidate for 2 (an invocation's 32
//!   accumulators are CPU vector registers there), but lavapipe ran 4 as fast or faster
//!   (BENCHMARKS.md), so the override is kept for the hardware A/B only.
//! - The norm prologue's 16-row blocks per workgroup (`PRO_BLOCKS`): 1 on discrete GPUs, whose
//!   100+ compute units need the workgroups (a 2560-row matrix makes 160 at 1 block, 40 at 4);
//!   4 elsewhere, where fewer compute units are filled either way and each workgroup's prologue
//!   (the norm of its token's row) is paid once per 64 rows instead of 16.
//!
//! - The LM head's bytes per dispatch: on integrated (and unclassified) GPUs the head is split
//!   into dispatches of at most [`INTEGRATED_HEAD_CHUNK_BYTES`], so that no single dispatch
//!   runs long enough for a driver watchdog (Windows resets a GPU after 2 s). The estimate
//!   behind it, for the slowest parts of the class (~20 GB/s, ~0.2 TFLOPS, assumed, not
//!   measured): a 64-row logits pass reads the head once per 8 rows, so 2B4T's 657 MB bf16 head
//!   in one dispatch is ~0.5 s of reads and compute; a 128 MiB chunk is ~0.1 s. Prefill steps
//!   of 512 tokens stay under that on such a GPU without splitting (2B4T's gate|up matmul is
//!   18 G int8 MACs, ~0.1 s at 0.2 T dp4a MACs/s). Discrete GPUs are ~10× faster, and software
//!   adapters have no watchdog.
//!
//! Which shape is fastest on each class is left to hardware timing: `BITNET_GPU_TILE_K=4|8`,
//! `BITNET_GPU_TILE_TJ=2|4` and `BITNET_GPU_PRO_BLOCKS=1..8` override the choice for that A/B
//! (tools/device/gpu_bench.sh), and every shape is tested exact on lavapipe.

/// Workgroup memory of the tiled matmul at `TK` column groups per k-step: two buffers of
/// `[TK, 128]` weight words and `[TK, 64]` activation vectors (shaders `w_tile`, `x_tile`).
pub const fn matmul_tile_bytes(k_groups: u32) -> u32 {
    2 * k_groups * 128 * 4 + 2 * k_groups * 64 * 16
}

/// Workgroup memory every kernel may add to its own (the reduction library's two 256-word
/// scratch arrays, shaders/reduce_*.wgsl).
const REDUCTION_BYTES: u32 = 2 * 256 * 4;

/// The most bytes of LM head one dispatch reads on integrated GPUs (see the module
/// documentation).
pub const INTEGRATED_HEAD_CHUNK_BYTES: u64 = 128 << 20;

/// The tile sizes a device's kernels use (see the module documentation for the why of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShapes {
    /// Tiled matmul: 16-column groups per k-step, 4 or 8 (shader `TK`).
    pub matmul_k_groups: u32,
    /// Tiled matmul: the most tokens per thread, 2 or 4 (shader `TJ`; steps of up to 32 tokens
    /// use 2 anyway).
    pub matmul_max_tj: u32,
    /// Norm prologue: 16-row blocks per workgroup, 1..=8 (shader `PRO_BLOCKS`).
    pub prologue_blocks: u32,
    /// LM head: the most bytes of it one dispatch reads (`None`: the binding limit only).
    pub head_chunk_bytes: Option<u64>,
}

impl TileShapes {
    /// The shapes for an adapter of this type and limits (`software`: a software rasteriser,
    /// [`super::adapter::is_software`]), before any environment override.
    pub fn for_adapter(
        device_type: wgpu::DeviceType,
        software: bool,
        limits: &wgpu::Limits,
    ) -> TileShapes {
        let memory = limits.max_compute_workgroup_storage_size;
        let discrete = device_type == wgpu::DeviceType::DiscreteGpu && !software;
        TileShapes {
            matmul_k_groups: if memory >= matmul_tile_bytes(8) + REDUCTION_BYTES {
                8
            } else {
                4
            },
            matmul_max_tj: 4,
            prologue_blocks: if discrete { 1 } else { 4 },
            head_chunk_bytes: (!discrete && !software).then_some(INTEGRATED_HEAD_CHUNK_BYTES),
        }
    }

    /// `self` with the environment's overrides (`BITNET_GPU_TILE_K`, `BITNET_GPU_TILE_TJ`,
    /// `BITNET_GPU_PRO_BLOCKS`); a value out of range, or a k-step whose tiles do not fit the
    /// adapter's workgroup memory, is ignored with a warning.
    pub fn with_env(self, limits: &wgpu::Limits) -> TileShapes {
        let var = |name: &str, ok: &dyn Fn(u32) -> bool| {
            let raw = std::env::var(name).ok()?;
            let v = raw.trim().parse::<u32>().ok().filter(|&v| ok(v));
            if v.is_none() {
                eprintln!("warning: {name}={raw:?} is not a tile size this adapter takes; ignored");
            }
            v
        };
        let memory = limits.max_compute_workgroup_storage_size;
        let fits = |k: u32| {
            TileShapes {
                matmul_k_groups: k,
                ..self
            }
            .fits(memory)
        };
        TileShapes {
            matmul_k_groups: var("BITNET_GPU_TILE_K", &fits).unwrap_or(self.matmul_k_groups),
            matmul_max_tj: var("BITNET_GPU_TILE_TJ", &|j| j == 2 || j == 4)
                .unwrap_or(self.matmul_max_tj),
            prologue_blocks: var("BITNET_GPU_PRO_BLOCKS", &|b| (1..=8).contains(&b))
                .unwrap_or(self.prologue_blocks),
            ..self
        }
    }

    /// Whether these tiles fit an adapter with `workgroup_memory` bytes per workgroup and take
    /// values the kernels have (k-step 4 or 8 groups, 2 or 4 tokens per thread, 1..=8 prologue
    /// blocks).
    pub fn fits(&self, workgroup_memory: u32) -> bool {
        matches!(self.matmul_k_groups, 4 | 8)
            && matches!(self.matmul_max_tj, 2 | 4)
            && (1..=8).contains(&self.prologue_blocks)
            && matmul_tile_bytes(self.matmul_k_groups) + REDUCTION_BYTES <= workgroup_memory
    }

    /// Tokens per thread of the tiled matmul for a step of `n` tokens: 2 up to 32 tokens (a
    /// 64-token tile would be mostly padding), else the most this adapter takes.
    pub fn matmul_tj(&self, n: usize) -> u32 {
        if n > 32 {
            self.matmul_max_tj
        } else {
            2
        }
    }
}

impl std::fmt::Display for TileShapes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "matmul tiles 128 rows x {} tokens, k-step {} columns; norm prologue {} x 16 rows",
            16 * self.matmul_max_tj,
            16 * self.matmul_k_groups,
            self.prologue_blocks
        )?;
        if let Some(b) = self.head_chunk_bytes {
            write!(f, "; LM head in dispatches of <= {} MiB", b >> 20)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: u32) -> wgpu::Limits {
        wgpu::Limits {
            max_compute_workgroup_storage_size: memory,
            ..wgpu::Limits::default()
        }
    }

    #[test]
    fn shapes_follow_the_adapter_class_and_its_workgroup_memory() {
        use wgpu::DeviceType::*;
        let discrete = TileShapes::for_adapter(DiscreteGpu, false, &limits(49152));
        assert_eq!((discrete.matmul_k_groups, discrete.matmul_max_tj), (8, 4));
        assert_eq!(discrete.prologue_blocks, 1);
        assert_eq!(discrete.head_chunk_bytes, None);
        // WebGPU's guaranteed 16 KiB: the 24 KiB tiles do not fit
        let small = TileShapes::for_adapter(IntegratedGpu, false, &limits(16384));
        assert_eq!((small.matmul_k_groups, small.prologue_blocks), (4, 4));
        assert_eq!(small.head_chunk_bytes, Some(INTEGRATED_HEAD_CHUNK_BYTES));
        // Apple's 32 KiB holds them
        assert_eq!(
            TileShapes::for_adapter(IntegratedGpu, false, &limits(32768)).matmul_k_groups,
            8
        );
        let software = TileShapes::for_adapter(Cpu, true, &limits(32768));
        assert_eq!(software.prologue_blocks, 4);
        assert_eq!(software.head_chunk_bytes, None);
        // a software adapter that calls itself discrete is not given the discrete shapes
        assert_eq!(
            TileShapes::for_adapter(DiscreteGpu, true, &limits(32768)).prologue_blocks,
            4
        );
        assert_eq!(discrete.matmul_tj(100), 4);
        assert_eq!(discrete.matmul_tj(32), 2);
        assert!(small.fits(16384) && !discrete.fits(16384) && discrete.fits(32768));
        let odd = TileShapes {
            matmul_k_groups: 6,
            ..discrete
        };
        assert!(!odd.fits(1 << 20));
    }
}
