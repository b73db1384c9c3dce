//! GGUF writer → reader round trips: every value type, every supported tensor type, v2 and v3
//! headers, non-default alignment, the exact byte layout llama.cpp requires, atomic `write_file`.

use bfpo_lite::gguf::{
    GgmlType, GgufFile, GgufWriter, MAX_TENSOR_NAME, Value, ValueType, type_info,
};
use bfpo_lite::util::rng::Rng;

fn pad(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// One value of every scalar type, including extremes.
fn scalar_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(0xFE)),
        ("t.i8", Value::I8(-128)),
        ("t.u16", Value::U16(0xBEEF)),
        ("t.i16", Value::I16(-12345)),
        ("t.u32", Value::U32(u32::MAX)),
        ("t.i32", Value::I32(i32::MIN)),
        ("t.f32", Value::F32(-1.5e-7)),
        ("t.f32_inf", Value::F32(f32::INFINITY)),
        ("t.f32_negzero", Value::F32(-0.0)),
        ("t.bool_t", Value::Bool(true)),
        ("t.bool_f", Value::Bool(false)),
        (
            "t.str",
            Value::String("héllo ▁wörld <|im_start|>\n".to_string()),
        ),
        ("t.str_empty", Value::String(String::new())),
        ("t.u64", Value::U64(u64::MAX - 1)),
        ("t.i64", Value::I64(i64::MIN + 3)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
    ]
}

/// Arrays of every element type (non-empty and empty).
fn array_values() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let samples: Vec<(ValueType, Vec<Value>)> = vec![
        (ValueType::U8, vec![Value::U8(0), Value::U8(255)]),
        (ValueType::I8, vec![Value::I8(-1), Value::I8(127)]),
        (ValueType::U16, vec![Value::U16(1), Value::U16(65535)]),
        (ValueType::I16, vec![Value::I16(-32768), Value::I16(2)]),
        (ValueType::U32, vec![Value::U32(7), Value::U32(1 << 31)]),
        (
            ValueType::I32,
            vec![Value::I32(1), Value::I32(-6), Value::I32(3)],
        ),
        (ValueType::F32, vec![Value::F32(0.25), Value::F32(-1e30)]),
        (ValueType::Bool, vec![Value::Bool(true), Value::Bool(false)]),
        (
            ValueType::String,
            vec![
                Value::String("<unk>".into()),
                Value::String(String::new()),
                Value::String("Ġworld".into()),
            ],
        ),
        (ValueType::U64, vec![Value::U64(u64::MAX)]),
        (ValueType::I64, vec![Value::I64(-1), Value::I64(i64::MAX)]),
        (ValueType::F64, vec![Value::F64(1e-300), Value::F64(-2.0)]),
    ];
    for (ty, items) in samples {
        out.push((format!("arr.{}", ty.name()), Value::Array(ty, items)));
        out.push((format!("arr_empty.{}", ty.name()), Value::Array(ty, vec![])));
    }
    out
}

#[test]
fn every_value_type_round_trips_in_order() {
    let mut w = GgufWriter::new();
    let mut expected: Vec<(String, Value)> = Vec::new();
    for (k, v) in scalar_values() {
        w.set(k, v.clone());
        expected.push((k.to_string(), v));
    }
    for (k, v) in array_values() {
        w.set(k.clone(), v.clone());
        expected.push((k, v));
    }
    // Replacing a key keeps its first position.
    w.set("t.u8", Value::U8(3));
    expected[0].1 = Value::U8(3);

    let f = GgufFile::from_bytes(w.to_bytes()).expect("reads back");
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert!(f.tensors().is_empty());
    assert_eq!(f.kvs().len(), expected.len());
    for ((k, v), (ek, ev)) in f.kvs().iter().zip(&expected) {
        assert_eq!(k, ek);
        // -0.0 == 0.0 under PartialEq, so compare float bit patterns too.
        match (v, ev) {
            (Value::F32(a), Value::F32(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{k}"),
            _ => assert_eq!(v, ev, "{k}"),
        }
        assert_eq!(f.get(ek), Some(ev));
    }
    assert!(
        f.get("general.alignment").is_none(),
        "alignment 32 is not written"
    );
    // Typed accessors.
    assert_eq!(f.get_u32("t.u32").unwrap(), u32::MAX);
    assert_eq!(f.get_u32("t.u8").unwrap(), 3);
    assert_eq!(f.get_f32("t.f32").unwrap(), -1.5e-7);
    assert_eq!(f.get_str("t.str").unwrap(), "héllo ▁wörld <|im_start|>\n");
    let e = f.get_u32("t.i32").unwrap_err().to_string();
    assert!(
        e.contains("t.i32") && e.contains("u32"),
        "negative i32 as u32: {e}"
    );
    let e = f.get_str("t.u8").unwrap_err().to_string();
    assert!(e.contains("t.u8") && e.contains("string"), "{e}");
    let e = f.get_u32("missing.key").unwrap_err().to_string();
    assert!(e.contains("missing.key") && e.contains("missing"), "{e}");
}

/// Writes one tensor of every supported type (plus F32 vectors of odd sizes) and checks
/// infos, bytes, offsets and zero padding against an independent computation.
fn tensors_round_trip(alignment: u64) {
    let mut rng = Rng::new(0x6767_7566 + alignment);
    let mut specs: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    for (i, t) in GgmlType::ALL.into_iter().enumerate() {
        let ne0 = t.block_elems() as u64 * (1 + i as u64 % 3);
        let ne = vec![ne0, 3];
        let n_bytes = (ne0 / t.block_elems() as u64) * t.block_bytes() as u64 * 3;
        specs.push((
            format!("blk.{i}.{}.weight", t.name().to_lowercase()),
            ne,
            t.id(),
            random_bytes(&mut rng, n_bytes as usize),
        ));
    }
    // Odd sizes that need padding, a 4-d tensor, and a 1-element tensor.
    specs.push(("odd.f32".into(), vec![7], 0, random_bytes(&mut rng, 28)));
    specs.push((
        "four.d".into(),
        vec![2, 3, 1, 2],
        1,
        random_bytes(&mut rng, 24),
    ));
    specs.push(("one".into(), vec![1], 0, random_bytes(&mut rng, 4)));

    let mut w = GgufWriter::with_alignment(alignment);
    w.set("general.architecture", Value::String("llama".into()));
    for (name, ne, ty, data) in &specs {
        w.add_tensor(name.clone(), ne, *ty, data.as_slice())
            .unwrap();
    }
    let bytes = w.to_bytes();
    let f = GgufFile::from_bytes(bytes.clone()).expect("reads back");

    assert_eq!(f.alignment(), alignment);
    match f.get("general.alignment") {
        None => assert_eq!(alignment, 32),
        Some(v) => {
            assert_ne!(alignment, 32, "general.alignment written only when != 32");
            assert_eq!(v, &Value::U32(alignment as u32));
        }
    }
    assert_eq!(f.data_start() % alignment, 0);
    assert_eq!(f.tensors().len(), specs.len());

    // Offsets: contiguous, declared order, each padded (llama.cpp's gguf.cpp rule).
    let mut expected_offset = 0u64;
    for (t, (name, ne, ty, data)) in f.tensors().iter().zip(&specs) {
        assert_eq!(&t.name, name);
        assert_eq!(&t.ne, ne);
        assert_eq!(t.type_id, *ty);
        assert_eq!(t.n_bytes, data.len() as u64);
        let info = type_info(*ty).unwrap();
        assert_eq!(
            t.n_bytes,
            t.n_elements() / info.block_elems * info.block_bytes
        );
        assert_eq!(t.offset, expected_offset, "offset of {name}");
        assert_eq!(f.tensor_bytes(t), data.as_slice(), "bytes of {name}");
        assert_eq!(f.tensor(name), Some(t));
        assert!(t.ggml_type().is_ok() || GgmlType::from_id(*ty).is_none());
        // Padding after each tensor is zeros.
        let end = f.data_start() + t.offset + t.n_bytes;
        let padded_end = f.data_start() + pad(t.offset + t.n_bytes, alignment);
        assert!(
            bytes[end as usize..padded_end as usize]
                .iter()
                .all(|&b| b == 0)
        );
        expected_offset += pad(data.len() as u64, alignment);
    }
    assert_eq!(bytes.len() as u64, f.data_start() + expected_offset);
    // Header padding is zeros: find the end of the infos by walking back over zeros is not
    // reliable, so check the bytes between the last info's last field and data_start instead.
    let last = f.tensors().last().unwrap();
    let infos_end =
        last.info_offset + 8 + last.name.len() as u64 + 4 + 8 * last.ne.len() as u64 + 4 + 8;
    assert_eq!(f.data_start(), pad(infos_end, alignment));
    assert!(
        bytes[infos_end as usize..f.data_start() as usize]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn every_tensor_type_round_trips_default_alignment() {
    tensors_round_trip(32);
}

#[test]
fn every_tensor_type_round_trips_non_default_alignment() {
    tensors_round_trip(64);
    tensors_round_trip(4096);
    tensors_round_trip(8);
}

/// A tiny file whose every byte is written out by hand here, independently of the writer.
#[test]
fn exact_bytes_of_a_tiny_file() {
    let data: Vec<u8> = [1.0f32, -2.0, 0.5]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let mut w = GgufWriter::new();
    w.set("a", Value::U8(7));
    w.add_tensor("t", &[3], 0, data.clone()).unwrap();
    w.add_tensor("u", &[1], 0, vec![9, 9, 9, 9]).unwrap();
    let got = w.to_bytes();

    let mut e = Vec::new();
    e.extend_from_slice(b"GGUF");
    e.extend_from_slice(&3u32.to_le_bytes());
    e.extend_from_slice(&2i64.to_le_bytes()); // n_tensors
    e.extend_from_slice(&1i64.to_le_bytes()); // n_kv
    e.extend_from_slice(&1u64.to_le_bytes());
    e.push(b'a');
    e.extend_from_slice(&0u32.to_le_bytes()); // u8
    e.push(7);
    // tensor "t": n_dims 1, ne [3], F32, offset 0
    e.extend_from_slice(&1u64.to_le_bytes());
    e.push(b't');
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&3i64.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    // tensor "u": offset PAD(12, 32) = 32
    e.extend_from_slice(&1u64.to_le_bytes());
    e.push(b'u');
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&1i64.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&32u64.to_le_bytes());
    assert_eq!(e.len(), 104);
    e.resize(128, 0); // header padded to 32
    e.extend_from_slice(&data);
    e.resize(160, 0);
    e.extend_from_slice(&[9, 9, 9, 9]);
    e.resize(192, 0);
    assert_eq!(got, e);
}

#[test]
fn version_2_header_reads() {
    let mut w = GgufWriter::new();
    w.set("general.name", Value::String("v2".into()));
    w.add_tensor("x", &[4, 2], 0, vec![0u8; 32]).unwrap();
    let mut bytes = w.to_bytes();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.get_str("general.name").unwrap(), "v2");
    assert_eq!(f.tensor("x").unwrap().ne, vec![4, 2]);
}

#[test]
fn known_but_unsupported_types_open_but_do_not_convert() {
    // IQ2_XS (17) and Q2_K (10): real models carry them; `info` must be able to describe them.
    let mut w = GgufWriter::new();
    let iq = type_info(17).unwrap();
    w.add_tensor("iq", &[256, 2], 17, vec![1u8; 2 * iq.block_bytes as usize])
        .unwrap();
    w.add_tensor("q2k", &[256], 10, vec![2u8; 84]).unwrap();
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let t = f.tensor("iq").unwrap();
    assert_eq!(t.type_name(), "IQ2_XS");
    let e = t.ggml_type().unwrap_err().to_string();
    assert!(e.contains("\"iq\"") && e.contains("IQ2_XS"), "{e}");
    assert!(f.tensor("q2k").unwrap().ggml_type().is_err());
}

#[test]
fn writer_rejects_bad_tensors_and_values() {
    let mut w = GgufWriter::new();
    let long = "x".repeat(MAX_TENSOR_NAME);
    let e = w
        .add_tensor(long.clone(), &[1], 0, vec![0u8; 4])
        .unwrap_err();
    assert!(e.to_string().contains("64"), "{e}");
    w.add_tensor(&long[..MAX_TENSOR_NAME - 1], &[1], 0, vec![0u8; 4])
        .expect("63-byte name is fine");
    let e = w
        .add_tensor("five", &[1, 1, 1, 1, 1], 0, vec![0u8; 4])
        .unwrap_err();
    assert!(
        e.to_string().contains("five") && e.to_string().contains('5'),
        "{e}"
    );
    let e = w.add_tensor("len", &[4], 0, vec![0u8; 15]).unwrap_err();
    assert!(
        e.to_string().contains("15") && e.to_string().contains("16"),
        "{e}"
    );
    let e = w.add_tensor("blk", &[16], 8, vec![0u8; 17]).unwrap_err();
    assert!(e.to_string().contains("block size 32"), "{e}");
    let e = w.add_tensor("ty", &[4], 37, vec![0u8; 16]).unwrap_err();
    assert!(e.to_string().contains("37"), "{e}");
    w.add_tensor("dup", &[1], 0, vec![0u8; 4]).unwrap();
    let e = w.add_tensor("dup", &[1], 0, vec![0u8; 4]).unwrap_err();
    assert!(e.to_string().contains("dup"), "{e}");

    let mut w = GgufWriter::new();
    w.set(
        "mixed",
        Value::Array(ValueType::U32, vec![Value::U32(1), Value::I32(2)]),
    );
    let e = w.try_to_bytes().unwrap_err().to_string();
    assert!(e.contains("mixed") && e.contains("element 1"), "{e}");
    let mut w = GgufWriter::new();
    w.set("nested", Value::Array(ValueType::Array, vec![]));
    assert!(w.try_to_bytes().unwrap_err().to_string().contains("nested"));
    let w = GgufWriter::with_alignment(48);
    assert!(
        w.try_to_bytes()
            .unwrap_err()
            .to_string()
            .contains("power of two")
    );
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U64(64));
    assert!(w.try_to_bytes().is_err());
    // Setting alignment 32 explicitly writes no key.
    let mut w = GgufWriter::with_alignment(64);
    w.set("general.alignment", Value::U32(32));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(f.get("general.alignment").is_none());
    assert_eq!(f.alignment(), 32);
}

#[test]
fn write_file_is_atomic_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String("adapter".into()));
    w.add_tensor("a", &[8], 0, vec![5u8; 32]).unwrap();
    w.write_file(&path).unwrap();
    // Overwrite an existing file.
    let mut w2 = GgufWriter::new();
    w2.set("general.type", Value::String("adapter2".into()));
    w2.write_file(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("adapter.gguf")]);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), Some(path.as_path()));
    assert_eq!(f.get_str("general.type").unwrap(), "adapter2");
    assert!(f.tensors().is_empty());
    assert_eq!(f.bytes(), w2.to_bytes().as_slice());

    // A missing folder: an error naming the path, nothing created.
    let bad = dir.path().join("no/such/dir/x.gguf");
    let e = w.write_file(&bad).unwrap_err().to_string();
    assert!(e.contains("no/such/dir"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // An invalid writer fails before touching the disk.
    let mut w3 = GgufWriter::new();
    w3.set("m", Value::Array(ValueType::U8, vec![Value::Bool(true)]));
    assert!(w3.write_file(&dir.path().join("m.gguf")).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn open_reports_missing_file_with_path() {
    let e = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}
