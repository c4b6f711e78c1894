//! Ternary weights packed 2 bits per weight: the storage, the packed format and its checks. The
//! int8 activation quantization and the scalar kernels over this format are the references of
//! `backend::cpu::reference`.
//!
//! Packed layout (transformers' `pack_weights`, kept as-is so that a checkpoint is used straight
//! from the memory map): bytes `B [out/4, in]`, and with `P = out/4`
//!
//! ```text
//! W[i*P + p, c] = ((B[p, c] >> 2i) & 3) - 1        i in 0..4
//! ```
//!
//! One byte row `p` therefore carries the same column of four output rows `p, P+p, 2P+p, 3P+p`:
//! a kernel that walks byte row `p` produces four outputs at once.

use std::sync::Arc;

use crate::error::{BitnetError, Result};

/// Bytes that are either borrowed from a memory-mapped checkpoint or owned.
#[derive(Clone)]
pub enum ByteStorage {
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl ByteStorage {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ByteStorage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            ByteStorage::Owned(v) => v,
        }
    }

    /// Touches every page of a file mapping (in parallel) so that the first token does not pay
    /// ~160k page faults for a 2B4T head (seconds of time to first token). Owned bytes are
    /// already resident.
    pub fn prefault(&self) {
        use rayon::prelude::*;
        if let ByteStorage::Mapped { .. } = self {
            let touched = self
                .as_slice()
                .par_chunks(1 << 20)
                .map(|c| c.iter().step_by(4096).fold(0u8, |a, &b| a ^ b))
                .reduce(|| 0, |a, b| a ^ b);
            std::hint::black_box(touched);
        }
    }

    /// Lets the OS drop the resident pages of `range` (bytes of this storage) when they come from
    /// a file mapping; the next access reads them from the file again. Used after a copy in
    /// another format was made, so that the copy does not double the resident memory. Best
    /// effort: a no-op for owned bytes, off Unix, and for pages only partly inside `range`.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let ByteStorage::Mapped { map, offset, len } = self {
            let align = page_size();
            let start = (offset + range.start.min(*len)).next_multiple_of(align);
            let end = (offset + range.end.min(*len)) / align * align;
            if end > start {
                // SAFETY: the mapping is a read-only private file mapping whose pages are never
                // written, so MADV_DONTNEED cannot change what any live borrow reads: a dropped
                // page is refilled from the same file bytes on the next access.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// The granularity of [`ByteStorage::release`]: the system's page size on Linux (4 KiB on x86, so
/// that a tensor's edges keep little of it resident), elsewhere 64 KiB, which covers every page
/// size in use (16 KiB Apple, 64 KiB some Arm).
#[cfg(unix)]
fn page_size() -> usize {
    #[cfg(target_os = "linux")]
    {
        static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *PAGE.get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if p > 0 && (p as usize).is_power_of_two() {
                p as usize
            } else {
                1 << 16
            }
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        1 << 16
    }
}

impl std::fmt::Debug for ByteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ByteStorage::Mapped { len, .. } => write!(f, "Mapped({len} bytes)"),
            ByteStorage::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// A ternary weight matrix `W [rows = out, cols = in]` in the packed layout above, plus the one
/// float that turns `x_q · W_row` (an exact integer) into the layer output:
/// `y = acc / s_act * out_scale`.
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// `[rows / 4, cols]` packed codes.
    pub packed: ByteStorage,
    /// weight_scale (autobitlinear), 1/weight_scale (bitlinear) or mean|W| (online).
    pub out_scale: f32,
    /// Scales per block of columns on top of `out_scale` (GGUF TQ1_0 / TQ2_0 files whose
    /// 256-weight blocks have different scales): `W[r, c] = out_scale · block_scales[r, c / B] ·
    /// code`, `y = out_scale / s_act · Σ_b block_scales[r, b] · (x_q · W_row)_b`. `None`: one
    /// scale for the matrix, the BitNet b1.58 case every fast kernel is written for.
    pub block_scales: Option<BlockScales>,
}

/// Per-row, per-block multipliers of a ternary matrix (see [`TernaryMatrix::block_scales`]).
#[derive(Clone, Debug)]
pub struct BlockScales {
    /// Columns per block (256 for ggml's TQ types); the last block of a row may be shorter.
    pub block: usize,
    /// `[rows, ceil(cols / block)]`, by output row.
    pub scales: Arc<Vec<f32>>,
}

impl TernaryMatrix {
    /// Checks the shape and that no 2-bit field holds the invalid code 3.
    pub fn new(
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        packed: ByteStorage,
        out_scale: f32,
    ) -> Result<Self> {
        let name = name.into();
        let bytes = packed.as_slice();
        if !rows.is_multiple_of(4) || bytes.len() != (rows / 4) * cols {
            return Err(BitnetError::Shape {
                name,
                expected: vec![rows / 4, cols],
                found: vec![bytes.len() / cols.max(1), cols],
            });
        }
        if let Some(offset) = find_code3(bytes) {
            return Err(BitnetError::InvalidTernaryCode { name, offset });
        }
        if !out_scale.is_finite() || out_scale == 0.0 {
            return Err(BitnetError::BadValue {
                name,
                msg: format!("weight scale {out_scale} is not a finite non-zero number"),
            });
        }
        Ok(TernaryMatrix {
            name,
            rows,
            cols,
            packed,
            out_scale,
            block_scales: None,
        })
    }

    /// The matrix with per-block scales `scales [rows, ceil(cols / block)]` (by output row) on
    /// top of `out_scale`; every scale must be finite.
    pub fn with_block_scales(mut self, block: usize, scales: Vec<f32>) -> Result<Self> {
        let blocks = self.cols.div_ceil(block.max(1));
        if block == 0 || Some(scales.len()) != self.rows.checked_mul(blocks) {
            return Err(BitnetError::Shape {
                name: format!("{} (block scales of {block} columns)", self.name),
                expected: vec![self.rows, blocks],
                found: vec![scales.len()],
            });
        }
        if let Some(k) = scales.iter().position(|s| !s.is_finite()) {
            return Err(BitnetError::BadValue {
                name: self.name,
                msg: format!(
                    "block scale of row {} block {} is {}",
                    k / blocks,
                    k % blocks,
                    scales[k]
                ),
            });
        }
        self.block_scales = Some(BlockScales {
            block,
            scales: Arc::new(scales),
        });
        Ok(self)
    }

    /// Bytes of one packed byte-row: `[cols]`, covering rows `p, P+p, 2P+p, 3P+p`.
    pub fn byte_row(&self, p: usize) -> &[u8] {
        &self.packed.as_slice()[p * self.cols..(p + 1) * self.cols]
    }

    /// The weight at `(r, c)` in {-1, 0, 1}.
    pub fn get(&self, r: usize, c: usize) -> i8 {
        let p4 = self.rows / 4;
        let (i, p) = (r / p4, r % p4);
        (((self.packed.as_slice()[p * self.cols + c] >> (2 * i)) & 3) as i8) - 1
    }
}

/// Offset of the first byte holding a 2-bit field equal to 3, if any.
pub fn find_code3(bytes: &[u8]) -> Option<usize> {
    // A field is 3 when both its bits are set: (b >> 1) & b & 0b0101_0101 != 0.
    let has3 = |w: u64| (w >> 1) & w & 0x5555_5555_5555_5555 != 0;
    let mut chunks = bytes.chunks_exact(8);
    for (k, chunk) in chunks.by_ref().enumerate() {
        if has3(u64::from_le_bytes(chunk.try_into().unwrap())) {
            let i = chunk
                .iter()
                .position(|&b| (b >> 1) & b & 0x55 != 0)
                .unwrap();
            return Some(k * 8 + i);
        }
    }
    let base = bytes.len() - chunks.remainder().len();
    chunks
        .remainder()
        .iter()
        .position(|&b| (b >> 1) & b & 0x55 != 0)
        .map(|i| base + i)
}

/// Packs a ternary matrix `w [rows, cols]` (values in {-1, 0, 1}) into the layout above.
pub fn pack_ternary(w: &[i8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    if !rows.is_multiple_of(4) || w.len() != rows * cols {
        return Err(BitnetError::op(
            "pack_ternary",
            format!(
                "need rows % 4 == 0 and len == rows*cols; rows {rows}, cols {cols}, len {}",
                w.len()
            ),
        ));
    }
    let p4 = rows / 4;
    let mut out = vec![0u8; p4 * cols];
    for r in 0..rows {
        let (i, p) = (r / p4, r % p4);
        for c in 0..cols {
            let v = w[r * cols + c];
            if !(-1..=1).contains(&v) {
                return Err(BitnetError::op(
                    "pack_ternary",
                    format!("value {v} at ({r}, {c}) is not ternary"),
                ));
            }
            out[p * cols + c] |= ((v + 1) as u8) << (2 * i);
        }
    }
    Ok(out)
}

/// Absmean ternarization of master weights (`quantization_mode: online`):
/// `s = max(mean|W|, 1e-5)`, `Wq = clamp(round(W / s), -1, 1)`. Returns (`Wq [rows, cols]`, s).
pub fn ternarize_absmean(w: &[f32]) -> (Vec<i8>, f32) {
    let sum: f64 = w.iter().map(|x| x.abs() as f64).sum();
    let s = ((sum / w.len().max(1) as f64) as f32).max(1e-5);
    // transformers multiplies by 1/s; do the same so that ties round identically.
    let inv = 1.0 / s;
    let q = w
        .iter()
        .map(|&x| (x * inv).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (q, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_bit_order_matches_transformers() {
        // rows 0..P in bits 1:0, P..2P in bits 3:2, 2P..3P in 5:4, 3P..4P in 7:6; code = w + 1.
        let (rows, cols) = (8, 3);
        let mut w = vec![0i8; rows * cols];
        w[0] = -1; // row 0 (i=0, p=0), col 0 → code 0 in bits 1:0 of B[0,0]
        w[2 * cols] = 1; // row 2 (i=1, p=0), col 0 → code 2 in bits 3:2 of B[0,0]
        w[7 * cols + 2] = 1; // row 7 (i=3, p=1), col 2 → code 2 in bits 7:6 of B[1,2]
        let b = pack_ternary(&w, rows, cols).unwrap();
        assert_eq!(b[0], 0b01_01_10_00);
        assert_eq!(b[cols + 2], 0b10_01_01_01);
        let m = TernaryMatrix::new("t", rows, cols, ByteStorage::Owned(Arc::new(b)), 1.0).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(m.get(r, c), w[r * cols + c], "({r},{c})");
            }
        }
    }

    #[test]
    fn rejects_code_3_and_names_offset() {
        let mut b = vec![0x55u8; 40];
        b[37] = 0b0011_0101;
        assert_eq!(find_code3(&b), Some(37));
        b[37] = 0x55;
        b[9] = 0b1100_0000;
        assert_eq!(find_code3(&b), Some(9));
        b[9] = 0xAA;
        assert_eq!(find_code3(&b), None);
        let mut bad = vec![0x55u8; 16];
        bad[5] = 0xFF;
        let err =
            TernaryMatrix::new("w", 16, 4, ByteStorage::Owned(Arc::new(bad)), 1.0).unwrap_err();
        assert!(err.to_string().contains("byte 5"), "{err}");
    }

    #[test]
    fn absmean_ternarization() {
        let w = [0.9f32, -0.1, 0.0, -2.0, 0.35, 0.05];
        let (q, s) = ternarize_absmean(&w);
        assert!((s - 0.5666667).abs() < 1e-6);
        assert_eq!(q, vec![1, 0, 0, -1, 1, 0]);
        let (q0, s0) = ternarize_absmean(&[0.0; 4]);
        assert_eq!((q0, s0), (vec![0; 4], 1e-5));
    }
}
