//! Fuzz the GGUF reader: arbitrary bytes must give `Ok` or `Err`, never a panic, a hang or
//! unbounded memory. Whatever the reader accepts must survive a writer → reader round trip.

#![no_main]

use bfpo_lite::gguf::{GgufFile, GgufWriter, Value};
use libfuzzer_sys::fuzz_target;

/// Value equality that treats floats by bit pattern (NaN == NaN).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(ta, xa), Value::Array(tb, xb)) => {
            ta == tb && xa.len() == xb.len() && xa.iter().zip(xb).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for (k, v) in f.kvs() {
        assert!(f.get(k).is_some());
        let _ = v.summary(16);
        let _ = f.get_u32(k).map_err(|e| e.to_string());
        let _ = f.get_f32(k).map_err(|e| e.to_string());
        let _ = f.get_str(k).map_err(|e| e.to_string());
    }
    for t in f.tensors() {
        assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes);
        assert_eq!(f.tensor(&t.name), Some(t));
        let _ = t.ggml_type().map_err(|e| e.to_string());
        let _ = t.n_elements();
    }

    // Round trip through the writer (it pads the header to the alignment, so skip huge ones;
    // it requires 1..=4 dims, the reader also accepts 0).
    if f.alignment() > 65536 || f.tensors().iter().any(|t| t.ne.is_empty()) {
        return;
    }
    let mut w = GgufWriter::new();
    for (k, v) in f.kvs() {
        w.set(k.clone(), v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), &t.ne, t.type_id, f.tensor_bytes(t))
            .expect("writer accepts every tensor the reader accepted");
    }
    let g = GgufFile::from_bytes(
        w.try_to_bytes()
            .expect("writer accepts the reader's values"),
    )
    .expect("reader accepts the writer's output");
    assert_eq!(g.alignment(), f.alignment());
    let kvs = |x: &GgufFile| -> Vec<(String, Value)> {
        x.kvs()
            .iter()
            .filter(|(k, _)| k != "general.alignment")
            .cloned()
            .collect()
    };
    let (a, b) = (kvs(&f), kvs(&g));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(same(va, vb), "value of {ka} changed: {va:?} vs {vb:?}");
    }
    assert_eq!(f.tensors().len(), g.tensors().len());
    for (s, t) in f.tensors().iter().zip(g.tensors()) {
        assert_eq!(
            (&s.name, &s.ne, s.type_id, s.n_bytes),
            (&t.name, &t.ne, t.type_id, t.n_bytes)
        );
        assert_eq!(f.tensor_bytes(s), g.tensor_bytes(t));
    }
});
