//! Intel AMX (Advanced Matrix Extensions) for the ternary matmul of steps of 2 or more tokens,
//! and (AMX-BF16) for the exact bf16 LM head of every step ([`head_tiles_16x1`]).
//!
//! A prefill step multiplies the same weights by many tokens, so it is an int8 GEMM and bound by
//! multiply-adds, not by memory; so is a batched decode step of a few rows on this core. One AMX `tdpbusd` does a 16×64 by 64×16 int8 product
//! (16 384 multiply-adds) where an AVX-512 `vpdpbusd` does 64; on a Sapphire Rapids-class core
//! that is about 8× the multiply-adds per cycle.
//!
//! The weights stay packed on the device; each job unpacks 16 packed byte rows (64 weight rows,
//! four planes of 16: see `ternary.rs`) into unsigned codes `c = w + 1` in {0, 1, 2}, one tile row
//! per weight row (the A operand), and multiplies them by the step's activations, which
//! [`pack_activations`] has laid out once per quantization in the "VNNI" order the B operand needs.
//! As in the other kernels, `Σ q·w = Σ q·c − Σ q`, and the integer sums are exact: this path
//! gives bit-identical outputs to the scalar kernel. A long step unpacks a job's codes once
//! ([`unpack_codes`]) and multiplies them by many token blocks ([`tile_2x2`]); a step of one
//! token block unpacks them 64 columns at a time into L1 right before their only product
//! ([`tile_rows_one_block`]), as tile loads from L2 ran slower than the multiply-adds here.
//!
//! Rust's AMX intrinsics are unstable (rust-lang/rust#126622), so the tile instructions are written
//! in `asm!`. Loading the tile configuration is slow (BENCHMARKS.md has what it cost per
//! [`tile_2x2`] call), so a job configures the tiles once through a [`Tiles`] guard and every
//! `tile_2x2` call borrows it. The configuration lives on between the `asm!` blocks because nothing
//! else on the thread touches tile state: this crate enables no AMX target feature, so compiled
//! Rust code never uses tiles, and the OS saves and restores them with the thread. The guard
//! releases the tiles when dropped.
//!
//! Linux gives a process the 8 KiB tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! kernel 5.16+); [`available`] asks once and reports AMX only if the kernel agreed.

use crate::backend::cpu::aligned::AlignedVec;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Bytes of k per tile row (the A operand's row, 64 int8 values).
pub const TILE_K: usize = 64;
/// Weight rows per A tile, which is also the packed byte rows per job (one A tile per plane).
pub const TILE_ROWS: usize = 16;
/// Tokens per B tile.
pub const TILE_TOKENS: usize = 16;

/// Whether this CPU has AMX-TILE and AMX-INT8 and the OS lets this process use them.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 25) & 1 == 1);
        if !(tile && int8) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes which xsave features the kernel
        // lets this process use; it touches no memory of ours.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    })
}

/// `cols` rounded up to whole tile rows (the padding is zeros on both operands).
pub fn padded_cols(cols: usize) -> usize {
    cols.next_multiple_of(TILE_K)
}

/// Length of the [`pack_activations`] buffer for `rows` tokens of `cols` columns: token blocks
/// are paired (one [`tile_2x2`] takes two), so an even number of blocks.
pub fn packed_activations_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(2 * TILE_TOKENS) * 2 * TILE_TOKENS * padded_cols(cols)
}

/// Lays out one block of up to 16 tokens' int8 activations (`q`: `[tokens ≤ 16, cols]`) as the B
/// operand wants it: `out[g][t][j] = q[t][4g + j]` for the `padded_cols / 4` groups `g`
/// (`[padded_cols / 4, 16, 4]`, 1 KiB per 64 columns), zeros past the last token and column.
pub fn pack_activation_block(q: &[i8], cols: usize, out: &mut [i8]) {
    let kp = padded_cols(cols);
    assert!(q.len().is_multiple_of(cols.max(1)) && q.len() / cols.max(1) <= TILE_TOKENS);
    assert_eq!(
        out.len(),
        TILE_TOKENS * kp,
        "pack_activation_block: output length"
    );
    let tokens = q.len() / cols.max(1);
    out.fill(0);
    let full = cols / 4; // groups with 4 real columns
    for g in 0..full {
        let line = &mut out[g * 64..(g + 1) * 64]; // [16 tokens, 4]
        for t in 0..tokens {
            line[4 * t..4 * t + 4].copy_from_slice(&q[t * cols + 4 * g..t * cols + 4 * g + 4]);
        }
    }
    if !cols.is_multiple_of(4) {
        let line = &mut out[full * 64..(full + 1) * 64];
        for t in 0..tokens {
            let tail = &q[t * cols + 4 * full..(t + 1) * cols];
            line[4 * t..4 * t + tail.len()].copy_from_slice(tail);
        }
    }
}

thread_local! {
    /// The unpacked codes of one job: `[4 planes, padded_cols / 64, 16 rows, 64]` u8 (grown on demand,
    /// kept for the thread's life: ~440 KiB for 2B4T's down projection), 64-byte aligned so that
    /// no 64-byte tile row splits two cache lines (1.17–1.26× on a prefill matmul against the
    /// allocator's 16-byte alignment, BENCHMARKS.md).
    static CODES: RefCell<AlignedVec<u8>> = RefCell::new(AlignedVec::default());
}

/// Runs `f` with this thread's code buffer, at least `len` bytes long.
pub fn with_code_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    CODES.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < len {
            c.resize(len, 0);
        }
        f(&mut c[..len])
    })
}

/// The 4 code planes `(b >> 2i) & 3` of the `left ≤ 64` packed bytes at `at`, zeros past them
/// (the load is masked, so no read goes past `at + left`).
///
/// # Safety
/// AVX-512 BW; `left` bytes readable at `at`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn code_planes(at: *const u8, left: usize) -> [__m512i; 4] {
    let m3 = _mm512_set1_epi8(3);
    let mask: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
    // SAFETY: the caller's contract; the mask limits the load to at[..left].
    let w = unsafe { _mm512_maskz_loadu_epi8(mask, at as *const i8) };
    [
        _mm512_and_si512(w, m3),
        _mm512_and_si512(_mm512_srli_epi16::<2>(w), m3),
        _mm512_and_si512(_mm512_srli_epi16::<4>(w), m3),
        _mm512_and_si512(_mm512_srli_epi16::<6>(w), m3),
    ]
}

/// Unpacks up to 16 packed byte rows (`bytes`: `[rows ≤ 16, cols]`) into codes laid out tile
/// by tile, `codes[i][c / 64][r][c % 64] = (bytes[r][c] >> 2i) & 3`
/// (`[4 planes, padded_cols / 64 steps, 16 rows, 64]`), zeros past `cols`: each A tile is then
/// 1 KiB of consecutive bytes, which the prefetchers follow better than 16 strided rows.
/// Rows past the given ones are left as they were (their outputs are never written).
///
/// # Safety
/// The CPU must have AVX-512 BW (every machine with AMX has it).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn unpack_codes(bytes: &[u8], cols: usize, codes: &mut [u8]) {
    let kp = padded_cols(cols);
    assert!(cols > 0 && bytes.len().is_multiple_of(cols) && bytes.len() / cols <= TILE_ROWS);
    assert_eq!(
        codes.len(),
        4 * TILE_ROWS * kp,
        "unpack_codes: output length"
    );
    for (r, row) in bytes.chunks_exact(cols).enumerate() {
        let mut c = 0;
        while c < kp {
            let left = cols.saturating_sub(c).min(64);
            // SAFETY: row[c..c + left] ⊂ row; each store writes 64 bytes at
            // codes[((i·steps + c/64)·16 + r)·64 ..], inside codes as c + 64 ≤ kp.
            unsafe {
                let planes = code_planes(row.as_ptr().add(c), left);
                for (i, plane) in planes.into_iter().enumerate() {
                    let tile = i * (kp / TILE_K) + c / TILE_K;
                    let dst = codes.as_mut_ptr().add((tile * TILE_ROWS + r) * TILE_K);
                    _mm512_storeu_si512(dst as *mut _, plane);
                }
            }
            c += 64;
        }
    }
}

/// Tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn all_16x64() -> Self {
        let mut b = [0u8; 64];
        b[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            b[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            b[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(b)
    }
}

static CONFIG: TileConfig = TileConfig::all_16x64();

/// Proof that this thread's tiles are configured (all 8 as 16 rows × 64 bytes); releases them
/// when dropped. Not `Send`: the configuration belongs to the thread that loaded it.
pub struct Tiles {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// # Safety
    /// AMX must be [`available`] (the process holds the tile permission).
    pub unsafe fn configure() -> Tiles {
        // SAFETY: the caller's contract; ldtilecfg reads the 64-byte configuration.
        unsafe { asm!("ldtilecfg [{cfg}]", cfg = in(reg) CONFIG.0.as_ptr(), options(nostack)) };
        Tiles {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by this guard on this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Zeroes the accumulator tiles tmm0–3.
fn zero_accumulators(_tiles: &Tiles) {
    // SAFETY: the tiles are configured (`_tiles`); touches no memory.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        )
    };
}

/// Stores the accumulator tiles tmm0–3 (16 rows × 16 i32 each) into `c`, one after another.
fn store_accumulators(_tiles: &Tiles, c: &mut [i32; 4 * 256]) {
    // SAFETY: the tiles are configured (`_tiles`); the stores write 4 × 1 KiB into c.
    unsafe {
        asm!(
            "tilestored [{c} + {row}*1], tmm0",
            "tilestored [{c} + {row}*1 + 1024], tmm1",
            "tilestored [{c} + {row}*1 + 2048], tmm2",
            "tilestored [{c} + {row}*1 + 3072], tmm3",
            c = in(reg) c.as_mut_ptr(),
            row = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// `c[2a + b] = A_a · B_b` over `k_steps` steps of 64 columns, for two runs of A tiles (16
/// weight rows of u8 codes, [`unpack_codes`]) and two runs of B tiles (16 tokens of packed
/// activations, [`pack_activation_block`]); every tile is 1 KiB, rows 64 bytes apart, and the
/// next step's tile follows. `c`: `[4, 16 rows, 16 tokens]` i32.
///
/// # Safety
/// `a[i]` and `b[i]` must be readable for `1024·k_steps` bytes, and `k_steps ≥ 1`.
pub unsafe fn tile_2x2(
    _tiles: &Tiles,
    a: [*const u8; 2],
    b: [*const i8; 2],
    k_steps: usize,
    c: &mut [i32; 4 * 256],
) {
    debug_assert!(k_steps >= 1);
    zero_accumulators(_tiles);
    // SAFETY: the tiles are configured (`_tiles`); the caller's contract covers every tile load.
    // tmm0–3 accumulate, tmm4–5 hold A, tmm6–7 hold B.
    unsafe {
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {row}*1]",
            "tileloadd tmm6, [{b0} + {row}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {row}*1]",
            "tdpbusd tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {row}*1]",
            "tdpbusd tmm2, tmm5, tmm6",
            "tdpbusd tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            row = in(reg) 64usize,
            n = inout(reg) k_steps => _,
            options(nostack, readonly),
        );
    }
    store_accumulators(_tiles, c);
}

/// The codes of columns `64s .. 64s + 64` of `rows` packed byte rows (`bytes`: `[rows, cols]`)
/// into half `s % 2` of `buf` (`[2 halves, 4 planes, 16 rows, 64]`), zeros past `cols`.
///
/// # Safety
/// AVX-512 BW; `rows ≤ 16`, `bytes.len() = rows · cols`, `64s < cols`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_step(
    bytes: &[u8],
    cols: usize,
    rows: usize,
    s: usize,
    buf: &mut [u8; 2 * 4 * 1024],
) {
    let c0 = s * TILE_K;
    let left = (cols - c0).min(TILE_K);
    let half = (s % 2) * 4 * 1024;
    for r in 0..rows {
        // SAFETY: bytes[r·cols + c0 ..][..left] is inside the row; each store writes 64 bytes
        // at half + i·1024 + r·64 < 8192.
        unsafe {
            let planes = code_planes(bytes.as_ptr().add(r * cols + c0), left);
            for (i, plane) in planes.into_iter().enumerate() {
                let dst = buf.as_mut_ptr().add(half + i * 1024 + r * TILE_K);
                _mm512_storeu_si512(dst as *mut _, plane);
            }
        }
    }
}

/// `c[i] = A_i · B` for one run of up to 16 packed byte rows (`bytes`: `[rows ≤ 16, cols]`,
/// code plane `i` of each byte = A tile `i`) and one block of up to 16 tokens (`b`: the
/// [`pack_activation_block`] layout, `padded_cols / 64` tiles of 1 KiB), unpacking the codes
/// 64 columns at a time into `buf` just before their tiles are loaded. A step of a few rows
/// multiplies every code by one token block only, so unpacking them all first
/// ([`unpack_codes`], as long prompts do) would write and read back 4 bytes per weight through
/// L2; here they stay in L1, and the next step's unpack runs while this step's tiles multiply
/// (two halves of `buf`). `c`: `[4 planes, 16 rows, 16 tokens]` i32, rows past `bytes`' are
/// unspecified.
///
/// # Safety
/// The CPU must have AVX-512 BW (every machine with AMX has it); `b` must hold
/// `16 · padded_cols(cols)` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn tile_rows_one_block(
    _tiles: &Tiles,
    bytes: &[u8],
    cols: usize,
    b: &[i8],
    buf: &mut [u8; 2 * 4 * 1024],
    c: &mut [i32; 4 * 256],
) {
    let kp = padded_cols(cols);
    let rows = bytes.len() / cols.max(1);
    assert!(cols > 0 && bytes.len().is_multiple_of(cols) && (1..=TILE_ROWS).contains(&rows));
    assert!(
        b.len() >= TILE_TOKENS * kp,
        "tile_rows_one_block: token block length"
    );
    let steps = kp / TILE_K;
    // SAFETY: AVX-512 BW (the caller's contract); rows ≤ 16, bytes holds rows · cols.
    unsafe { unpack_step(bytes, cols, rows, 0, buf) };
    zero_accumulators(_tiles); // tmm0–3: the 4 planes
    for s in 0..steps {
        if s + 1 < steps {
            // SAFETY: as above.
            unsafe { unpack_step(bytes, cols, rows, s + 1, buf) };
        }
        // SAFETY: the half of buf holds 4 tiles of 1 KiB; b holds tile s (checked above). The
        // asm reads memory the Rust stores above wrote (no `nomem`), so they stay before it.
        unsafe {
            asm!(
                "tileloadd tmm7, [{b} + {row}*1]",
                "tileloadd tmm4, [{a} + {row}*1]",
                "tdpbusd tmm0, tmm4, tmm7",
                "tileloadd tmm5, [{a} + {row}*1 + 1024]",
                "tdpbusd tmm1, tmm5, tmm7",
                "tileloadd tmm6, [{a} + {row}*1 + 2048]",
                "tdpbusd tmm2, tmm6, tmm7",
                "tileloadd tmm4, [{a} + {row}*1 + 3072]",
                "tdpbusd tmm3, tmm4, tmm7",
                a = in(reg) buf.as_ptr().add((s % 2) * 4 * 1024),
                b = in(reg) b.as_ptr().add(s * 1024),
                row = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
    store_accumulators(_tiles, c);
}

/// Whether this CPU also has AMX-BF16 (the bf16 tile product of the exact LM head).
pub fn bf16_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| available() && (__cpuid_count(7, 0).edx >> 22) & 1 == 1)
}

/// Head columns per tile step: 32 bf16, one 64-byte tile row.
pub const HEAD_K: usize = 32;
/// Activation rows per B tile of the head: 5 rows × 3 parts fill 15 of the 16 columns.
pub const HEAD_GROUP: usize = 5;

/// `x` as three bf16 (`hi + mid + lo == x` exactly for `2^-110 ≤ |x| ≤ 3e38`: each takes the
/// next 8 significant bits of what is left, rounded to nearest). A bf16 × bf16 product is exact
/// in f32, so the tiles' f32 sums of these three products equal an f32 dot product of `x`
/// with the bf16 weights up to the summation order, as the other exact-head kernels.
pub fn split_bf16(x: f32) -> [half::bf16; 3] {
    let hi = half::bf16::from_f32(x);
    let r = x - hi.to_f32(); // exact: the bits hi did not take
    let mid = half::bf16::from_f32(r);
    [hi, mid, half::bf16::from_f32(r - mid.to_f32())]
}

/// The activation rows of a head step as the B operand of the bf16 tiles: each value split in
/// three ([`split_bf16`]), the three parts of a row side by side as three columns of a tile,
/// 5 rows per group: `[groups, h / 32 steps, 16 pairs, 16 columns (3·row + part), 2]` bf16
/// (1 KiB per tile), zeros in column 15 and past the last row. Every logit then costs one
/// tile product for its group, whatever the other rows. Its buffer is kept across steps.
#[derive(Default)]
pub struct HeadActivations {
    tiles: AlignedVec<half::bf16>, // [groups, h / 32, 16, 16, 2]
    steps: usize,
    /// Activation rows.
    pub rows: usize,
}

impl HeadActivations {
    /// Lays out `xs`: the rows (`[h]` each, `h` a multiple of [`HEAD_K`]).
    pub fn fill(&mut self, xs: &[&[f32]], h: usize) {
        assert!(h.is_multiple_of(HEAD_K) && xs.iter().all(|x| x.len() == h));
        let steps = h / HEAD_K;
        let group_len = steps * 512;
        let len = xs.len().div_ceil(HEAD_GROUP) * group_len;
        if self.tiles.len() < len {
            self.tiles.resize(len, half::bf16::ZERO);
        }
        let tiles = &mut self.tiles[..len];
        tiles.fill(half::bf16::ZERO);
        for (t, x) in xs.iter().enumerate() {
            let group = &mut tiles[(t / HEAD_GROUP) * group_len..][..group_len];
            for (k, &v) in x.iter().enumerate() {
                // [step k / 32][pair (k % 32) / 2][column 3·(t % 5) + part][k % 2]
                let at = (k / HEAD_K) * 512 + ((k % HEAD_K) / 2) * 32 + k % 2;
                for (part, p) in split_bf16(v).into_iter().enumerate() {
                    group[at + 2 * (3 * (t % HEAD_GROUP) + part)] = p;
                }
            }
        }
        (self.steps, self.rows) = (steps, xs.len());
    }

    /// Groups of 5 rows.
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(HEAD_GROUP)
    }

    /// Group `g`'s tiles: `[h / 32 steps, 512]`.
    pub fn group(&self, g: usize) -> &[half::bf16] {
        let len = self.steps * 512;
        &self.tiles[g * len..(g + 1) * len]
    }
}

/// `c[0][m][col] = Σ_k head[m][k] · b[k][col]` for 16 head rows (bf16, row `m` at
/// `rows + m·stride` bytes, `h` columns) and one group of activations (`b`:
/// [`HeadActivations::group`]): f32 tile sums over the `h / 32` steps in order, the weights
/// loaded into the tiles straight from the head in memory. Each row is one memory stream; 16
/// rows at a time keep the streams few enough for the prefetchers (64 rows at a time made
/// one-token decode 8–24 % slower than the AVX-512 head, BENCHMARKS.md). `c`: `[2 tiles, 16
/// head rows, 16 columns]`, tile 0 written.
///
/// # Safety
/// The tiles must be configured and the CPU must have AMX-BF16 ([`bf16_available`]); 16 rows of
/// `2h` bytes must be readable at `rows`, `stride` apart; `b` must hold `h / 32` tiles; h ≥ 32.
pub unsafe fn head_tiles_16x1(
    _tiles: &Tiles,
    rows: *const u8,
    stride: usize,
    h: usize,
    b: &[half::bf16],
    c: &mut [f32; 2 * 256],
) {
    let steps = h / HEAD_K;
    assert!(
        steps >= 1 && b.len() >= steps * 512,
        "head_tiles_16x1: activation tiles"
    );
    // SAFETY: the caller's contract covers every A load (64 bytes of each of the 16 rows per
    // step); the B loads stay in b (checked above); the store writes tile 0 of c. tmm0
    // accumulates, tmm4 holds the step's activations, tmm5 the weights.
    unsafe {
        asm!(
            "tilezero tmm0",
            "2:",
            "tileloadd tmm4, [{b} + {row}*1]",
            "tileloadd tmm5, [{a} + {stride}*1]",
            "tdpbf16ps tmm0, tmm5, tmm4",
            "add {a}, 64",
            "add {b}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {row}*1], tmm0",
            a = inout(reg) rows => _,
            b = inout(reg) b.as_ptr() => _,
            stride = in(reg) stride,
            row = in(reg) 64usize,
            n = inout(reg) steps => _,
            c = in(reg) c.as_mut_ptr(),
            options(nostack),
        );
    }
}

/// [`head_tiles_16x1`] for two groups of activations at once (each weight tile loaded once for
/// both, 10 activation rows): tile `g` of `c` for group `g`.
///
/// # Safety
/// As [`head_tiles_16x1`], for both groups.
pub unsafe fn head_tiles_16x2(
    _tiles: &Tiles,
    rows: *const u8,
    stride: usize,
    h: usize,
    b: [&[half::bf16]; 2],
    c: &mut [f32; 2 * 256],
) {
    let steps = h / HEAD_K;
    assert!(
        steps >= 1 && b.iter().all(|b| b.len() >= steps * 512),
        "head_tiles_16x2: activation tiles"
    );
    // SAFETY: as in head_tiles_16x1; the stores write tiles 0 and 1 of c. tmm0–1 accumulate
    // the groups, tmm4 and tmm6 hold their activations, tmm5 the weights.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "2:",
            "tileloadd tmm5, [{a} + {stride}*1]",
            "tileloadd tmm4, [{b0} + {row}*1]",
            "tdpbf16ps tmm0, tmm5, tmm4",
            "tileloadd tmm6, [{b1} + {row}*1]",
            "tdpbf16ps tmm1, tmm5, tmm6",
            "add {a}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {row}*1], tmm0",
            "tilestored [{c} + {row}*1 + 1024], tmm1",
            a = inout(reg) rows => _,
            b0 = inout(reg) b[0].as_ptr() => _,
            b1 = inout(reg) b[1].as_ptr() => _,
            stride = in(reg) stride,
            row = in(reg) 64usize,
            n = inout(reg) steps => _,
            c = in(reg) c.as_mut_ptr(),
            options(nostack),
        );
    }
}

/// Writes the logits of one accumulator tile `c` (`[16 head rows, 16 columns]`, columns
/// `3·r + part`): `out[r·out_stride + m] = (c[m][3r] + c[m][3r + 1]) + c[m][3r + 2]` for the
/// first `rows` head rows and `tokens` (≤ 5) activation rows.
///
/// # Safety
/// AVX-512F; `out` must be writable at `r·out_stride + m` for every written (r, m).
#[target_feature(enable = "avx512f")]
pub unsafe fn store_head_tile(
    c: &[f32; 256],
    rows: usize,
    tokens: usize,
    out: *mut f32,
    out_stride: usize,
) {
    debug_assert!(rows <= 16 && tokens <= HEAD_GROUP);
    let by_col = columns(c); // [16 columns] of [16 rows]
    let mask = row_mask(rows);
    for t in 0..tokens {
        let col = |i: usize| _mm512_castsi512_ps(by_col[3 * t + i]);
        let v = _mm512_add_ps(_mm512_add_ps(col(0), col(1)), col(2));
        // SAFETY: the caller's contract.
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_stride), mask, v) };
    }
}

/// The columns of an accumulator tile (`[16 rows, 16 columns]` of i32 or f32) as 16 vectors
/// of 16 rows each.
#[inline]
#[target_feature(enable = "avx512f")]
fn columns<T: Copy>(c: &[T; 256]) -> [__m512i; 16] {
    const { assert!(std::mem::size_of::<T>() == 4) };
    let mut r = [_mm512_setzero_si512(); 16];
    for (m, v) in r.iter_mut().enumerate() {
        // SAFETY: row m of c is 16 four-byte values inside the 256.
        *v = unsafe { _mm512_loadu_si512(c.as_ptr().add(16 * m) as *const _) };
    }
    transpose16(r)
}

/// The lanes of the first `rows` (≤ 16) rows.
fn row_mask(rows: usize) -> __mmask16 {
    if rows >= 16 {
        !0
    } else {
        (1 << rows) - 1
    }
}

/// Transposes a 16×16 i32 matrix held as 16 row vectors (64 shuffles: 32-bit and 64-bit
/// interleaves within 128-bit lanes, then a 4×4 transpose of the lanes).
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + j], lane L: column 4L + j of rows 4i..4i+4
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    let mut o = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(b[j], b[4 + j]);
        let c1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(b[j], b[4 + j]);
        let c2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(b[8 + j], b[12 + j]);
        let c3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(b[8 + j], b[12 + j]);
        o[j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c0, c2);
        o[4 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c0, c2);
        o[8 + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c1, c3);
        o[12 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c1, c3);
    }
    o
}

/// Writes one accumulator tile `c` (`[16 rows, 16 tokens]` of `Σ q·code`) as floats:
/// `out(t, m) = (c[m][t] − q_sum[t]) · factor[t]` for the first `rows` rows and `q_sum.len()`
/// tokens, where `out(t, m)` is `out[t·out_stride + m]`.
///
/// # Safety
/// AVX-512F; `out` must be writable at `t·out_stride + m` for every written (t, m).
#[target_feature(enable = "avx512f")]
pub unsafe fn store_tile(
    c: &[i32; 256],
    rows: usize,
    q_sum: &[i32],
    factor: &[f32],
    out: *mut f32,
    out_stride: usize,
) {
    debug_assert!(rows <= 16 && q_sum.len() <= 16 && factor.len() == q_sum.len());
    let by_token = columns(c); // [16 tokens] of [16 rows]
    let mask = row_mask(rows);
    for (t, (&s, &f)) in q_sum.iter().zip(factor).enumerate() {
        let v = _mm512_sub_epi32(by_token[t], _mm512_set1_epi32(s));
        // the scalar path computes `(sum as f32) * factor`: the same two roundings
        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(f));
        // SAFETY: the caller's contract.
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_stride), mask, v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            // Nothing to compare on this machine; the AMX level is not offered either. Loud:
            // written past the harness's capture.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED amx::transpose16_transposes: no AVX-512F on this CPU"
            );
            return;
        }
        let m: Vec<i32> = (0..256).map(|i| i * 7 - 300).collect();
        let mut rows = [unsafe { _mm512_setzero_si512() }; 16];
        for (i, r) in rows.iter_mut().enumerate() {
            *r = unsafe { _mm512_loadu_si512(m.as_ptr().add(16 * i) as *const _) };
        }
        let t = unsafe { transpose16(rows) };
        let mut got = [0i32; 256];
        for (i, r) in t.iter().enumerate() {
            unsafe { _mm512_storeu_si512(got.as_mut_ptr().add(16 * i) as *mut _, *r) };
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * i + j], m[16 * j + i], "transposed ({i}, {j})");
            }
        }
    }

    #[test]
    fn activation_block_layout() {
        // 3 tokens of 70 columns: groups past column 70 and tokens past 3 are zero
        let cols = 70;
        let q: Vec<i8> = (0..3 * cols).map(|i| (i % 251) as i8).collect();
        let mut out = vec![1i8; TILE_TOKENS * padded_cols(cols)];
        pack_activation_block(&q, cols, &mut out);
        for g in 0..padded_cols(cols) / 4 {
            for t in 0..TILE_TOKENS {
                for j in 0..4 {
                    let k = 4 * g + j;
                    let want = if t < 3 && k < cols {
                        q[t * cols + k]
                    } else {
                        0
                    };
                    assert_eq!(
                        out[g * 64 + 4 * t + j],
                        want,
                        "group {g} token {t} lane {j}"
                    );
                }
            }
        }
    }
}
