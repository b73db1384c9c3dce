//! Malformed GGUF files must give an `Err` whose message names the key or tensor and the byte
//! offset, never a panic. Files here are assembled byte by byte (independently of the writer),
//! so each test knows exactly where the bad field sits.

use bfpo_lite::gguf::{GgufError, GgufFile, GgufWriter, Value, type_info};

/// A hand-assembled GGUF file that records the offset of each field as it is written.
struct Raw {
    b: Vec<u8>,
}

impl Raw {
    fn new(version: u32, n_tensors: i64, n_kv: i64) -> Raw {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        Raw { b }
    }
    fn pos(&self) -> u64 {
        self.b.len() as u64
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.b.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.b.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.b.extend_from_slice(s.as_bytes());
        self
    }
    /// A KV with a raw type id and payload; returns the offset of the record.
    fn kv(&mut self, key: &str, type_id: u32, payload: &[u8]) -> u64 {
        let at = self.pos();
        self.str(key).u32(type_id);
        self.b.extend_from_slice(payload);
        at
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> u64 {
        self.kv(key, 4, &v.to_le_bytes())
    }
    /// A tensor info; returns the offset of the record.
    fn tensor(&mut self, name: &str, ne: &[i64], type_id: u32, offset: u64) -> u64 {
        let at = self.pos();
        self.str(name).u32(ne.len() as u32);
        for &n in ne {
            self.b.extend_from_slice(&n.to_le_bytes());
        }
        self.u32(type_id).u64(offset);
        at
    }
    /// Pads to `align` and appends `data_len` bytes of data.
    fn data(mut self, align: usize, data_len: usize) -> Vec<u8> {
        let n = self.b.len().div_ceil(align) * align;
        self.b.resize(n + data_len, 0xAB);
        self.b
    }
}

fn err(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(f) => panic!("malformed file accepted: {f:?}"),
        Err(e) => {
            eprintln!("MSG {e}");
            e.to_string()
        }
    }
}

#[track_caller]
fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

/// A small valid file made by the writer: strings, a string array, scalars, three tensors whose
/// last one fills whole alignment units (so every truncation removes needed bytes).
fn valid_small() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array(["<unk>", "<s>", "</s>", "▁hi"]),
    );
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.add_tensor("a.weight", &[3, 2], 0, vec![1u8; 24]).unwrap();
    w.add_tensor("q.weight", &[32, 1], 8, vec![2u8; 34])
        .unwrap();
    w.add_tensor("last.weight", &[16], 1, vec![3u8; 32])
        .unwrap();
    w.to_bytes()
}

#[test]
fn valid_fixture_reads() {
    let f = GgufFile::from_bytes(valid_small()).unwrap();
    assert_eq!(f.tensors().len(), 3);
    assert_eq!(f.kvs().len(), 5);
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let full = valid_small();
    for n in 0..full.len() {
        let r = GgufFile::from_bytes(full[..n].to_vec());
        let e = r
            .err()
            .unwrap_or_else(|| panic!("truncated to {n} bytes accepted"));
        let msg = e.to_string();
        assert!(msg.contains("offset"), "truncated to {n}: {msg}");
    }
}

#[test]
fn bad_magic() {
    let mut b = valid_small();
    b[0] = b'g';
    assert!(matches!(
        GgufFile::from_bytes(b.clone()),
        Err(GgufError::BadMagic { .. })
    ));
    assert_mentions(&err(b), &["magic", "offset 0"]);
    assert_mentions(&err(b"GGML\x03\0\0\0".to_vec()), &["magic"]);
}

#[test]
fn bad_versions() {
    for v in [0u32, 1, 4, 0xFFFF_FFFF] {
        let mut b = valid_small();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert_mentions(&err(b), &["version", &v.to_string(), "offset 4"]);
    }
    // Byte-swapped 3 (a big-endian file).
    let mut b = valid_small();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_mentions(&err(b), &["big-endian", "offset 4"]);
}

#[test]
fn huge_or_negative_counts() {
    for (field, at) in [("tensor count", 8usize), ("metadata key count", 16)] {
        for n in [i64::MAX, -1, 1 << 40, 1_000_000] {
            let mut b = valid_small();
            b[at..at + 8].copy_from_slice(&n.to_le_bytes());
            assert_mentions(&err(b), &[field, &format!("offset {at}")]);
        }
    }
}

#[test]
fn huge_string_lengths() {
    // The first key's length field is at offset 24.
    for len in [u64::MAX, 1 << 62, 1 << 20] {
        let mut r = Raw::new(3, 0, 1);
        r.u64(len);
        r.b.extend_from_slice(b"general.name");
        let msg = err(r.b);
        assert_mentions(
            &msg,
            &["metadata key #0 name", &len.to_string(), "offset 32"],
        );
    }
    // A string value whose length runs past the end: names the key.
    let mut r = Raw::new(3, 0, 1);
    let mut payload = (1u64 << 50).to_le_bytes().to_vec();
    payload.extend_from_slice(b"abc");
    let at = r.kv("general.name", 8, &payload);
    let len_end = at + 8 + 12 + 4 + 8;
    assert_mentions(
        &err(r.b),
        &["\"general.name\"", &format!("offset {len_end}")],
    );
    // A tensor name length.
    let mut r = Raw::new(3, 1, 0);
    r.u64(u64::MAX - 3);
    r.b.extend_from_slice(&[0u8; 40]);
    assert_mentions(&err(r.b), &["tensor #0 name", "offset 32"]);
}

#[test]
fn huge_array_counts() {
    for (elem, count) in [(4u32, 1u64 << 61), (8, 1 << 40), (0, u64::MAX), (6, 1000)] {
        let mut r = Raw::new(3, 0, 1);
        let mut payload = elem.to_le_bytes().to_vec();
        payload.extend_from_slice(&count.to_le_bytes());
        payload.extend_from_slice(&[0u8; 64]);
        let at = r.kv("tokenizer.ggml.scores", 9, &payload);
        let count_at = at + 8 + 21 + 4 + 4;
        assert_mentions(
            &err(r.b),
            &[
                "\"tokenizer.ggml.scores\"",
                &format!("offset {count_at}"),
                &count.to_string(),
            ],
        );
    }
}

#[test]
fn bad_value_type_ids_and_nested_arrays() {
    for ty in [13u32, 100, u32::MAX] {
        let mut r = Raw::new(3, 0, 1);
        let at = r.kv("general.x", ty, &[0u8; 16]);
        let type_at = at + 8 + 9;
        assert_mentions(
            &err(r.b),
            &[
                "\"general.x\"",
                &format!("offset {type_at}"),
                &ty.to_string(),
            ],
        );
    }
    // Array of unknown element type.
    let mut r = Raw::new(3, 0, 1);
    let mut payload = 13u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0u8; 16]);
    let at = r.kv("arr", 9, &payload);
    assert_mentions(
        &err(r.b),
        &["\"arr\"", &format!("offset {}", at + 15), "13"],
    );
    // Nested array.
    let mut r = Raw::new(3, 0, 1);
    let mut payload = 9u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1u64.to_le_bytes());
    payload.extend_from_slice(&4u32.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    let at = r.kv("nest", 9, &payload);
    assert_mentions(
        &err(r.b),
        &["\"nest\"", "nested", &format!("offset {}", at + 16)],
    );
}

#[test]
fn bad_bool_and_bad_utf8_key() {
    let mut r = Raw::new(3, 0, 1);
    let at = r.kv("flag", 7, &[2]);
    assert_mentions(
        &err(r.b),
        &["\"flag\"", "bool", &format!("offset {}", at + 16)],
    );
    let mut r = Raw::new(3, 0, 1);
    r.u64(2);
    r.b.extend_from_slice(&[0xFF, 0xFE]);
    r.u32(0);
    r.b.push(0);
    assert_mentions(&err(r.b), &["key #0", "UTF-8", "offset 24"]);
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let mut r = Raw::new(3, 0, 2);
    let first = r.kv_u32("llama.block_count", 2);
    let second = r.kv_u32("llama.block_count", 3);
    assert_mentions(
        &err(r.b),
        &[
            "\"llama.block_count\"",
            "duplicate",
            &format!("offset {second}"),
            &format!("offset {first}"),
        ],
    );

    let mut r = Raw::new(3, 2, 0);
    let first = r.tensor("w", &[8], 0, 0);
    let second = r.tensor("w", &[8], 0, 32);
    let b = r.data(32, 64);
    assert_mentions(
        &err(b),
        &[
            "\"w\"",
            "duplicate",
            &format!("offset {second}"),
            &format!("offset {first}"),
        ],
    );
}

#[test]
fn bad_alignment_key() {
    // Wrong type (u64).
    let mut r = Raw::new(3, 0, 1);
    let at = r.kv("general.alignment", 10, &64u64.to_le_bytes());
    assert_mentions(
        &err(r.b),
        &["general.alignment", "u64", "u32", &format!("offset {at}")],
    );
    // Not a power of two, and zero.
    for a in [48u32, 0, 3] {
        let mut r = Raw::new(3, 0, 1);
        let at = r.kv_u32("general.alignment", a);
        assert_mentions(
            &err(r.b),
            &["general.alignment", "power of two", &format!("offset {at}")],
        );
    }
    // A valid non-default alignment is honoured: data starts at a multiple of 64.
    let mut r = Raw::new(3, 1, 1);
    r.kv_u32("general.alignment", 64);
    r.tensor("t", &[4], 0, 0);
    let f = GgufFile::from_bytes(r.data(64, 16)).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_start() % 64, 0);
    assert_eq!(f.tensor_data("t").unwrap(), &[0xAB; 16]);
}

#[test]
fn bad_tensor_type_ids() {
    // Removed (4, 37), no layout known (41), unknown (43, u32::MAX).
    for ty in [4u32, 37, 41, 43, u32::MAX] {
        let mut r = Raw::new(3, 1, 0);
        let at = r.tensor("blk.0.ffn_down.weight", &[256, 2], ty, 0);
        let type_at = at + 8 + 21 + 4 + 16;
        let b = r.data(32, 4096);
        assert_mentions(
            &err(b),
            &[
                "\"blk.0.ffn_down.weight\"",
                &ty.to_string(),
                &format!("offset {type_at}"),
            ],
        );
    }
    // Known-but-unsupported opens (for `info`) but is rejected for use.
    let iq = type_info(17).unwrap();
    let mut r = Raw::new(3, 1, 0);
    r.tensor("iq", &[256], 17, 0);
    let f = GgufFile::from_bytes(r.data(32, iq.block_bytes as usize)).unwrap();
    assert_mentions(
        &f.tensor("iq").unwrap().ggml_type().unwrap_err().to_string(),
        &["\"iq\"", "IQ2_XS"],
    );
}

#[test]
fn bad_dims() {
    // n_dims > 4.
    let mut r = Raw::new(3, 1, 0);
    let at = r.tensor("five", &[1, 1, 1, 1, 1], 0, 0);
    assert_mentions(
        &err(r.data(32, 32)),
        &["\"five\"", "n_dims is 5", &format!("offset {}", at + 12)],
    );
    // n_dims huge: must not allocate or read past the end.
    let mut r = Raw::new(3, 1, 0);
    r.str("big").u32(u32::MAX);
    assert_mentions(&err(r.data(32, 0)), &["\"big\"", "n_dims"]);
    // Negative ne.
    let mut r = Raw::new(3, 1, 0);
    let at = r.tensor("neg", &[4, -2], 0, 0);
    assert_mentions(
        &err(r.data(32, 32)),
        &[
            "\"neg\"",
            "ne[1] = -2",
            &format!("offset {}", at + 11 + 4 + 8),
        ],
    );
    // ne[0] not a multiple of the block size.
    let mut r = Raw::new(3, 1, 0);
    r.tensor("q8", &[48], 8, 0);
    assert_mentions(&err(r.data(32, 64)), &["\"q8\"", "block size 32", "offset"]);
    // Element count overflowing i64.
    let mut r = Raw::new(3, 1, 0);
    r.tensor("huge", &[1 << 32, 1 << 32], 0, 0);
    assert_mentions(&err(r.data(32, 64)), &["\"huge\"", "overflow"]);
    // Name of 64 bytes.
    let long = "n".repeat(64);
    let mut r = Raw::new(3, 1, 0);
    let at = r.tensor(&long, &[4], 0, 0);
    assert_mentions(
        &err(r.data(32, 16)),
        &[&long, "64", &format!("offset {at}")],
    );
}

#[test]
fn bad_tensor_offsets() {
    // Misaligned.
    let mut r = Raw::new(3, 1, 0);
    let at = r.tensor("mis", &[4], 0, 4);
    assert_mentions(
        &err(r.data(32, 64)),
        &["\"mis\"", "alignment 32", &format!("offset {at}")],
    );
    // Out of range, including overflow of data_start + offset.
    for off in [64u64, 1 << 40, u64::MAX - 31] {
        let mut r = Raw::new(3, 1, 0);
        let at = r.tensor("far", &[4], 0, off);
        assert_mentions(
            &err(r.data(32, 64)),
            &["\"far\"", "past the end", &format!("offset {at}")],
        );
    }
    // Overlapping: a 64-byte tensor at 0 and another at 32.
    let mut r = Raw::new(3, 2, 0);
    r.tensor("big", &[16], 0, 0);
    let at = r.tensor("over", &[8], 0, 32);
    assert_mentions(
        &err(r.data(32, 128)),
        &["\"over\"", "overlaps", "\"big\"", &format!("offset {at}")],
    );
    // Overlap hidden behind a zero-size tensor in between.
    let mut r = Raw::new(3, 3, 0);
    r.tensor("big", &[32], 0, 0);
    r.tensor("empty", &[0], 0, 32);
    let at = r.tensor("late", &[8], 0, 64);
    assert_mentions(
        &err(r.data(32, 256)),
        &["\"late\"", "overlaps", "\"big\"", &format!("offset {at}")],
    );
    // Non-contiguous but aligned, in range and disjoint is accepted (not every writer packs).
    let mut r = Raw::new(3, 2, 0);
    r.tensor("b", &[8], 0, 64);
    r.tensor("a", &[8], 0, 0);
    let f = GgufFile::from_bytes(r.data(32, 96)).unwrap();
    assert_eq!(f.tensor("b").unwrap().offset, 64);
}
