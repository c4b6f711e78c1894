//! Property tests of the loaders of untrusted files: random bytes and random valid-looking
//! safetensors headers never panic the checkpoint, config, tokenizer or template loaders, and
//! never make them allocate more than a bound linear in the input size (so a header that claims
//! huge tensors or a config with huge sizes cannot make the loader reserve memory up front).
//! Allocations are counted by a global allocator in this test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bitnet_wgpu::config::ModelConfig;
use bitnet_wgpu::fuzz_targets::{self, ONLINE_CONFIG, PACKED_CONFIG};
use proptest::prelude::*;

/// Live heap bytes, and the peak since the last [`measure`] started.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: defers to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measurement at a time: the tests of this binary share the counters.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak heap bytes allocated by `f` above what was live when it started.
fn measure(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

/// The bound: a fixed 256 KiB (the tiny configs' f32 norms and weights, parser tables) plus 4×
/// the input. The multiple covers a JSON header or template expanding into Rust structures (a
/// shape `[1,1,...]` is 2 bytes per dimension in the file, 8 in a Vec<usize>): linear in the bytes
/// actually given, never driven by sizes the file merely claims. Measured: a valid 2.2 KiB
/// checkpoint allocates ~20 KiB; one-time process setup (~9 MiB, tokenizers' first use) is
/// excluded by [`warm_up`].
fn bound(input: usize) -> usize {
    (256 << 10) + 4 * input
}

/// Runs every loader once on its fuzz corpus, unmeasured: process-wide one-time setup (lazy
/// regex tables, thread pools) is not a per-input allocation.
fn warm_up() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (dir, run) in TARGETS {
            for f in std::fs::read_dir(corpus.join(dir)).unwrap() {
                run(&std::fs::read(f.unwrap().path()).unwrap());
            }
        }
    });
}

/// An entry point of `bitnet_wgpu::fuzz_targets`.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("safetensors", fuzz_targets::safetensors),
    ("config_json", fuzz_targets::config_json),
    ("tokenizer", fuzz_targets::tokenizer),
    ("chat_template", fuzz_targets::chat_template),
];

fn check_all_loaders(data: &[u8]) -> Result<(), TestCaseError> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    warm_up();
    for (what, run) in TARGETS {
        let peak = measure(|| run(data));
        prop_assert!(
            peak <= bound(data.len()),
            "{what}: {peak} bytes allocated for a {}-byte input (bound {})",
            data.len(),
            bound(data.len())
        );
    }
    Ok(())
}

/// A safetensors file from a header (JSON text, possibly lying) and a data section.
fn file(header: &str, declared_len: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut f = declared_len
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    f.extend_from_slice(header.as_bytes());
    f.extend_from_slice(data);
    f
}

/// Tensor names the loaders look for (so random headers reach the shape and dtype checks).
const NAMES: [&str; 8] = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.weight_scale",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1000000.mlp.up_proj.weight",
];
const DTYPES: [&str; 7] = ["BF16", "F16", "F32", "U8", "I8", "F64", "BOOL"];

/// Name, dtype, shape, data offsets.
type Entry = (String, String, Vec<u64>, (u64, u64));

/// One header entry: a known or random name, a dtype, a shape of small or huge dimensions, and
/// data offsets that are right, shifted or arbitrary.
fn entry() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![
            (0..NAMES.len()).prop_map(|i| NAMES[i].to_string()),
            "[a-z._0-9]{0,24}",
        ],
        (0..DTYPES.len()).prop_map(|i| DTYPES[i].to_string()),
        prop::collection::vec(
            prop_oneof![0u64..16, Just(1u64 << 32), Just(u64::MAX / 3), any::<u64>()],
            0..4,
        ),
        prop_oneof![
            (0u64..64, 0u64..64),
            any::<(u64, u64)>(),
            Just((0, u64::MAX))
        ],
    )
}

fn header(entries: &[Entry], consistent: bool) -> String {
    let mut m = serde_json::Map::new();
    let mut at = 0u64;
    for (name, dtype, shape, (s, e)) in entries {
        let (s, e) = if consistent {
            let bits: u64 = match dtype.as_str() {
                "BF16" | "F16" => 16,
                "F32" => 32,
                "F64" => 64,
                _ => 8,
            };
            let n = shape
                .iter()
                .try_fold(bits / 8, |a, &d| a.checked_mul(d))
                .unwrap_or(u64::MAX - at);
            let r = (at, at.saturating_add(n));
            at = r.1;
            r
        } else {
            (*s, *e)
        };
        m.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [s, e]}),
        );
    }
    serde_json::Value::Object(m).to_string()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_or_overallocate(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_all_loaders(&data)?;
    }

    #[test]
    fn random_headers_never_panic_or_overallocate(
        entries in prop::collection::vec(entry(), 0..12),
        consistent in any::<bool>(),
        lie in prop_oneof![Just(None), (0u64..4096).prop_map(Some), Just(Some(u64::MAX))],
        data in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let f = file(&header(&entries, consistent), lie, &data);
        check_all_loaders(&f)?;
    }

    /// A valid checkpoint with bytes overwritten anywhere: header, offsets, tensor data.
    #[test]
    fn damaged_valid_checkpoints_never_panic_or_overallocate(
        online in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut f = fuzz_targets::seed_checkpoint(online);
        for (at, byte) in edits {
            let i = at.index(f.len());
            f[i] = byte;
        }
        check_all_loaders(&f)?;
    }
}

/// The undamaged seeds load, and a config's sizes do not drive allocation: the 2B4T config
/// (2.4 B parameters) against a few-KiB file allocates about as much as the tiny one.
#[test]
fn config_sizes_do_not_drive_allocation() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    warm_up();
    for (online, config) in [(false, PACKED_CONFIG), (true, ONLINE_CONFIG)] {
        let seed = fuzz_targets::seed_checkpoint(online);
        let tiny = ModelConfig::from_json_str(config).unwrap();
        let mut ok = false;
        let peak = measure(|| {
            ok = bitnet_wgpu::load::load_weights_from_bytes(&seed, Path::new("seed"), &tiny).is_ok()
        });
        assert!(ok, "online {online}: the seed must load");
        assert!(peak <= bound(seed.len()), "{peak}");
        let big = ModelConfig::bitnet_2b4t();
        let mut err = String::new();
        let peak = measure(|| {
            err = bitnet_wgpu::load::load_weights_from_bytes(&seed, Path::new("seed"), &big)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        });
        assert!(err.contains("expected shape"), "{err}");
        assert!(
            peak <= bound(seed.len()),
            "2B4T config on a tiny file: {peak} bytes"
        );
    }
}
