//! A corpus of malformed GGUF files, each refused with its own typed error (never a panic, an
//! allocation the size of a bogus count, or a read past the end), built from one valid file.

use bitnet_wgpu::gguf::{GgufError, GgufHeader, Value};

/// A little GGUF writer for the corpus.
#[derive(Clone)]
struct Builder {
    version: u32,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data: Vec<u8>,
    /// Overrides of the two counts in the header.
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
}

fn s(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(x.as_bytes());
    v
}

fn kv_str(k: &str, v: &str) -> Vec<u8> {
    [s(k), 8u32.to_le_bytes().to_vec(), s(v)].concat()
}

fn kv_u32(k: &str, v: u32) -> Vec<u8> {
    [s(k), 4u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat()
}

impl Builder {
    /// Two F32 [4] tensors at data offsets 0 and 32, alignment 32.
    fn valid() -> Self {
        Builder {
            version: 3,
            kvs: vec![
                kv_str("general.architecture", "bitnet-b1.58"),
                kv_u32("general.alignment", 32),
            ],
            tensors: vec![("a".into(), vec![4], 0, 0), ("b".into(), vec![2, 2], 0, 32)],
            data: (0..48u8).collect(),
            n_tensors: None,
            n_kv: None,
        }
    }

    fn header_len(&self) -> usize {
        self.bytes_without_data().len()
    }

    fn bytes_without_data(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend(
            self.n_tensors
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        b.extend(self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            b.extend(kv);
        }
        for (name, dims, ty, off) in &self.tensors {
            b.extend(s(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = self.bytes_without_data();
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(&self.data);
        b
    }
}

fn parse(b: &[u8]) -> Result<GgufHeader, GgufError> {
    GgufHeader::parse(b)
}

#[test]
fn the_valid_file_parses() {
    let b = Builder::valid();
    let h = parse(&b.bytes()).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(
        h.get("general.architecture"),
        Some(&Value::String("bitnet-b1.58".into()))
    );
    let t = h.tensor("b").unwrap();
    assert_eq!(
        (t.start, t.len),
        (b.header_len().next_multiple_of(32) + 32, 16)
    );
    // v2 has the same layout for these fields.
    let mut v2 = Builder::valid();
    v2.version = 2;
    assert_eq!(parse(&v2.bytes()).unwrap().version, 2);
}

#[test]
fn every_truncation_is_an_error() {
    let full = Builder::valid().bytes();
    for n in 0..full.len() {
        let e = parse(&full[..n]).expect_err(&format!("prefix of {n} bytes parsed"));
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. }
                    | GgufError::TooLarge { .. }
                    | GgufError::DataOutOfBounds { .. }
            ),
            "prefix {n}: {e}"
        );
        // One line, naming the problem.
        assert!(!e.to_string().contains('\n'));
    }
}

#[test]
fn magic_and_version() {
    let mut b = Builder::valid().bytes();
    b[0] = b'X';
    assert!(matches!(parse(&b), Err(GgufError::BadMagic(_))));
    for v in [1, 4, 0x0300_0000] {
        let mut x = Builder::valid();
        x.version = v;
        assert_eq!(
            parse(&x.bytes()).unwrap_err(),
            GgufError::UnsupportedVersion(v)
        );
    }
}

#[test]
fn counts_past_the_end() {
    for (nt, nk) in [
        (Some(u64::MAX), None),
        (None, Some(u64::MAX)),
        (Some(1 << 40), None),
    ] {
        let mut b = Builder::valid();
        b.n_tensors = nt;
        b.n_kv = nk;
        let e = parse(&b.bytes()).unwrap_err();
        assert!(matches!(e, GgufError::TooLarge { .. }), "{e}");
    }
    // A count that fits the bytes but lies: reading runs out.
    let mut b = Builder::valid();
    b.n_kv = Some(3);
    assert!(parse(&b.bytes()).is_err());
}

#[test]
fn huge_string_and_array_lengths() {
    let mut b = Builder::valid();
    let mut key = (u64::MAX).to_le_bytes().to_vec();
    key.extend(b"x");
    b.kvs.push(key);
    let e = parse(&b.bytes()).unwrap_err();
    assert!(matches!(e, GgufError::TooLarge { .. }), "{e}");

    let mut b = Builder::valid();
    b.kvs.push(
        [
            s("big"),
            8u32.to_le_bytes().to_vec(),
            (1u64 << 40).to_le_bytes().to_vec(),
        ]
        .concat(),
    );
    assert!(matches!(parse(&b.bytes()), Err(GgufError::TooLarge { .. })));

    let mut b = Builder::valid();
    let arr = [
        s("arr"),
        9u32.to_le_bytes().to_vec(),
        4u32.to_le_bytes().to_vec(),
        (u64::MAX / 2).to_le_bytes().to_vec(),
    ]
    .concat();
    b.kvs.push(arr);
    let e = parse(&b.bytes()).unwrap_err();
    assert!(matches!(e, GgufError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("\"arr\""), "{e}");
}

#[test]
fn nested_arrays_and_unknown_value_types() {
    let mut b = Builder::valid();
    b.kvs.push(
        [
            s("nest"),
            9u32.to_le_bytes().to_vec(),
            9u32.to_le_bytes().to_vec(),
            1u64.to_le_bytes().to_vec(),
        ]
        .concat(),
    );
    assert!(matches!(
        parse(&b.bytes()),
        Err(GgufError::NestedArray { .. })
    ));
    let mut b = Builder::valid();
    b.kvs
        .push([s("odd"), 13u32.to_le_bytes().to_vec(), vec![0; 8]].concat());
    assert_eq!(
        parse(&b.bytes()).unwrap_err(),
        GgufError::UnknownValueType {
            key: "odd".into(),
            ty: 13
        }
    );
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let mut b = Builder::valid();
    b.kvs.push(kv_str("general.architecture", "bitnet"));
    assert_eq!(
        parse(&b.bytes()).unwrap_err(),
        GgufError::DuplicateKey("general.architecture".into())
    );
    let mut b = Builder::valid();
    b.tensors[1].0 = "a".into();
    assert_eq!(
        parse(&b.bytes()).unwrap_err(),
        GgufError::DuplicateTensor("a".into())
    );
}

#[test]
fn unknown_tensor_type_and_bad_shapes() {
    let mut b = Builder::valid();
    b.tensors[0].2 = 99;
    assert_eq!(
        parse(&b.bytes()).unwrap_err(),
        GgufError::UnknownTensorType {
            name: "a".into(),
            ty: 99
        }
    );
    let mut b = Builder::valid();
    b.tensors[0].1 = vec![1, 1, 1, 1, 1];
    assert!(matches!(
        parse(&b.bytes()),
        Err(GgufError::TooManyDims { .. })
    ));
    for dims in [vec![0], vec![u64::MAX, 2], vec![1 << 30, 1 << 30]] {
        let mut b = Builder::valid();
        b.tensors[0].1 = dims.clone();
        assert!(
            matches!(parse(&b.bytes()), Err(GgufError::BadShape { .. })),
            "{dims:?}"
        );
    }
    // TQ2_0 rows must be whole 256-weight blocks.
    let mut b = Builder::valid();
    b.tensors[0] = ("t".into(), vec![100], 35, 0);
    assert!(matches!(parse(&b.bytes()), Err(GgufError::BadShape { .. })));
}

#[test]
fn misaligned_out_of_bounds_and_overlapping_data() {
    let mut b = Builder::valid();
    b.tensors[1].3 = 16;
    assert_eq!(
        parse(&b.bytes()).unwrap_err(),
        GgufError::Misaligned {
            name: "b".into(),
            offset: 16,
            align: 32
        }
    );
    let mut b = Builder::valid();
    b.tensors[1].3 = 64;
    assert!(matches!(
        parse(&b.bytes()),
        Err(GgufError::DataOutOfBounds { .. })
    ));
    let mut b = Builder::valid();
    b.tensors[1].3 = u64::MAX - 31;
    assert!(matches!(
        parse(&b.bytes()),
        Err(GgufError::DataOutOfBounds { .. })
    ));
    let mut b = Builder::valid();
    b.tensors[1].1 = vec![16]; // 64 bytes from offset 32: past the end
    assert!(matches!(
        parse(&b.bytes()),
        Err(GgufError::DataOutOfBounds { .. })
    ));
    let mut b = Builder::valid();
    b.tensors[0].1 = vec![12]; // 48 bytes from 0 cover b at 32
    assert!(matches!(parse(&b.bytes()), Err(GgufError::Overlap { .. })));
    let mut b = Builder::valid();
    b.tensors[1].3 = 0; // same offset
    assert!(matches!(parse(&b.bytes()), Err(GgufError::Overlap { .. })));
}

#[test]
fn bad_alignment_values() {
    for a in [0u32, 3, 48] {
        let mut b = Builder::valid();
        b.kvs[1] = kv_u32("general.alignment", a);
        assert_eq!(
            parse(&b.bytes()).unwrap_err(),
            GgufError::BadAlignment(a as u64)
        );
    }
    let mut b = Builder::valid();
    b.kvs[1] = kv_str("general.alignment", "32");
    assert!(matches!(parse(&b.bytes()), Err(GgufError::KeyType { .. })));
}

#[test]
fn random_corruptions_never_panic() {
    // Cheap stand-in for the fuzz target: flip bytes of the valid file everywhere.
    let full = Builder::valid().bytes();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = full.clone();
        for k in 0..1 + (x % 3) as usize {
            let i = ((x >> (8 * k)) as usize) % b.len();
            b[i] = (x >> 40) as u8 ^ b[i].rotate_left(k as u32);
        }
        let _ = parse(&b);
    }
}
