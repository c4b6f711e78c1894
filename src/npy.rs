//! Minimal NumPy `.npy` (format 1.0) for float32 C-order arrays: what `bitnet logits` writes and
//! the tests read. Hand-written because it is ~80 lines for the one dtype we need, while the
//! npy crates pull in their own array types.

use std::io::Write;
use std::path::Path;

use crate::error::{BitnetError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Writes `data` (row-major, `shape` product = len) as a little-endian float32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let err = |msg: String| BitnetError::Npy {
        path: path.to_path_buf(),
        msg,
    };
    if shape.iter().product::<usize>() != data.len() {
        return Err(err(format!(
            "shape {shape:?} does not match {} values",
            data.len()
        )));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // magic(6) + version(2) + len(2) + header + '\n' is padded to a multiple of 64 bytes.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).map_err(|e| BitnetError::io(path, e))?;
    f.write_all(&bytes).map_err(|e| BitnetError::io(path, e))
}

/// Reads a little-endian float32 C-order array: (shape, data).
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let err = |msg: &str| BitnetError::Npy {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    };
    let bytes = std::fs::read(path).map_err(|e| BitnetError::io(path, e))?;
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err("not a .npy file (bad magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(err("unsupported .npy version")),
    };
    let hend = hstart
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| err("truncated header"))?;
    let header =
        std::str::from_utf8(&bytes[hstart..hend]).map_err(|_| err("header is not UTF-8"))?;
    if !header.contains("'descr': '<f4'") {
        return Err(err(
            "only little-endian float32 ('<f4') arrays are supported",
        ));
    }
    if header.contains("'fortran_order': True") {
        return Err(err("Fortran-order arrays are not supported"));
    }
    let open = header
        .find("'shape': (")
        .ok_or_else(|| err("no shape in header"))?
        + 10;
    let close = open + header[open..].find(')').ok_or_else(|| err("bad shape"))?;
    let shape: Vec<usize> = header[open..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| err("bad shape")))
        .collect::<Result<_>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err("shape overflows"))?;
    let body = &bytes[hend..];
    if Some(body.len()) != count.checked_mul(4) {
        return Err(err("data length does not match the shape"));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32(&p, &[2, 3], &data).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 24) % 64, 0, "header padded to 64 bytes");
        assert_eq!(read_f32(&p).unwrap(), (vec![2, 3], data));
        write_f32(&p, &[3], &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(read_f32(&p).unwrap().0, vec![3]);
        assert!(write_f32(&p, &[2, 2], &[1.0]).is_err());
        std::fs::write(&p, b"garbage").unwrap();
        assert!(read_f32(&p).is_err());
    }
}
