//! The GGUF container (versions 2 and 3), parsed from untrusted bytes.
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string, value_type u32, value)
//! tensor_count × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! tensor data: each tensor at data_start + offset, offset a multiple of the alignment
//! ```
//!
//! Strings are a u64 byte length then UTF-8 bytes; arrays a u32 element type, a u64 count, then
//! the elements. Everything is little-endian (big-endian GGUF files are rejected by the version
//! check: their version reads as 0x0?000000).
//!
//! Every count, length, size and offset read from the file is checked with checked arithmetic
//! against the bytes that remain before anything is allocated, so a hostile header can neither
//! make us allocate more than a small multiple of the file size nor read past its end (the
//! llama.cpp CVEs in this parser were integer overflows in exactly these sums). Keys and tensor
//! names must be unique, tensor data must lie inside the file, be aligned and not overlap.

use std::collections::HashMap;

use super::types::GgmlType;

/// Everything wrong a GGUF file can be. Each message names the key, tensor or offset at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (versions 2 and 3 are read)")]
    UnsupportedVersion(u32),
    #[error("truncated: {what} needs {need} bytes at offset {offset}, the file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    #[error(
        "{what}: count or length {value} is larger than the file could hold ({limit} at most)"
    )]
    TooLarge {
        what: String,
        value: u64,
        limit: u64,
    },
    #[error("{what}: invalid UTF-8")]
    BadUtf8 { what: String },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("metadata key {key:?}: arrays of arrays are not supported")]
    NestedArray { key: String },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    KeyType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("general.alignment {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?}: unknown ggml type {ty}")]
    UnknownTensorType { name: String, ty: u32 },
    #[error("tensor {name:?}: {n_dims} dimensions (at most 4)")]
    TooManyDims { name: String, n_dims: u32 },
    #[error("tensor {name:?}: invalid shape {dims:?} ({msg})")]
    BadShape {
        name: String,
        dims: Vec<u64>,
        msg: String,
    },
    #[error("tensor {name:?}: data offset {offset} is not a multiple of the alignment {align}")]
    Misaligned {
        name: String,
        offset: u64,
        align: u64,
    },
    #[error("tensor {name:?}: data [{start}, {end}) lies past the end of the file ({len} bytes)")]
    DataOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("tensors {a:?} and {b:?} overlap in the data section")]
    Overlap { a: String, b: String },
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("metadata key {0:?} is missing")]
    MissingKey(String),
}

type R<T> = std::result::Result<T, GgufError>;

/// Longest key or tensor name accepted (llama.cpp's keys are < 100 bytes).
pub const MAX_NAME_LEN: u64 = 1 << 16;
/// Longest string value accepted (chat templates are a few KiB; 64 MiB leaves room for anything
/// a tokenizer stores in one string).
pub const MAX_STRING_LEN: u64 = 1 << 26;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Vec<Value>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
            Value::Array(_) => "array",
        }
    }

    /// Any non-negative integer type as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry, checked: its bytes lie inside the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub start: usize,
    /// Bytes of data.
    pub len: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata in file order plus an index, tensor infos.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute offset of the data section.
    pub data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> R<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                len: self.b.len() as u64,
            });
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> R<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().unwrap())
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> R<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> R<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, max: u64, what: &dyn Fn() -> String) -> R<String> {
        let len = self.u64(what)?;
        if len > max {
            return Err(GgufError::TooLarge {
                what: format!("{} (string length)", what()),
                value: len,
                limit: max,
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what() })
    }

    /// A count of items each taking at least `min_item` bytes must fit in what remains.
    fn count(&mut self, min_item: u64, what: &dyn Fn() -> String) -> R<u64> {
        let n = self.u64(what)?;
        let limit = self.remaining() / min_item.max(1);
        if n > limit {
            return Err(GgufError::TooLarge {
                what: what(),
                value: n,
                limit,
            });
        }
        Ok(n)
    }
}

/// Fixed size of a scalar value type, and the minimum size of any value of type `ty`.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // string: its u64 length
        9 => 4 + 8, // array: element type + count
        10..=12 => 8,
        _ => return None,
    })
}

fn read_value(c: &mut Cursor, ty: u32, key: &str, in_array: bool) -> R<Value> {
    let what = || format!("metadata key {key:?}");
    Ok(match ty {
        0 => Value::U8(c.array::<1>(&what)?[0]),
        1 => Value::I8(c.array::<1>(&what)?[0] as i8),
        2 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        3 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        4 => Value::U32(c.u32(&what)?),
        5 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        6 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        7 => match c.array::<1>(&what)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => {
                return Err(GgufError::KeyType {
                    key: key.to_string(),
                    expected: "bool byte 0 or 1",
                    found: if b > 1 { "another byte" } else { "?" },
                })
            }
        },
        8 => Value::String(c.string(MAX_STRING_LEN, &what)?),
        9 => {
            if in_array {
                return Err(GgufError::NestedArray {
                    key: key.to_string(),
                });
            }
            let ety = c.u32(&what)?;
            let min = min_value_size(ety).ok_or_else(|| GgufError::UnknownValueType {
                key: key.to_string(),
                ty: ety,
            })?;
            if ety == 9 {
                return Err(GgufError::NestedArray {
                    key: key.to_string(),
                });
            }
            let n = c.count(min, &|| format!("metadata key {key:?} (array length)"))?;
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                v.push(read_value(c, ety, key, true)?);
            }
            Value::Array(v)
        }
        10 => Value::U64(c.u64(&what)?),
        11 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        12 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                key: key.to_string(),
                ty,
            })
        }
    })
}

impl GgufHeader {
    /// Parses and checks the header of the GGUF file `bytes` (the whole file).
    pub fn parse(bytes: &[u8]) -> R<Self> {
        let mut c = Cursor { b: bytes, pos: 0 };
        let magic: [u8; 4] = c.array(&|| "magic".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // Minimum sizes: a tensor info is name length + n_dims + type + offset; a kv is key
        // length + type + a 1-byte value.
        let n_tensors = c.count(8 + 4 + 4 + 8, &|| "tensor count".into())?;
        let n_kv = c.count(8 + 4 + 1, &|| "metadata key/value count".into())?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(MAX_NAME_LEN, &|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("metadata key {key:?} (type)"))?;
            let value = read_value(&mut c, ty, &key, false)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.get(
            key_index
                .get("general.alignment")
                .copied()
                .unwrap_or(usize::MAX),
        ) {
            None => 32,
            Some((k, v)) => match v {
                Value::U32(a) => *a as u64,
                other => {
                    // llama.cpp writes u32; accept any unsigned integer but nothing else.
                    other.as_u64().ok_or_else(|| GgufError::KeyType {
                        key: k.clone(),
                        expected: "an unsigned integer",
                        found: other.type_name(),
                    })?
                }
            },
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > (1 << 30) {
            return Err(GgufError::BadAlignment(alignment));
        }

        struct Raw {
            name: String,
            dims: Vec<u64>,
            ty: GgmlType,
            offset: u64,
            len: u64,
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(MAX_NAME_LEN, &|| format!("tensor info #{i}"))?;
            let w = || format!("tensor {name:?} info");
            let n_dims = c.u32(&w)?;
            if n_dims > 4 {
                return Err(GgufError::TooManyDims { name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&w)?);
            }
            let ty_id = c.u32(&w)?;
            let offset = c.u64(&w)?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                ty: ty_id,
            })?;
            let bad = |msg: String| GgufError::BadShape {
                name: name.clone(),
                dims: dims.clone(),
                msg,
            };
            if dims.contains(&0) {
                return Err(bad("a dimension is 0".into()));
            }
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= 1 << 48)
                .ok_or_else(|| bad("element count overflows".into()))?;
            let row = dims.first().copied().unwrap_or(1);
            let len = ty.data_size(row, n).map_err(bad)?;
            if offset % alignment != 0 {
                return Err(GgufError::Misaligned {
                    name,
                    offset,
                    align: alignment,
                });
            }
            if tensor_index.insert(name.clone(), raw.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            raw.push(Raw {
                name,
                dims,
                ty,
                offset,
                len,
            });
        }

        let file_len = bytes.len() as u64;
        let data_start = (c.pos as u64).next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        for r in raw {
            let start = data_start.checked_add(r.offset);
            let end = start.and_then(|s| s.checked_add(r.len));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                    name: r.name,
                    dims: r.dims,
                    ty: r.ty,
                    start: start as usize,
                    len: r.len as usize,
                }),
                _ => {
                    return Err(GgufError::DataOutOfBounds {
                        name: r.name,
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        len: file_len,
                    })
                }
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].start);
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if a.start + a.len > b.start {
                return Err(GgufError::Overlap {
                    a: a.name.clone(),
                    b: b.name.clone(),
                });
            }
        }
        Ok(GgufHeader {
            version,
            alignment,
            metadata,
            key_index,
            tensors,
            tensor_index,
            data_start: data_start as usize,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// A string value; `Ok(None)` when absent, an error when of another type.
    pub fn get_str(&self, key: &str) -> R<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(GgufError::KeyType {
                key: key.to_string(),
                expected: "a string",
                found: v.type_name(),
            }),
        }
    }

    /// An unsigned integer value of any width.
    pub fn get_u64(&self, key: &str) -> R<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| GgufError::KeyType {
                key: key.to_string(),
                expected: "a non-negative integer",
                found: v.type_name(),
            }),
        }
    }

    pub fn get_f64(&self, key: &str) -> R<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| GgufError::KeyType {
                key: key.to_string(),
                expected: "a number",
                found: v.type_name(),
            }),
        }
    }

    /// Frees the parsed `tokenizer.ggml.*` arrays (vocabulary, merges, types, scores: ~30 MB
    /// of small allocations for a 128k vocabulary) once the tokenizer has been built from them,
    /// so that they are not held while the weights load. The keys stay, with empty arrays.
    pub fn free_tokenizer_arrays(&mut self) {
        for (key, v) in &mut self.metadata {
            if key.starts_with("tokenizer.ggml.") {
                if let Value::Array(a) = v {
                    *a = Vec::new();
                }
            }
        }
    }

    pub fn get_array(&self, key: &str) -> R<Option<&[Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(GgufError::KeyType {
                key: key.to_string(),
                expected: "an array",
                found: v.type_name(),
            }),
        }
    }
}
