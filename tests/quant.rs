//! CPU (de)quantization: hand-built blocks against the format definitions (`docs/gguf.md`
//! §2/§2.1), quantize → dequantize error bounds on seeded random data, exact round trips for the
//! float types, and clean errors for bad lengths.

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::{
    QuantError, byte_len, check_len, dequantize, dequantize_row, dequantize_vec, quantize,
    quantize_into,
};
use bfpo_lite::util::Rng;
use bfpo_lite::util::close::{Tol, assert_close};
use half::{bf16, f16};

const BLOCK_TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Hand-built blocks use scales that are exact in f16 and small integers, so every expected
/// value is exact in f32; the tolerance only guards against a different operation order.
const HAND: Tol = Tol::new(0.0, 1e-6);

fn h(x: f32) -> [u8; 2] {
    let v = f16::from_f32(x);
    assert_eq!(v.to_f32(), x, "test scale {x} must be exact in f16");
    v.to_le_bytes()
}

fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % ty.block_bytes(), 0);
    dequantize_vec(ty, bytes, bytes.len() / ty.block_bytes() * ty.block_elems()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Hand-built blocks
// ---------------------------------------------------------------------------------------------

#[test]
fn q4_0_hand_block() {
    // d = 0.5; byte j holds element j in its low nibble (value j) and element j+16 in its high
    // nibble (value 15 − j). y = (nibble − 8)·d.
    let mut b = Vec::from(h(0.5));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let want: Vec<f32> = (0..32)
        .map(|i| {
            let nib = if i < 16 { i } else { 15 - (i - 16) };
            (nib as f32 - 8.0) * 0.5
        })
        .collect();
    let got = deq(GgmlType::Q4_0, &b);
    assert_close("q4_0 hand", &got, &want, HAND);
    // Edges by hand: nibble 0 → −4, nibble 15 → 3.5; element 16 is the high nibble of byte 0.
    assert_eq!((got[0], got[15], got[16], got[31]), (-4.0, 3.5, 3.5, -4.0));
}

#[test]
fn q4_1_hand_block() {
    // d = 0.25, m = −1.5; low nibbles j, high nibbles 15 − j; y = nibble·d + m.
    let mut b = Vec::from(h(0.25));
    b.extend(h(-1.5));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = deq(GgmlType::Q4_1, &b);
    let want: Vec<f32> = (0..32)
        .map(|i| {
            let nib = if i < 16 { i } else { 31 - i };
            nib as f32 * 0.25 - 1.5
        })
        .collect();
    assert_close("q4_1 hand", &got, &want, HAND);
    assert_eq!((got[0], got[15], got[16]), (-1.5, 2.25, 2.25));
}

/// The fifth bits used by both Q5 tests: qh (LE u32) = 0x8001_F00F sets bits 0–3, 12–15, 16
/// and 31, so elements 0–3, 12–15, 16 and 31 get +16.
const Q5_QH: u32 = 0x8001_F00F;

fn q5_expected_q(i: usize) -> u32 {
    let nib = if i < 16 { i as u32 } else { 31 - i as u32 };
    nib | (((Q5_QH >> i) & 1) << 4)
}

#[test]
fn q5_0_hand_block() {
    let mut b = Vec::from(h(0.125));
    b.extend(Q5_QH.to_le_bytes());
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = deq(GgmlType::Q5_0, &b);
    let want: Vec<f32> = (0..32)
        .map(|i| (q5_expected_q(i) as f32 - 16.0) * 0.125)
        .collect();
    assert_close("q5_0 hand", &got, &want, HAND);
    // By hand: e0 = (0|16)−16 = 0; e4 = 4−16 → −1.5; e15 = (15|16)−16 → 1.875;
    // e16 = (15|16)−16 → 1.875; e17 = 14−16 → −0.25; e31 = (0|16)−16 = 0.
    assert_eq!(
        (got[0], got[4], got[15], got[16], got[17], got[31]),
        (0.0, -1.5, 1.875, 1.875, -0.25, 0.0)
    );
}

#[test]
fn q5_1_hand_block() {
    let mut b = Vec::from(h(0.5));
    b.extend(h(2.0));
    b.extend(Q5_QH.to_le_bytes());
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = deq(GgmlType::Q5_1, &b);
    let want: Vec<f32> = (0..32)
        .map(|i| q5_expected_q(i) as f32 * 0.5 + 2.0)
        .collect();
    assert_close("q5_1 hand", &got, &want, HAND);
    // e15 = 31·0.5 + 2 = 17.5 (the largest 5-bit value); e4 = 4·0.5 + 2 = 4; e31 = 16·0.5 + 2.
    assert_eq!((got[15], got[4], got[31]), (17.5, 4.0, 10.0));
}

#[test]
fn q8_0_hand_block() {
    let qs: Vec<i8> = [-128i8, -127, -1, 0, 1, 127]
        .into_iter()
        .chain((6..32).map(|j| (j * 7 - 100) as i8))
        .collect();
    let mut b = Vec::from(h(0.25));
    b.extend(qs.iter().map(|&q| q as u8));
    let got = deq(GgmlType::Q8_0, &b);
    let want: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.25).collect();
    assert_close("q8_0 hand", &got, &want, HAND);
    assert_eq!(&got[..6], &[-32.0, -31.75, -0.25, 0.0, 0.25, 31.75]);
}

/// Scales and mins (6-bit) of the K-quant hand blocks; pairs 4..8 use values ≥ 16 so the
/// `j ≥ 4` branch of the unpacking must combine both parts.
const K_SC: [u32; 8] = [3, 63, 10, 33, 17, 48, 5, 60];
const K_M: [u32; 8] = [0, 1, 62, 20, 35, 9, 63, 16];
/// The same pairs packed by hand (see the layout in `docs/gguf.md` §2.1):
/// bytes 0..4 = sc[j] | (sc[j+4] >> 4) << 6, bytes 4..8 = m[j] | (m[j+4] >> 4) << 6,
/// bytes 8..12 = (sc[j+4] & 15) | (m[j+4] & 15) << 4.
const K_SCALES: [u8; 12] = [
    0x43, 0xFF, 0x0A, 0xE1, // 3|1<<6, 63|3<<6, 10|0<<6, 33|3<<6
    0x80, 0x01, 0xFE, 0x54, // 0|2<<6, 1|0<<6, 62|3<<6, 20|1<<6
    0x31, 0x90, 0xF5, 0x0C, // 1|3<<4, 0|9<<4, 5|15<<4, 12|0<<4
];

fn pattern(k: usize, mul: usize, add: usize) -> u8 {
    ((k * mul + add) % 256) as u8
}

/// The 4-bit part of K-quant element `e` (Q4_K/Q5_K): chunk c = e/64 uses bytes 32c..32c+32;
/// the first 32 outputs take low nibbles, the next 32 high nibbles.
fn k_nibble(qs: &[u8], e: usize) -> u32 {
    let (c, r) = (e / 64, e % 64);
    let byte = qs[32 * c + r % 32] as u32;
    if r < 32 { byte & 0xF } else { byte >> 4 }
}

#[test]
fn q4_k_hand_block() {
    let (d, dmin) = (0.25f32, 0.125f32);
    let qs: Vec<u8> = (0..128).map(|k| pattern(k, 37, 11)).collect();
    let mut b = Vec::from(h(d));
    b.extend(h(dmin));
    b.extend(K_SCALES);
    b.extend(&qs);
    let got = deq(GgmlType::Q4_K, &b);
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let s = e / 32;
            d * K_SC[s] as f32 * k_nibble(&qs, e) as f32 - dmin * K_M[s] as f32
        })
        .collect();
    assert_close("q4_k hand", &got, &want, HAND);
    // By hand: e0: qs[0] = 11 → 0.25·3·11 − 0 = 8.25. e32: high nibble of qs[0] = 0 →
    // 0 − 0.125·1. e128: qs[64] = 75, low 11, sub-block 4 (sc 17, m 35) → 46.75 − 4.375.
    // e224: qs[96] = 235, high 14, sub-block 7 (sc 60, m 16) → 210 − 2.
    assert_eq!(
        (got[0], got[32], got[128], got[224]),
        (8.25, -0.125, 42.375, 208.0)
    );
}

#[test]
fn q5_k_hand_block() {
    let (d, dmin) = (0.5f32, 0.25f32);
    let qh: Vec<u8> = (0..32).map(|k| pattern(k, 53, 7)).collect();
    let qs: Vec<u8> = (0..128).map(|k| pattern(k, 37, 11)).collect();
    let mut b = Vec::from(h(d));
    b.extend(h(dmin));
    b.extend(K_SCALES);
    b.extend(&qh);
    b.extend(&qs);
    let got = deq(GgmlType::Q5_K, &b);
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let (c, r) = (e / 64, e % 64);
            // Fifth bit: bit 2c of qh[l] for the first 32 outputs of chunk c, bit 2c+1 after.
            let bit = 2 * c + usize::from(r >= 32);
            let high = ((qh[r % 32] as u32 >> bit) & 1) << 4;
            let s = e / 32;
            d * K_SC[s] as f32 * (k_nibble(&qs, e) | high) as f32 - dmin * K_M[s] as f32
        })
        .collect();
    assert_close("q5_k hand", &got, &want, HAND);
    // By hand: e0: qs[0] = 11, qh[0] = 7 (bit 0 set) → 27 → 0.5·3·27 − 0 = 40.5.
    // e255: c 3, l 31: qs[127] = 102 → high nibble 6; qh[31] = (31·53+7) % 256 = 114 =
    // 0b0111_0010, bit 7 clear → q 6 → 0.5·60·6 − 0.25·16 = 176.
    // e192: c 3, l 0, sub-block 6 (sc 5, m 63): qs[96] = 235 → low 11; qh[0] = 7, bit 6
    // clear → 0.5·5·11 − 0.25·63 = 11.75.
    assert_eq!((got[0], got[255], got[192]), (40.5, 176.0, 11.75));
}

/// Q6_K element `e`: half n = e/128; within it group g = (e%128)/32 and l = e%32 select
/// ql[64n + l] (g 0, 2) or ql[64n + l + 32] (g 1, 3), low (g < 2) or high nibble, and bits
/// 2g..2g+2 of qh[32n + l]; the scale is sc[e/16]; y = d·sc·(q − 32).
fn q6_k_expected(d: f32, ql: &[u8], qh: &[u8], sc: &[i8], e: usize) -> f32 {
    let (n, g, l) = (e / 128, (e % 128) / 32, e % 32);
    let lbyte = ql[64 * n + l + if g % 2 == 1 { 32 } else { 0 }] as i32;
    let low = if g < 2 { lbyte & 0xF } else { lbyte >> 4 };
    let high = (qh[32 * n + l] as i32 >> (2 * g)) & 3;
    d * sc[e / 16] as f32 * ((low | (high << 4)) - 32) as f32
}

const Q6_SC: [i8; 16] = [
    1, -1, 2, -3, 5, -8, 13, -21, 34, -55, 89, -128, 127, 0, 7, -7,
];

fn q6_k_block(d: f32, ql: &[u8], qh: &[u8]) -> Vec<u8> {
    let mut b = Vec::from(ql);
    b.extend(qh);
    b.extend(Q6_SC.iter().map(|&s| s as u8));
    b.extend(h(d));
    assert_eq!(b.len(), 210);
    b
}

#[test]
fn q6_k_hand_block_patterned() {
    let d = 0.0625f32;
    let ql: Vec<u8> = (0..128).map(|k| pattern(k, 29, 3)).collect();
    let qh: Vec<u8> = (0..64).map(|k| pattern(k, 71, 5)).collect();
    let got = deq(GgmlType::Q6_K, &q6_k_block(d, &ql, &qh));
    let want: Vec<f32> = (0..256)
        .map(|e| q6_k_expected(d, &ql, &qh, &Q6_SC, e))
        .collect();
    assert_close("q6_k hand", &got, &want, HAND);
}

#[test]
fn q6_k_hand_block_high_bits() {
    // All-zero quants give q = −32 everywhere; then set the 2-bit high parts of l = 0 in each
    // half to 00, 01, 10, 11 (one per group) and a few low nibbles.
    let d = 0.5f32;
    let mut ql = vec![0u8; 128];
    let mut qh = vec![0u8; 64];
    qh[0] = 0b11_10_01_00; // e0: 0, e32: 16, e64: 32, e96: 48 (before low nibbles)
    ql[0] = 0xF5; // e0 low nibble 5; e64 high nibble 15
    qh[32] = 0b00_00_00_11; // e128: high part 3 → 48
    ql[64 + 32] = 0xA0; // e128+96 = e224: high nibble 10 (qh bits 6–7 of qh[32] are 0)
    let got = deq(GgmlType::Q6_K, &q6_k_block(d, &ql, &qh));
    // By hand with sc = Q6_SC (sc[e/16]): e0 q = 5 − 32 = −27, sc 1 → −13.5.
    // e32 q = 16 − 32 = −16, sc[2] = 2 → −16. e64 q = 32 + 15 − 32 = 15, sc[4] = 5 → 37.5.
    // e96 q = 48 − 32 = 16, sc[6] = 13 → 104. e128 q = 16, sc[8] = 34 → 272.
    // e224 q = 10 − 32 = −22, sc[14] = 7 → −77. e16 q = −32, sc[1] = −1 → 16.
    // e176 q = −32, sc[11] = −128 → 2048 (the most negative scale).
    assert_eq!(
        (
            got[0], got[32], got[64], got[96], got[128], got[224], got[16], got[176]
        ),
        (-13.5, -16.0, 37.5, 104.0, 272.0, -77.0, 16.0, 2048.0)
    );
    let want: Vec<f32> = (0..256)
        .map(|e| q6_k_expected(d, &ql, &qh, &Q6_SC, e))
        .collect();
    assert_close("q6_k high bits", &got, &want, HAND);
}

#[test]
fn float_types_hand_values() {
    let f32_bytes: Vec<u8> = [1.5f32, -0.0, f32::INFINITY]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let got = deq(GgmlType::F32, &f32_bytes);
    assert_eq!(got[0], 1.5);
    assert!(got[1] == 0.0 && got[1].is_sign_negative());
    assert_eq!(got[2], f32::INFINITY);
    // F16 0x3C00 = 1, 0xC000 = −2, 0x0001 = 2^-24 (smallest subnormal), 0x7BFF = 65504.
    let f16_bytes = [0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00, 0xFF, 0x7B];
    assert_eq!(
        deq(GgmlType::F16, &f16_bytes),
        vec![1.0, -2.0, 2f32.powi(-24), 65504.0]
    );
    // BF16 0x3F80 = 1, 0xC040 = −3, 0x3E00 = 0.125.
    let bf16_bytes = [0x80, 0x3F, 0x40, 0xC0, 0x00, 0x3E];
    assert_eq!(deq(GgmlType::BF16, &bf16_bytes), vec![1.0, -3.0, 0.125]);
}

// ---------------------------------------------------------------------------------------------
// quantize → dequantize error bounds
// ---------------------------------------------------------------------------------------------

/// Slack for a scale rounded up to f16: relative 2^-10 (one ulp) plus one subnormal step.
const F16_REL: f64 = 1.0 / 1024.0;
const F16_ABS: f64 = 6.0e-8; // 2^-24
/// f32 arithmetic in the dequantizer (a few roundings of values ≤ ~2·amax).
const F32_REL: f64 = 4.0 * f32::EPSILON as f64;

/// Named per-type bound on `|x − deq(quant(x))|` over one block (see the quant module docs):
/// every scheme rounds its scales up so nothing is clipped, leaving half a (slightly enlarged)
/// quantization step.
fn error_bound(ty: GgmlType, block: &[f32]) -> f64 {
    let amax = block.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
    let mn = block.iter().fold(f64::INFINITY, |a, &v| a.min(v as f64));
    let mx = block
        .iter()
        .fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
    let up = |d: f64| d * (1.0 + F16_REL) + F16_ABS; // a scale after rounding up to f16
    let half_step = match ty {
        GgmlType::Q8_0 => up(amax / 127.0) / 2.0,
        GgmlType::Q4_0 => up(amax / 7.0) / 2.0,
        GgmlType::Q5_0 => up(amax / 15.0) / 2.0,
        // m rounded down to f16 widens the range by at most one f16 ulp of min.
        GgmlType::Q4_1 => up((mx - mn + mn.abs() * F16_REL + F16_ABS) / 15.0) / 2.0,
        GgmlType::Q5_1 => up((mx - mn + mn.abs() * F16_REL + F16_ABS) / 31.0) / 2.0,
        // Sub-block step s ≤ (max − min + dmin)/nmax ≤ (2·amax + dmin)/nmax; the 6-bit factor
        // rounded up adds at most one d = up(max s / 63).
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let nmax = if ty == GgmlType::Q4_K { 15.0 } else { 31.0 };
            let dmin = up(amax / 63.0);
            let s = (2.0 * amax + dmin) / nmax;
            (s + up(s / 63.0)) / 2.0
        }
        // Sub-block step amax_i/31 ≤ amax/31, plus one d = up(max step / 127).
        GgmlType::Q6_K => {
            let s = amax / 31.0;
            (s + up(s / 127.0)) / 2.0
        }
        _ => unreachable!(),
    };
    half_step + F32_REL * amax + 1e-12
}

/// Data sets that exercise every branch: Gaussian, heavy outliers, one-signed blocks (the
/// clamped min of K-quants, the fitted sign of Q4_0/Q5_0), constants, zeros, tiny values near
/// the f16 subnormal range, and large values.
fn datasets(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut r = Rng::new(seed);
    let gauss = r.normal_vec(n, 1.0);
    let outliers: Vec<f32> = (0..n)
        .map(|i| {
            let v = r.normal() * 0.05;
            if i % 97 == 5 { v * 400.0 } else { v }
        })
        .collect();
    let positive: Vec<f32> = (0..n).map(|_| r.uniform(0.5, 3.0)).collect();
    let negative: Vec<f32> = (0..n).map(|_| r.uniform(-4.0, -0.25)).collect();
    let constant = vec![0.7f32; n];
    let zeros = vec![0.0f32; n];
    let tiny = r.normal_vec(n, 1e-4);
    let large = r.normal_vec(n, 300.0);
    // Blocks whose largest value is positive and whose smallest sits just inside the fitted
    // range, and the reverse, alternating per 32 elements.
    let signed_edges: Vec<f32> = (0..n)
        .map(|i| {
            let v = r.uniform(-0.9, 0.9);
            let s = if (i / 32) % 2 == 0 { 1.0 } else { -1.0 };
            match i % 32 {
                0 => 1.0 * s,
                1 => -0.95 * s,
                _ => v,
            }
        })
        .collect();
    vec![
        ("gauss", gauss),
        ("outliers", outliers),
        ("positive", positive),
        ("negative", negative),
        ("constant", constant),
        ("zeros", zeros),
        ("tiny", tiny),
        ("large", large),
        ("signed_edges", signed_edges),
    ]
}

#[test]
fn block_types_round_trip_within_bounds() {
    // 8 super-blocks of 256 = 64 legacy blocks per data set.
    let n = 2048;
    for ty in BLOCK_TYPES {
        for (name, x) in datasets(n, 0x9E37 + ty.id() as u64) {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), byte_len(ty, n).unwrap());
            let y = dequantize_vec(ty, &q, n).unwrap();
            for (bi, (xb, yb)) in x
                .chunks(ty.block_elems())
                .zip(y.chunks(ty.block_elems()))
                .enumerate()
            {
                let bound = error_bound(ty, xb);
                assert_close(
                    &format!("{ty} {name} block {bi} (bound {bound:e})"),
                    yb,
                    xb,
                    Tol::new(bound, 0.0),
                );
            }
            if name == "zeros" {
                assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros must stay zero");
            }
        }
    }
}

/// Relative RMS error on N(0, 1) data: a guard that the schemes use their levels sensibly, not
/// only that the worst case is bounded. Round-to-nearest leaves an RMS error of step/√12; with
/// the typical block statistics of Gaussian data (max |x| ≈ 2.4σ over 32 values, ≈ 2.1σ over
/// 16; max − min ≈ 4.2σ over 32) the expected steps are amax/127 (Q8_0), amax₁₆/31 (Q6_K),
/// amax/15 (Q5_0), range/31 (Q5_1, Q5_K), amax/7 (Q4_0), range/15 (Q4_1, Q4_K). Each limit is
/// that estimate plus 25%.
const RMS_LIMIT: [(GgmlType, f64); 8] = [
    (GgmlType::Q8_0, 2.4 / 127.0 / SQRT12 * 1.25),
    (GgmlType::Q6_K, 2.1 / 31.0 / SQRT12 * 1.25),
    (GgmlType::Q5_0, 2.4 / 15.0 / SQRT12 * 1.25),
    (GgmlType::Q5_1, 4.2 / 31.0 / SQRT12 * 1.25),
    (GgmlType::Q5_K, 4.2 / 31.0 / SQRT12 * 1.25),
    (GgmlType::Q4_0, 2.4 / 7.0 / SQRT12 * 1.25),
    (GgmlType::Q4_1, 4.2 / 15.0 / SQRT12 * 1.25),
    (GgmlType::Q4_K, 4.2 / 15.0 / SQRT12 * 1.25),
];
const SQRT12: f64 = 3.464_101_615_137_754_6;

#[test]
fn block_types_relative_rms_error_on_gaussian_data() {
    let n = 256 * 32;
    let x = Rng::new(11).normal_vec(n, 1.0);
    let xx: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    for (ty, limit) in RMS_LIMIT {
        let y = dequantize_vec(ty, &quantize(ty, &x).unwrap(), n).unwrap();
        let ee: f64 = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum();
        let rel = (ee / xx).sqrt();
        assert!(rel <= limit, "{ty}: relative RMS error {rel:.4} > {limit}");
    }
}

#[test]
fn f32_round_trip_is_bit_exact() {
    let mut r = Rng::new(3);
    let x: Vec<f32> = (0..1001)
        .map(|_| f32::from_bits(r.next_u64() as u32))
        .chain([f32::NAN, -0.0, f32::INFINITY, f32::MIN_POSITIVE / 8.0])
        .collect();
    let q = quantize(GgmlType::F32, &x).unwrap();
    let y = dequantize_vec(GgmlType::F32, &q, x.len()).unwrap();
    let xb: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
    let yb: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
    assert_eq!(xb, yb);
}

#[test]
fn f16_and_bf16_round_trip_representable_values_exactly() {
    let mut r = Rng::new(4);
    for ty in [GgmlType::F16, GgmlType::BF16] {
        // Every non-NaN 16-bit pattern of the type (infinities, subnormals, −0 included) in a
        // shuffled order: f32 → type → f32 must be the identity on these.
        let mut bits: Vec<u16> = (0..=u16::MAX)
            .filter(|&b| match ty {
                GgmlType::F16 => !f16::from_bits(b).is_nan(),
                _ => !bf16::from_bits(b).is_nan(),
            })
            .collect();
        r.shuffle(&mut bits);
        let x: Vec<f32> = bits
            .iter()
            .map(|&b| match ty {
                GgmlType::F16 => f16::from_bits(b).to_f32(),
                _ => f32::from_bits((b as u32) << 16),
            })
            .collect();
        let q = quantize(ty, &x).unwrap();
        let stored: Vec<u16> = q
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(stored, bits, "{ty}: stored bits");
        let y = dequantize_vec(ty, &q, x.len()).unwrap();
        assert!(
            x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ty}: values"
        );
    }
}

#[test]
fn f16_and_bf16_round_to_nearest_even() {
    let e = |ty, x: f32| dequantize_vec(ty, &quantize(ty, &[x]).unwrap(), 1).unwrap()[0];
    // F16 has 10 fraction bits: ulp(1) = 2^-10.
    let u = 2f32.powi(-10);
    assert_eq!(e(GgmlType::F16, 1.0 + u / 2.0), 1.0, "tie → even (down)");
    assert_eq!(
        e(GgmlType::F16, 1.0 + 1.5 * u),
        1.0 + 2.0 * u,
        "tie → even (up)"
    );
    assert_eq!(e(GgmlType::F16, 1.0 + 0.6 * u), 1.0 + u, "above half → up");
    assert_eq!(e(GgmlType::F16, 70000.0), f32::INFINITY, "overflow → inf");
    // BF16 has 7 fraction bits: ulp(1) = 2^-7.
    let u = 2f32.powi(-7);
    assert_eq!(e(GgmlType::BF16, 1.0 + u / 2.0), 1.0);
    assert_eq!(e(GgmlType::BF16, 1.0 + 1.5 * u), 1.0 + 2.0 * u);
    assert_eq!(e(GgmlType::BF16, -(1.0 + 0.6 * u)), -(1.0 + u));
    assert!(e(GgmlType::BF16, f32::NAN).is_nan());
}

// ---------------------------------------------------------------------------------------------
// Bad input: errors, never panics
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_lengths_are_errors() {
    for ty in GgmlType::ALL {
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        let good = vec![0u8; 3 * bb];
        let mut out = vec![0.0f32; 3 * be];
        assert!(dequantize(ty, &good, &mut out).is_ok());
        // One byte short / long.
        for bad in [&good[..3 * bb - 1], &[good.as_slice(), &[0]].concat()[..]] {
            let err = dequantize(ty, bad, &mut out).unwrap_err();
            assert!(
                matches!(err, QuantError::WrongByteCount { got, expected, .. }
                    if got == bad.len() && expected == 3 * bb),
                "{ty}: {err}"
            );
            assert!(err.to_string().contains(&bad.len().to_string()), "{err}");
            assert!(dequantize_vec(ty, bad, 3 * be).is_err());
        }
        assert!(check_len(ty, 3 * be, Some(3 * bb)).is_ok());
        if be > 1 {
            let n = 3 * be + 1;
            let err = dequantize_vec(ty, &good, n).unwrap_err();
            assert!(matches!(err, QuantError::NotBlockMultiple { .. }), "{err}");
            assert!(err.to_string().contains(&n.to_string()), "{err}");
            let err = quantize(ty, &vec![0.0; be - 1]).unwrap_err();
            assert_eq!(
                err,
                QuantError::NotBlockMultiple {
                    ty,
                    n: be - 1,
                    block: be
                }
            );
            assert!(byte_len(ty, be / 2).is_err());
        }
        let mut dst = vec![0u8; 3 * bb + 2];
        assert!(matches!(
            quantize_into(ty, &vec![0.0; 3 * be], &mut dst),
            Err(QuantError::WrongByteCount { .. })
        ));
        // A huge claimed length with little data errors before allocating.
        assert!(dequantize_vec(ty, &good, usize::MAX / 8 / be * be).is_err());
    }
}

#[test]
fn non_finite_and_out_of_range_inputs_are_errors() {
    for ty in BLOCK_TYPES {
        let be = ty.block_elems();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; 2 * be];
            x[be + 3] = bad;
            let err = quantize(ty, &x).unwrap_err();
            assert!(
                matches!(err, QuantError::NonFinite { index, .. } if index == be + 3),
                "{ty}: {err}"
            );
        }
        // A scale beyond f16: block 1 overflows, block 0 is fine.
        let mut x = vec![0.5f32; 2 * be];
        x[be] = -3.0e9;
        let err = quantize(ty, &x).unwrap_err();
        assert!(
            matches!(err, QuantError::ScaleOverflow { block: 1, .. }),
            "{ty}: {err}"
        );
        assert!(err.to_string().contains("block 1"), "{err}");
    }
}

#[test]
fn dequantize_row_picks_one_row_and_checks_bounds() {
    let ty = GgmlType::Q8_0;
    let (n_rows, n_cols) = (5, 64);
    let x = Rng::new(5).normal_vec(n_rows * n_cols, 1.0);
    let q = quantize(ty, &x).unwrap();
    let all = dequantize_vec(ty, &q, x.len()).unwrap();
    let mut row = vec![0.0f32; n_cols];
    dequantize_row(ty, &q, 3, &mut row).unwrap();
    assert_eq!(&row[..], &all[3 * n_cols..4 * n_cols]);
    assert!(matches!(
        dequantize_row(ty, &q, 5, &mut row),
        Err(QuantError::RowOutOfRange {
            row: 5,
            n_rows: 5,
            ..
        })
    ));
    assert!(matches!(
        dequantize_row(ty, &q[..q.len() - 1], 0, &mut row),
        Err(QuantError::WrongByteCount { .. })
    ));
    assert!(matches!(
        dequantize_row(GgmlType::Q4_K, &q, 0, &mut row),
        Err(QuantError::NotBlockMultiple { .. })
    ));
}
