//! Reference log-prob cache: round trip, key invalidation by every key part, corrupted files as
//! misses with reasons, atomic writes, and model fingerprints with their memo.

use bfpo_lite::data::batch::{PairExamples, TruncationConfig, build_pair_examples};
use bfpo_lite::data::refcache::{CacheLookup, MissReason, RefCache, RefLogps, sha256_file};
use bfpo_lite::util::Rng;

fn examples(rng: &mut Rng, n: usize) -> Vec<PairExamples> {
    let cfg = TruncationConfig::default();
    (0..n)
        .map(|i| {
            let mut ids = |len: u64| -> Vec<u32> {
                (0..1 + rng.below(len))
                    .map(|_| rng.below(1000) as u32)
                    .collect()
            };
            let (p, c, r) = (ids(20), ids(15), ids(15));
            build_pair_examples(i, &p, &c, &r, &cfg).unwrap()
        })
        .collect()
}

fn values(rng: &mut Rng, n: usize) -> Vec<RefLogps> {
    (0..n)
        .map(|_| RefLogps {
            chosen: -100.0 * rng.next_f64(),
            rejected: -100.0 * rng.next_f64(),
            chosen_tokens: rng.below(500) as u32,
            rejected_tokens: rng.below(500) as u32,
        })
        .collect()
}

const MODEL: &[u8] = b"gguf size=123 sha256=00ff";
const SETTINGS: &str = "engine=wgpu-f32 v1";

#[test]
fn round_trip_is_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    let cache = RefCache::open(d.path().join("nested/cache")).unwrap();
    let mut rng = Rng::new(1);
    let ex = examples(&mut rng, 37);
    let v = values(&mut rng, 37);
    let key = RefCache::key(MODEL, &ex, SETTINGS);
    match cache.lookup(&key) {
        CacheLookup::Miss {
            reason: MissReason::Absent,
            ..
        } => {}
        other => panic!("expected an absent miss, got {other:?}"),
    }
    let path = cache.store(&key, &v).unwrap();
    assert_eq!(path, cache.path(&key));
    let got = cache.load(&key).unwrap();
    assert_eq!(got.len(), v.len());
    for (a, b) in got.iter().zip(&v) {
        assert_eq!(a.chosen.to_bits(), b.chosen.to_bits());
        assert_eq!(a.rejected.to_bits(), b.rejected.to_bits());
        assert_eq!(
            (a.chosen_tokens, a.rejected_tokens),
            (b.chosen_tokens, b.rejected_tokens)
        );
    }
    // File size: 56-byte header + 24 per pair + 32-byte checksum.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 56 + 24 * 37 + 32);
    // Overwrite; no temporary files are left behind.
    let v2 = values(&mut rng, 37);
    cache.store(&key, &v2).unwrap();
    assert_eq!(cache.load(&key).unwrap(), v2);
    let names: Vec<String> = std::fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [format!("{key}.refcache")]);
    // An empty dataset round-trips too.
    let k0 = RefCache::key(MODEL, &[], SETTINGS);
    cache.store(&k0, &[]).unwrap();
    assert_eq!(cache.load(&k0).unwrap(), vec![]);
}

#[test]
fn key_changes_with_every_part() {
    let mut rng = Rng::new(2);
    let ex = examples(&mut rng, 10);
    let k = RefCache::key(MODEL, &ex, SETTINGS);
    assert_eq!(
        k,
        RefCache::key(MODEL, &ex.clone(), SETTINGS),
        "deterministic"
    );
    assert_eq!(
        k,
        RefCache::key_from_iter(MODEL, ex.iter().map(|p| (&p.chosen, &p.rejected)), SETTINGS)
    );
    let mut keys = vec![k];
    keys.push(RefCache::key(b"gguf size=123 sha256=00fe", &ex, SETTINGS));
    keys.push(RefCache::key(MODEL, &ex, "engine=wgpu-f32 v2"));
    keys.push(RefCache::key(MODEL, &ex[..9], SETTINGS));
    let mut swapped = ex.clone();
    swapped.swap(0, 1);
    keys.push(RefCache::key(MODEL, &swapped, SETTINGS));
    for (i, which) in [(3usize, 0usize), (7, 1)] {
        let mut e = ex.clone();
        let seq = if which == 0 {
            &mut e[i].chosen
        } else {
            &mut e[i].rejected
        };
        let last = seq.ids.len() - 1;
        seq.ids[last] ^= 1; // one token id
        keys.push(RefCache::key(MODEL, &e, SETTINGS));
        let mut e = ex.clone();
        let seq = if which == 0 {
            &mut e[i].chosen
        } else {
            &mut e[i].rejected
        };
        seq.response_start -= 1; // same ids, another prompt/response boundary
        keys.push(RefCache::key(MODEL, &e, SETTINGS));
    }
    // Swapping chosen and rejected of a pair.
    let mut e = ex.clone();
    let p0 = &mut e[0];
    std::mem::swap(&mut p0.chosen, &mut p0.rejected);
    keys.push(RefCache::key(MODEL, &e, SETTINGS));
    // Moving bytes between the identity and the settings (length prefixes).
    keys.push(RefCache::key(
        b"gguf size=123 sha256=00f",
        &ex,
        "fengine=wgpu-f32 v1",
    ));
    let distinct: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "{keys:?}");

    // A stored entry is not found under a changed key.
    let d = tempfile::tempdir().unwrap();
    let cache = RefCache::open(d.path()).unwrap();
    cache.store(&keys[0], &values(&mut rng, 10)).unwrap();
    for k in &keys[1..] {
        assert!(cache.load(k).is_none());
    }
    assert!(cache.load(&keys[0]).is_some());
}

fn corrupt_reason(cache: &RefCache, key: &bfpo_lite::data::refcache::CacheKey) -> String {
    match cache.lookup(key) {
        CacheLookup::Miss {
            reason: MissReason::Corrupt(s),
            ..
        } => s,
        other => panic!("expected a corrupt miss, got {other:?}"),
    }
}

#[test]
fn corrupted_files_are_misses_with_reasons() {
    let d = tempfile::tempdir().unwrap();
    let cache = RefCache::open(d.path()).unwrap();
    let mut rng = Rng::new(3);
    let ex = examples(&mut rng, 5);
    let key = RefCache::key(MODEL, &ex, SETTINGS);
    let path = cache.store(&key, &values(&mut rng, 5)).unwrap();
    let good = std::fs::read(&path).unwrap();

    let mut flipped = good.clone();
    flipped[56 + 30] ^= 0x10; // inside a record
    std::fs::write(&path, &flipped).unwrap();
    assert!(corrupt_reason(&cache, &key).contains("checksum"));

    std::fs::write(&path, &good[..good.len() - 7]).unwrap();
    let r = corrupt_reason(&cache, &key);
    assert!(r.contains("truncated") && r.contains("5 pairs"), "{r}");

    std::fs::write(&path, &good[..20]).unwrap();
    assert!(corrupt_reason(&cache, &key).contains("shorter"));

    std::fs::write(&path, b"").unwrap();
    assert!(corrupt_reason(&cache, &key).contains("0 bytes"));

    let mut magic = good.clone();
    magic[0] = b'X';
    std::fs::write(&path, &magic).unwrap();
    assert!(corrupt_reason(&cache, &key).contains("magic"));

    let mut ver = good.clone();
    ver[8] = 9;
    std::fs::write(&path, &ver).unwrap();
    let r = corrupt_reason(&cache, &key);
    assert!(r.contains("version 9") && r.contains("version 1"), "{r}");

    // Another key's file copied under this name.
    let other = RefCache::key(MODEL, &ex[..4], SETTINGS);
    let p2 = cache.store(&other, &values(&mut rng, 4)).unwrap();
    std::fs::copy(&p2, &path).unwrap();
    assert!(corrupt_reason(&cache, &key).contains(&other.hex()));

    // A huge claimed count does not allocate or panic.
    let mut big = good.clone();
    big[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &big).unwrap();
    assert!(corrupt_reason(&cache, &key).contains("truncated"));

    // A directory where the file should be: unreadable, still a miss.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(
        cache.lookup(&key),
        CacheLookup::Miss {
            reason: MissReason::Unreadable(_),
            ..
        }
    ));
    assert!(cache.load(&key).is_none());
}

#[test]
fn store_refuses_non_finite_values() {
    let d = tempfile::tempdir().unwrap();
    let cache = RefCache::open(d.path()).unwrap();
    let mut v = values(&mut Rng::new(4), 3);
    v[2].rejected = f64::NEG_INFINITY;
    let key = RefCache::key(MODEL, &[], SETTINGS);
    let e = cache.store(&key, &v).unwrap_err().to_string();
    assert!(e.contains("pair 2") && e.contains("-inf"), "{e}");
    assert!(!cache.path(&key).exists());
}

#[test]
fn fingerprint_hashes_whole_file_and_memoizes() {
    let d = tempfile::tempdir().unwrap();
    let cache = RefCache::open(d.path().join("cache")).unwrap();
    let model = d.path().join("m.gguf");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&model, &data).unwrap();
    let f1 = cache.fingerprint(&model).unwrap();
    assert!(!f1.from_memo);
    assert_eq!(f1.size, data.len() as u64);
    // Independent check of the whole-file hash.
    use sha2::Digest;
    let want: [u8; 32] = sha2::Sha256::digest(&data).into();
    assert_eq!(f1.sha256, want);
    assert_eq!(sha256_file(&model).unwrap(), (data.len() as u64, want));
    assert!(cache.dir().join("fingerprints.json").exists());
    // Second call: from the memo, same value.
    let f2 = cache.fingerprint(&model).unwrap();
    assert!(f2.from_memo);
    assert_eq!((f2.size, f2.sha256), (f1.size, f1.sha256));
    assert_eq!(f1.identity(), f2.identity());
    let id = String::from_utf8(f1.identity()).unwrap();
    assert!(id.starts_with("gguf size=3000000 sha256="), "{id}");

    // Same size, one byte changed, new mtime: rehashed, new value.
    let mut changed = data.clone();
    changed[1_234_567] ^= 1;
    std::fs::write(&model, &changed).unwrap();
    let f = std::fs::File::options().write(true).open(&model).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let f3 = cache.fingerprint(&model).unwrap();
    assert!(!f3.from_memo);
    assert_ne!(f3.sha256, f1.sha256);

    // A corrupted memo file is ignored (rehash), then rewritten.
    std::fs::write(cache.dir().join("fingerprints.json"), b"{not json").unwrap();
    let f4 = cache.fingerprint(&model).unwrap();
    assert!(!f4.from_memo);
    assert_eq!(f4.sha256, f3.sha256);
    assert!(cache.fingerprint(&model).unwrap().from_memo);

    // A missing model is an error naming it.
    let e = cache
        .fingerprint(&d.path().join("nope.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.gguf"), "{e}");
}
