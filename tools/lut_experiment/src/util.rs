//! Shared pieces: a seeded generator (no `rand` dependency needed for a benchmark), the 64-byte
//! aligned line both LUT kernels keep their tables and repacked weights in, and the decoding of
//! the shipped packed layout.

/// SplitMix64: deterministic, fast, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i32
    }
}

/// One cache line, 64-byte aligned: one zmm / two ymm loads that never split a line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

impl Line {
    pub const ZERO: Line = Line([0; 64]);
}

/// The codes (`weight + 1` ∈ {0, 1, 2}) of `rows × cols` weights, row-major, decoded from the
/// shipped layout (`src/ternary.rs`): byte row `p` of `P = rows / 4` holds rows `p, P+p, 2P+p,
/// 3P+p` in bits 0-1, 2-3, 4-5, 6-7. The LUT kernels repack from these at load time.
pub fn unpack_codes(packed: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let p4 = rows / 4;
    let mut codes = vec![0u8; rows * cols];
    for r in 0..rows {
        let (i, p) = (r / p4, r % p4);
        for c in 0..cols {
            codes[r * cols + c] = (packed[p * cols + c] >> (2 * i)) & 3;
        }
    }
    codes
}
