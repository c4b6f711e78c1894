//! ggml tensor types: their sizes (for every type whose layout is public and fixed, so that a
//! file with, say, a Q4_K embedding still parses and names the type it cannot use), decoding of
//! the float-ish types used for embeddings and heads, and decoding of the ternary types into
//! codes `{0, 1, 2}` (= weight + 1) plus their scales.
//!
//! Layouts (ggml's `block_*` structs, little-endian, written out from the public format):
//!
//! ```text
//! Q8_0  [32 w]  d: f16, qs: i8[32]                         w[i] = d·qs[i]
//! Q6_K  [256 w] ql: u8[128], qh: u8[64], sc: i8[16], d: f16
//!       for half h in 0..2 (128 weights, ql+64h, qh+32h, sc+8h), l in 0..32, is = l/16:
//!         w[128h+l+32k] = d·sc[is+2k]·(q_k − 32), k in 0..4, with the 6-bit q_k =
//!         k=0: ql[l]&15 | (qh[l]&3)<<4        k=1: ql[l+32]&15 | ((qh[l]>>2)&3)<<4
//!         k=2: ql[l]>>4 | ((qh[l]>>4)&3)<<4   k=3: ql[l+32]>>4 | ((qh[l]>>6)&3)<<4
//! TQ2_0 [256 w] qs: u8[64], d: f16
//!       w[128j + 32l + m] = (((qs[32j+m] >> 2l) & 3) − 1)·d,   j in 0..2, l in 0..4, m in 0..32
//! TQ1_0 [256 w] qs: u8[48], qh: u8[4], d: f16; five base-3 digits per byte, most significant
//!       first, stored as the byte ceil(v·256/243) (v = the 5-digit number): digit n of byte b
//!       is ((b·3^n mod 256)·3) >> 8. Weights:
//!         w[32n + m]        from qs[m],      m in 0..32, n in 0..5   (160 weights)
//!         w[160 + 16n + m]  from qs[32+m],   m in 0..16, n in 0..5   (80)
//!         w[240 + 4n + j]   from qh[j],      j in 0..4,  n in 0..4   (16)
//!       each (digit − 1)·d.
//! I2_S  (bitnet.cpp) n/4 bytes of 2-bit codes over the tensor's flattened elements, then one
//!       f32 scale, the section padded to n/4 + 32 bytes. Code c means weight (c − 1)·scale.
//!       x86 layout (Microsoft's published files, QK = 128): the elements go in blocks of 128,
//!       each block 32 bytes; byte k of block b holds elements 128b + k (bits 7:6), +32 (5:4),
//!       +64 (3:2), +96 (1:0). ARM layout (bitnet.cpp built for NEON, QK = 64): blocks of 64
//!       in 16 bytes, byte k holds elements 64b + k, +16, +32, +48 in the same bit order.
//!       The file does not say which one it holds: x86 is the default, the other is selected
//!       by the caller (`--i2s-layout arm`).
//! ```

/// A ggml tensor type this reader knows the size of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    Bf16,
    Tq1_0,
    Tq2_0,
    /// bitnet.cpp's type 36 (its llama.cpp fork).
    I2S,
}

/// bitnet.cpp's I2_S layouts (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum I2sLayout {
    #[default]
    X86,
    Arm,
}

impl I2sLayout {
    /// (weights per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            I2sLayout::X86 => (128, 32),
            I2sLayout::Arm => (64, 16),
        }
    }
}

impl std::str::FromStr for I2sLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x86" => Ok(I2sLayout::X86),
            "arm" => Ok(I2sLayout::Arm),
            _ => Err(format!("unknown I2_S layout {s:?} (expected x86 or arm)")),
        }
    }
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            36 => I2S,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            Bf16 => 30,
            Tq1_0 => 34,
            Tq2_0 => 35,
            I2S => 36,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Bf16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            I2S => "I2_S",
        }
    }

    /// (weights per block, bytes per block); I2_S has no fixed block (see [`Self::data_size`]).
    pub fn block(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | Bf16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            Tq1_0 => (256, 54),
            Tq2_0 => (256, 66),
            I2S => (4, 1),
        }
    }

    /// Bytes of a tensor with `n` elements and rows of `row` elements.
    pub fn data_size(self, row: u64, n: u64) -> Result<u64, String> {
        let (bw, bb) = self.block();
        if !row.is_multiple_of(bw) {
            return Err(format!(
                "row length {row} is not a multiple of the {} block size {bw}",
                self.name()
            ));
        }
        let size = (n / bw)
            .checked_mul(bb)
            .ok_or_else(|| "byte size overflows".to_string())?;
        // I2_S: the codes, then the f32 scale in a 32-byte tail.
        Ok(if self == GgmlType::I2S {
            size + 32
        } else {
            size
        })
    }
}

pub(crate) fn f16(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Decodes `n` weights of a Q8_0 tensor into `out [n]`.
pub fn dequant_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (blk, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = f16(&blk[..2]);
        for (o, &q) in o.iter_mut().zip(&blk[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Decodes a Q6_K tensor into `out` (layout in the module doc).
pub fn dequant_q6_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, o) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = f16(&blk[208..210]);
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
            let sc = &blk[192 + 8 * h..192 + 8 * h + 8];
            let y = &mut o[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = l / 16;
                let q = [
                    (ql[l] & 15) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let s = sc[is + 2 * k] as i8 as f32;
                    y[l + 32 * k] = d * s * (qk as i32 - 32) as f32;
                }
            }
        }
    }
}

/// Ternary codes of one TQ2_0 block into `codes [256]`; returns the block scale `d`.
pub fn tq2_0_block(blk: &[u8], codes: &mut [u8]) -> f32 {
    for j in 0..2 {
        for l in 0..4 {
            for m in 0..32 {
                codes[128 * j + 32 * l + m] = (blk[32 * j + m] >> (2 * l)) & 3;
            }
        }
    }
    f16(&blk[64..66])
}

/// Digit `n` (0 = most significant) of a TQ1_0 byte.
#[inline]
fn tq1_digit(b: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let q = b.wrapping_mul(POW3[n]);
    ((q as u16 * 3) >> 8) as u8
}

/// Ternary codes of one TQ1_0 block into `codes [256]`; returns the block scale `d`.
pub fn tq1_0_block(blk: &[u8], codes: &mut [u8]) -> f32 {
    let (qs, qh) = (&blk[..48], &blk[48..52]);
    for n in 0..5 {
        for m in 0..32 {
            codes[32 * n + m] = tq1_digit(qs[m], n);
        }
        for m in 0..16 {
            codes[160 + 16 * n + m] = tq1_digit(qs[32 + m], n);
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            codes[240 + 4 * n + j] = tq1_digit(qh[j], n);
        }
    }
    f16(&blk[52..54])
}

/// Ternary codes of the whole I2_S tensor of `n` elements into `codes [n]`; returns the scale.
/// `n` must be a multiple of the layout's block (checked by the caller).
pub fn i2_s_codes(bytes: &[u8], n: usize, layout: I2sLayout, codes: &mut [u8]) -> f32 {
    let (bw, bb) = layout.block();
    let group = bw / 4;
    for (blk, c) in bytes[..n / 4]
        .chunks_exact(bb)
        .zip(codes.chunks_exact_mut(bw))
    {
        for (k, &b) in blk.iter().enumerate() {
            for g in 0..4 {
                c[g * group + k] = (b >> (6 - 2 * g)) & 3;
            }
        }
    }
    f32::from_le_bytes(bytes[n / 4..n / 4 + 4].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tq1_digits_invert_the_encoding() {
        // The encoder stores v (5 base-3 digits, most significant first) as ceil(v*256/243).
        for v in 0u32..243 {
            let b = ((v * 256).div_ceil(243)) as u8;
            let mut digits = [0u8; 5];
            let mut x = v;
            for n in (0..5).rev() {
                digits[n] = (x % 3) as u8;
                x /= 3;
            }
            for (n, &d) in digits.iter().enumerate() {
                assert_eq!(tq1_digit(b, n), d, "v {v} digit {n}");
            }
        }
    }

    #[test]
    fn i2_s_layouts_place_elements_as_documented() {
        // x86: element 128b + 32g + k sits in byte 32b + k at bits 7-2g:6-2g.
        let n = 256;
        let mut want = vec![0u8; n];
        for (i, w) in want.iter_mut().enumerate() {
            *w = ((i * 7 + i / 5) % 3) as u8;
        }
        for layout in [I2sLayout::X86, I2sLayout::Arm] {
            let (bw, bb) = layout.block();
            let mut bytes = vec![0u8; n / 4 + 32];
            for (i, &c) in want.iter().enumerate() {
                let (b, r) = (i / bw, i % bw);
                let (g, k) = (r / (bw / 4), r % (bw / 4));
                bytes[b * bb + k] |= c << (6 - 2 * g);
            }
            bytes[n / 4..n / 4 + 4].copy_from_slice(&0.5f32.to_le_bytes());
            let mut got = vec![9u8; n];
            assert_eq!(i2_s_codes(&bytes, n, layout, &mut got), 0.5);
            assert_eq!(got, want, "{layout:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::Tq2_0.data_size(256, 512), Ok(132));
        assert_eq!(GgmlType::I2S.data_size(128, 256), Ok(64 + 32));
        assert!(GgmlType::Q8_0.data_size(48, 96).is_err());
        assert!(GgmlType::F32.data_size(1, u64::MAX).is_err());
    }
}
