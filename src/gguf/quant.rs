//! CPU dequantizers and round-to-nearest quantizers for every supported type.
//!
//! The dequantizers follow ggml's reference (`dequantize_row_*` in `ggml-quants.c`) operation
//! for operation in f32, so they are the references the WGSL kernels are checked against. Block
//! layouts: `docs/gguf.md` §2 and §2.1. Clarity beats speed here; each block type has
//! one small function that reads the layout exactly as the format defines it.
//!
//! The quantizers are our own round-to-nearest schemes (not ggml's iterative searches). Each one
//! chooses its scales so that no value of the block is clipped, which gives a simple guaranteed
//! bound on the error of every element (with `amax` = the largest `|x|` of the block or
//! super-block, and ignoring f32 rounding):
//!
//! | type | bound on `|x − dequant(quant(x))|` |
//! |---|---|
//! | F32 | 0 (bit exact) |
//! | F16, BF16 | half an ulp of the target type (round to nearest, ties to even) |
//! | Q8_0 | `amax/127 · ½ · (1 + 2⁻¹⁰)` |
//! | Q4_0 | `amax/7 · ½ · (1 + 2⁻¹⁰)` |
//! | Q5_0 | `amax/15 · ½ · (1 + 2⁻¹⁰)` |
//! | Q4_1 | `(max − min)/15 · ½ · (1 + 2⁻¹⁰)` plus `|min|·2⁻¹⁰` |
//! | Q5_1 | `(max − min)/31 · ½ · (1 + 2⁻¹⁰)` plus `|min|·2⁻¹⁰` |
//! | Q4_K | `(2·amax + amax/63)/15 · ½ · (1 + 1/63) · (1 + 2⁻⁹)` ≈ `0.0684·amax` |
//! | Q5_K | `(2·amax + amax/63)/31 · ½ · (1 + 1/63) · (1 + 2⁻⁹)` ≈ `0.0331·amax` |
//! | Q6_K | `amax/31 · ½ · (1 + 1/127) · (1 + 2⁻¹⁰)` |
//!
//! Quantizing rejects non-finite inputs for the block types and reports a block whose scale does
//! not fit an f16 (|x| beyond ~10⁶–10⁷); F16/BF16 convert infinities and NaN as IEEE does.

use half::{bf16, f16};

use super::types::GgmlType;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error(
        "{ty}: {n} elements is not a whole number of {block}-element blocks; \
         pick a type whose block size divides the row length (K-quants need multiples of 256, \
         Q4_0..Q8_0 multiples of 32)"
    )]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    #[error(
        "{ty}: {got} bytes of data for {n} elements, expected {expected} \
         ({block_bytes} bytes per {block}-element block); the tensor data is truncated or its \
         type/shape is wrong"
    )]
    WrongByteCount {
        ty: GgmlType,
        n: usize,
        got: usize,
        expected: usize,
        block: usize,
        block_bytes: usize,
    },
    #[error(
        "{ty}: cannot quantize non-finite value {value} at element {index}; \
         only F32, F16 and BF16 can store inf/NaN"
    )]
    NonFinite {
        ty: GgmlType,
        index: usize,
        value: f32,
    },
    #[error(
        "{ty}: block {block} (elements {first}..{end}) needs a scale of {scale:e}, beyond the \
         f16 range (max 65504); scale the values down or store this tensor as F32/F16",
        first = block * ty.block_elems(),
        end = (block + 1) * ty.block_elems()
    )]
    ScaleOverflow {
        ty: GgmlType,
        block: usize,
        scale: f32,
    },
    #[error("{ty}: {n} elements would take more bytes than this machine can address")]
    TooLarge { ty: GgmlType, n: usize },
    #[error("{ty}: row {row} out of range for a matrix of {n_rows} rows of {n_cols} elements")]
    RowOutOfRange {
        ty: GgmlType,
        row: usize,
        n_rows: usize,
        n_cols: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Sizes and checks
// ---------------------------------------------------------------------------------------------

/// Bytes that `n` elements of `ty` occupy.
///
/// Errors with [`QuantError::NotBlockMultiple`] when `n` is not a whole number of blocks.
/// with [`QuantError::TooLarge`] when that byte count does not fit a `usize`.
pub fn byte_len(ty: GgmlType, n: usize) -> Result<usize, QuantError> {
    let be = ty.block_elems();
    if !n.is_multiple_of(be) {
        return Err(QuantError::NotBlockMultiple { ty, n, block: be });
    }
    (n / be)
        .checked_mul(ty.block_bytes())
        .ok_or(QuantError::TooLarge { ty, n })
}

/// Checks that `n` elements of `ty` can be quantized (a whole number of blocks) and, when
/// `bytes` is given, that it is exactly their encoded size. Call this before allocating or
/// uploading; every function in this module performs the same check itself.
pub fn check_len(ty: GgmlType, n: usize, bytes: Option<usize>) -> Result<(), QuantError> {
    let expected = byte_len(ty, n)?;
    match bytes {
        Some(got) if got != expected => Err(QuantError::WrongByteCount {
            ty,
            n,
            got,
            expected,
            block: ty.block_elems(),
            block_bytes: ty.block_bytes(),
        }),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Dequantizes `dst.len()` elements from `src`, which must hold exactly that many elements of
/// `ty` (a whole number of blocks, back to back). Never panics: a length that is not a block
/// multiple or a byte count that does not match gives an error and leaves `dst` untouched.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_len(ty, dst.len(), Some(src.len()))?;
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, y| y[0] = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q4_K => dequant_q4_k,
        GgmlType::Q5_K => dequant_q5_k,
        GgmlType::Q6_K => dequant_q6_k,
    };
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        block_fn(b, y);
    }
    Ok(())
}

/// Dequantizes all of `src` (`n` elements of `ty`) into a new vector. Same checks as
/// [`dequantize`].
pub fn dequantize_vec(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    check_len(ty, n, Some(src.len()))?;
    let mut out = vec![0.0; n];
    dequantize(ty, src, &mut out)?;
    Ok(out)
}

/// Dequantizes row `row` of a row-major matrix stored as `ty`, whose rows hold
/// `out.len()` elements each (GGUF `ne[0]`) and whose data is `matrix` (all rows, back to back).
/// Used for embedding lookups and for checking single rows.
///
/// Errors when the row length is not a block multiple, when `matrix` is not a whole number of
/// rows (the error names the next whole row count), or when `row` is past the last row. With
/// `out` empty it does nothing.
pub fn dequantize_row(
    ty: GgmlType,
    matrix: &[u8],
    row: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let n_cols = out.len();
    let rb = byte_len(ty, n_cols)?;
    if rb == 0 {
        return Ok(()); // zero-length rows: nothing to write
    }
    let n_rows = matrix.len() / rb;
    if !matrix.len().is_multiple_of(rb) {
        let whole = (n_rows + 1) * rb;
        return Err(QuantError::WrongByteCount {
            ty,
            n: (n_rows + 1) * n_cols,
            got: matrix.len(),
            expected: whole,
            block: ty.block_elems(),
            block_bytes: ty.block_bytes(),
        });
    }
    if row >= n_rows {
        return Err(QuantError::RowOutOfRange {
            ty,
            row,
            n_rows,
            n_cols,
        });
    }
    dequantize(ty, &matrix[row * rb..(row + 1) * rb], out)
}

/// f32 whose upper 16 bits are `bits` (BF16 is a truncated f32).
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0: `half d; u8 qs[16]`; `y[j] = (lo(qs[j]) − 8)·d`, `y[j+16] = (hi(qs[j]) − 8)·d`.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `half d; half m; u8 qs[16]`; `y = q·d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The fifth bits of Q5_0/Q5_1 element `j` and `j + 16` (j < 16), as 0 or 16.
fn q5_high_bits(qh: u32, j: usize) -> (u8, u8) {
    let h0 = (((qh >> j) & 1) << 4) as u8;
    let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
    (h0, h1)
}

/// Q5_0: `half d; u8 qh[4]; u8 qs[16]`; bit `j` of `qh` (LE u32) is the fifth bit of element `j`.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let (h0, h1) = q5_high_bits(qh, j);
        y[j] = (((qs[j] & 0xF) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: `half d; half m; u8 qh[4]; u8 qs[16]`; `y = q·d + m`.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let (h0, h1) = q5_high_bits(qh, j);
        y[j] = ((qs[j] & 0xF) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

/// Q8_0: `half d; i8 qs[32]`; `y = qs·d`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit (scale, min) pair `j` (< 8) packed in `scales[12]`.
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// The inverse of [`get_scale_min_k4`]: packs eight 6-bit scales and mins (each < 64) into 12
/// bytes. Bits above the sixth are ignored.
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        // Low six bits of pairs 0..4, with the top two bits of pairs 4..8 above them.
        q[j] = (sc[j] & 63) | (((sc[j + 4] & 63) >> 4) << 6);
        q[j + 4] = (m[j] & 63) | (((m[j + 4] & 63) >> 4) << 6);
        // Low four bits of pairs 4..8.
        q[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    q
}

/// Q4_K: `half d; half dmin; u8 scales[12]; u8 qs[128]`; four chunks of 64 outputs, each using
/// 32 bytes of `qs` (low nibbles → first 32 outputs, high nibbles → next 32) and two
/// (scale, min) pairs: `y = d·sc·q − dmin·m`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = get_scale_min_k4(2 * c, scales);
        let (sc2, m2) = get_scale_min_k4(2 * c + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[l] & 0xF) as f32 - min1;
            y[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// Q5_K: `half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`; as Q4_K with a fifth bit:
/// bit `2c` of `qh[l]` for output `64c + l`, bit `2c + 1` for output `64c + 32 + l`.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let ql = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = get_scale_min_k4(2 * c, scales);
        let (sc2, m2) = get_scale_min_k4(2 * c + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((ql[l] & 0xF) + h1) as f32 - min1;
            y[64 * c + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - min2;
        }
    }
}

/// Q6_K: `u8 ql[128]; u8 qh[64]; i8 scales[16]; half d`; sixteen sub-blocks of 16 with signed
/// 8-bit scales; each 6-bit value is a nibble of `ql` plus two bits of `qh`, minus 32:
/// `y = d·sc·(q − 32)`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| (sc[is + k] as i8) as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

/// Quantizes `src` (a whole number of blocks of `ty`) into a new byte vector, with the
/// round-to-nearest schemes described in the module docs.
///
/// Errors: [`QuantError::NotBlockMultiple`]; [`QuantError::NonFinite`] for inf/NaN input to a
/// block type; [`QuantError::ScaleOverflow`] when a block's scale exceeds the f16 range.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let mut out = vec![0u8; byte_len(ty, src.len())?];
    quantize_into(ty, src, &mut out)?;
    Ok(out)
}

/// As [`quantize`], writing into `dst`, which must be exactly [`byte_len`]`(ty, src.len())`
/// bytes. On error `dst` may be partly written.
pub fn quantize_into(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_len(ty, src.len(), Some(dst.len()))?;
    match ty {
        GgmlType::F32 => {
            for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
                b.copy_from_slice(&x.to_le_bytes());
            }
            return Ok(());
        }
        GgmlType::F16 => {
            for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
                b.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
            return Ok(());
        }
        GgmlType::BF16 => {
            for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
                b.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
            }
            return Ok(());
        }
        _ => {}
    }
    if let Some(index) = src.iter().position(|x| !x.is_finite()) {
        return Err(QuantError::NonFinite {
            ty,
            index,
            value: src[index],
        });
    }
    let block_fn: fn(&[f32], &mut [u8]) -> Result<(), f32> = match ty {
        GgmlType::Q4_0 => |x, b| quant_sym(x, b, 4),
        GgmlType::Q5_0 => |x, b| quant_sym(x, b, 5),
        GgmlType::Q8_0 => quant_q8_0,
        GgmlType::Q4_1 => |x, b| quant_asym(x, b, 4),
        GgmlType::Q5_1 => |x, b| quant_asym(x, b, 5),
        GgmlType::Q4_K => |x, b| quant_k_asym(x, b, 4),
        GgmlType::Q5_K => |x, b| quant_k_asym(x, b, 5),
        GgmlType::Q6_K => quant_q6_k,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("handled above"),
    };
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    for (block, (x, b)) in src
        .chunks_exact(be)
        .zip(dst.chunks_exact_mut(bb))
        .enumerate()
    {
        block_fn(x, b).map_err(|scale| QuantError::ScaleOverflow { ty, block, scale })?;
    }
    Ok(())
}

/// f32 → BF16 bits, rounding to nearest with ties to even; NaN stays a (quiet) NaN.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// The smallest f16 ≥ `v` (for `v` ≥ 0), so a scale stored as f16 never shrinks and no value
/// of the block gets clipped. `Err(v)` when it does not fit (infinite).
fn f16_at_least(v: f32) -> Result<f16, f32> {
    let mut h = f16::from_f32(v);
    if h.to_f32() < v {
        h = f16::from_bits(h.to_bits() + 1);
    }
    if h.is_finite() { Ok(h) } else { Err(v) }
}

/// The largest f16 ≤ `v` (any sign, finite).
fn f16_at_most(v: f32) -> Result<f16, f32> {
    let h = f16::from_f32(v);
    let h = if h.to_f32() <= v {
        h
    } else if h.to_f32() > 0.0 {
        f16::from_bits(h.to_bits() - 1)
    } else if h.to_bits() == 0 {
        // +0 > v < 0 cannot happen (from_f32 of a negative gives −0 or less); −0 ≤ v handled.
        f16::from_bits(0x8001)
    } else {
        // Negative: a larger magnitude is a smaller value.
        f16::from_bits(h.to_bits() + 1)
    };
    if h.is_finite() { Ok(h) } else { Err(v) }
}

fn put_half(b: &mut [u8], at: usize, h: f16) {
    b[at..at + 2].copy_from_slice(&h.to_le_bytes());
}

fn amax_of(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |a, v| a.max(v.abs()))
}

/// `round(x / d)` clamped to `[lo, hi]`, or 0 when `d` is 0.
fn rtn(x: f32, d: f32, lo: i32, hi: i32) -> i32 {
    if d == 0.0 {
        0
    } else {
        ((x / d).round() as i32).clamp(lo, hi)
    }
}

/// Q8_0: `d = amax/127` (rounded up to f16), `q = round(x/d)`.
fn quant_q8_0(x: &[f32], b: &mut [u8]) -> Result<(), f32> {
    let d = f16_at_least(amax_of(x) / 127.0)?;
    put_half(b, 0, d);
    let df = d.to_f32();
    for j in 0..32 {
        b[2 + j] = rtn(x[j], df, -127, 127) as i8 as u8;
    }
    Ok(())
}

/// Q4_0 / Q5_0 (`bits` = 4 or 5): symmetric, integer range `[−2^(bits−1), 2^(bits−1) − 1]`.
///
/// Like ggml we first try to map the value of largest magnitude onto the extra negative level
/// (`d = max / −2^(bits−1)`, using all 2^bits levels); when that would push any value of the
/// other sign past the top level we use `d = amax / (2^(bits−1) − 1)` instead, so no value is
/// ever clipped and the error stays ≤ d/2.
fn quant_sym(x: &[f32], b: &mut [u8], bits: u32) -> Result<(), f32> {
    let half = 1i32 << (bits - 1); // 8 or 16
    let (lo, hi) = (-half, half - 1);
    let m = x
        .iter()
        .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let amax = m.abs();
    // Candidate A: m → −half.
    let da = f16_at_least(amax / half as f32)?;
    let da = if m > 0.0 { -da } else { da };
    let fits = da.to_f32() != 0.0 && x.iter().all(|&v| (v / da.to_f32()).round() as i32 <= hi);
    let d = if fits {
        da
    } else {
        f16_at_least(amax / hi as f32)?
    };
    let df = d.to_f32();
    let q: Vec<u8> = x
        .iter()
        .map(|&v| (rtn(v, df, lo, hi) + half) as u8)
        .collect();
    put_half(b, 0, d);
    let qs_at = if bits == 4 {
        2
    } else {
        let mut qh = 0u32;
        for (j, &qj) in q.iter().enumerate() {
            qh |= ((qj as u32 >> 4) & 1) << j;
        }
        b[2..6].copy_from_slice(&qh.to_le_bytes());
        6
    };
    for j in 0..16 {
        b[qs_at + j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4);
    }
    Ok(())
}

/// Q4_1 / Q5_1 (`bits` = 4 or 5): `m` = the block minimum rounded down to f16,
/// `d = (max − m)/(2^bits − 1)` rounded up, `q = round((x − m)/d)`.
fn quant_asym(x: &[f32], b: &mut [u8], bits: u32) -> Result<(), f32> {
    let nmax = (1i32 << bits) - 1;
    let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let m = f16_at_most(min)?;
    let mf = m.to_f32();
    let d = f16_at_least((max - mf) / nmax as f32)?;
    let df = d.to_f32();
    let q: Vec<u8> = x.iter().map(|&v| rtn(v - mf, df, 0, nmax) as u8).collect();
    put_half(b, 0, d);
    put_half(b, 2, m);
    let qs_at = if bits == 4 {
        4
    } else {
        let mut qh = 0u32;
        for (j, &qj) in q.iter().enumerate() {
            qh |= ((qj as u32 >> 4) & 1) << j;
        }
        b[4..8].copy_from_slice(&qh.to_le_bytes());
        8
    };
    for j in 0..16 {
        b[qs_at + j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4);
    }
    Ok(())
}

/// Q4_K / Q5_K (`bits` = 4 or 5): per sub-block of 32, an offset `dmin·m` (m = 6-bit) at or
/// below `min(min(x), 0)` and a step `d·sc` (sc = 6-bit) large enough that the top level reaches
/// `max(x)`. Both super-block scales are rounded up to f16 and the 6-bit factors are rounded up,
/// so nothing is clipped and each error is ≤ `d·sc/2`.
fn quant_k_asym(x: &[f32], b: &mut [u8], bits: u32) -> Result<(), f32> {
    let nmax = ((1u32 << bits) - 1) as f32;
    let mut mins = [0.0f32; 8];
    let mut maxs = [0.0f32; 8];
    for (i, sub) in x.chunks_exact(32).enumerate() {
        mins[i] = -sub.iter().fold(0.0f32, |a, &v| a.min(v)); // ≥ 0
        maxs[i] = sub.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    }
    let dmin = f16_at_least(mins.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0)?;
    let dminf = dmin.to_f32();
    let mut mq = [0u8; 8];
    let mut off = [0.0f32; 8];
    let mut step_needed = [0.0f32; 8];
    for i in 0..8 {
        mq[i] = if dminf > 0.0 {
            (mins[i] / dminf).ceil().min(63.0) as u8
        } else {
            0
        };
        off[i] = dminf * mq[i] as f32;
        step_needed[i] = ((maxs[i] + off[i]) / nmax).max(0.0);
    }
    let d = f16_at_least(step_needed.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0)?;
    let df = d.to_f32();
    let mut sc = [0u8; 8];
    for i in 0..8 {
        sc[i] = if df > 0.0 {
            (step_needed[i] / df).ceil().min(63.0) as u8
        } else {
            0
        };
    }
    let mut q = [0u8; 256];
    for (i, sub) in x.chunks_exact(32).enumerate() {
        // The same f32 products the dequantizer forms.
        let (step, offset) = (df * sc[i] as f32, dminf * mq[i] as f32);
        for (l, &v) in sub.iter().enumerate() {
            q[32 * i + l] = rtn(v + offset, step, 0, nmax as i32) as u8;
        }
    }
    put_half(b, 0, d);
    put_half(b, 2, dmin);
    b[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &mq));
    let qs_at = if bits == 4 {
        16
    } else {
        let qh = &mut b[16..48];
        qh.fill(0);
        for c in 0..4 {
            for l in 0..32 {
                qh[l] |= ((q[64 * c + l] >> 4) & 1) << (2 * c);
                qh[l] |= ((q[64 * c + 32 + l] >> 4) & 1) << (2 * c + 1);
            }
        }
        48
    };
    for c in 0..4 {
        for l in 0..32 {
            b[qs_at + 32 * c + l] = (q[64 * c + l] & 0xF) | ((q[64 * c + 32 + l] & 0xF) << 4);
        }
    }
    Ok(())
}

/// Q6_K: per sub-block of 16 a step `amax/31`; the super-block scale `d = max step / 127`
/// (rounded up to f16), the 8-bit factors `sc = ceil(step/d)`, `q = round(x/(d·sc))` in
/// `[−32, 31]`, stored as `q + 32`.
fn quant_q6_k(x: &[f32], b: &mut [u8]) -> Result<(), f32> {
    let mut steps = [0.0f32; 16];
    for (i, sub) in x.chunks_exact(16).enumerate() {
        steps[i] = amax_of(sub) / 31.0;
    }
    let d = f16_at_least(steps.iter().fold(0.0f32, |a, &v| a.max(v)) / 127.0)?;
    let df = d.to_f32();
    let mut sc = [0i8; 16];
    for i in 0..16 {
        sc[i] = if df > 0.0 {
            (steps[i] / df).ceil().min(127.0) as i8
        } else {
            0
        };
    }
    let mut q = [0u8; 256];
    for (i, sub) in x.chunks_exact(16).enumerate() {
        let step = df * sc[i] as f32;
        for (l, &v) in sub.iter().enumerate() {
            q[16 * i + l] = (rtn(v, step, -32, 31) + 32) as u8;
        }
    }
    for n in 0..2 {
        let q = &q[128 * n..128 * n + 128];
        for l in 0..32 {
            b[64 * n + l] = (q[l] & 0xF) | ((q[l + 64] & 0xF) << 4);
            b[64 * n + l + 32] = (q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4);
            b[128 + 32 * n + l] = (q[l] >> 4)
                | ((q[l + 32] >> 4) << 2)
                | ((q[l + 64] >> 4) << 4)
                | ((q[l + 96] >> 4) << 6);
        }
    }
    for i in 0..16 {
        b[192 + i] = sc[i] as u8;
    }
    put_half(b, 208, d);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips_every_value() {
        // Every 6-bit value in every slot, with the other slots holding distinct values.
        for v in 0..64u8 {
            for slot in 0..8 {
                let mut sc = [0u8; 8];
                let mut m = [0u8; 8];
                for j in 0..8 {
                    sc[j] = (j as u8 * 9 + 5) & 63;
                    m[j] = (j as u8 * 23 + 40) & 63;
                }
                sc[slot] = v;
                m[slot] = 63 - v;
                let q = pack_scale_min_k4(&sc, &m);
                for j in 0..8 {
                    assert_eq!(
                        get_scale_min_k4(j, &q),
                        (sc[j], m[j]),
                        "v {v} slot {slot} j {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn f16_rounding_helpers_bracket_the_value() {
        for &v in &[
            0.0f32,
            1e-9,
            0.1,
            1.0 / 3.0,
            7.77,
            1000.1,
            -0.1,
            -1.0 / 3.0,
            -7.77,
            -1e-9,
        ] {
            let up = f16_at_least(v.abs()).unwrap().to_f32();
            assert!(up >= v.abs(), "{v}: {up}");
            let down = f16_at_most(v).unwrap().to_f32();
            assert!(down <= v, "{v}: {down}");
            // Adjacent: within one f16 ulp of the value (relative 2^-10, or a subnormal step).
            assert!(up - v.abs() <= v.abs() * 2f32.powi(-10) + 6e-8, "{v}: {up}");
            assert!(v - down <= v.abs() * 2f32.powi(-10) + 6e-8, "{v}: {down}");
        }
        assert!(f16_at_least(1e6).is_err());
    }
}
