//! GGUF model files: the container ([`reader`]), ggml tensor types ([`types`]) and the mapping
//! of BitNet architectures onto [`ModelConfig`] / [`ModelWeights`] ([`model`]).

pub mod model;
pub mod reader;
pub mod types;

use std::path::Path;

pub use model::{load_gguf, read_config, GgufModel, GgufOptions, GgufSummary};
pub use reader::{GgufError, GgufHeader, TensorInfo, Value};
pub use types::{GgmlType, I2sLayout};

/// True when `path` is a file that starts with the GGUF magic (or, when it cannot be read, is
/// named `*.gguf`, so that the GGUF loader reports why it cannot be opened).
pub fn is_gguf_path(path: &Path) -> bool {
    if path.is_dir() {
        return false;
    }
    let named = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let mut magic = [0u8; 4];
    match std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
    {
        Ok(()) => &magic == b"GGUF" || named,
        Err(_) => named,
    }
}
