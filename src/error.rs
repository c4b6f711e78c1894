//! Typed errors of the library. Every message names the file, tensor, op or value at fault, so
//! that the CLI can print it as-is and a user knows what to fix.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum BitnetError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model folder {dir} has no {file} (expected a Hugging Face BitNet folder: config.json, model.safetensors, tokenizer.json)")]
    MissingFile { dir: PathBuf, file: String },
    #[error("invalid config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported {what}: {value:?} ({hint})")]
    Unsupported {
        what: &'static str,
        value: String,
        hint: &'static str,
    },
    #[error("corrupt safetensors file {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?} (config.json and model.safetensors disagree?)")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name}: expected dtype {expected}, found {found}")]
    Dtype {
        name: String,
        expected: String,
        found: String,
    },
    #[error("tensor {name}: invalid ternary code 3 in packed byte {offset} (only 0, 1, 2 encode -1, 0, +1); the file is corrupt or not in the BitNet packed layout")]
    InvalidTernaryCode { name: String, offset: usize },
    #[error("tensor {name}: {msg}")]
    BadValue { name: String, msg: String },
    #[error("op {op}: {msg}")]
    Op { op: &'static str, msg: String },
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} entries")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("context overflow: {needed} positions are needed but the context holds {ctx} (max_position_embeddings or --ctx)")]
    ContextOverflow { needed: usize, ctx: usize },
    #[error("KV-cache slot {slot} is out of range: the cache has {slots} slots")]
    SlotOutOfRange { slot: u32, slots: usize },
    #[error("empty input: {0}")]
    EmptyInput(&'static str),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("npy file {path}: {msg}")]
    Npy { path: PathBuf, msg: String },
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error("server: {0}")]
    Serve(String),
    #[error("GGUF file {path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: crate::gguf::GgufError,
    },
}

pub type Result<T, E = BitnetError> = std::result::Result<T, E>;

impl BitnetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BitnetError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn op(op: &'static str, msg: impl Into<String>) -> Self {
        BitnetError::Op {
            op,
            msg: msg.into(),
        }
    }
}
