//! CPU dequantizers and round-to-nearest quantizers for every supported type. These are the
//! references the WGSL kernels are checked against. (Stub API; implementation pending.)

use super::types::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{ty}: {n} elements is not a whole number of {block}-element blocks")]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    #[error("{ty}: {got} bytes of data for {n} elements, expected {expected}")]
    WrongByteCount {
        ty: GgmlType,
        n: usize,
        got: usize,
        expected: usize,
    },
}

/// Dequantizes `dst.len()` elements from `src` (which must hold exactly that many, in blocks).
pub fn dequantize(_ty: GgmlType, _src: &[u8], _dst: &mut [f32]) -> Result<(), QuantError> {
    todo!()
}

/// Dequantizes all of `src` (`n` elements) into a new vector.
pub fn dequantize_vec(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let mut out = vec![0.0; n];
    dequantize(ty, src, &mut out)?;
    Ok(out)
}

/// Quantizes `src` (a whole number of blocks) with round-to-nearest.
pub fn quantize(_ty: GgmlType, _src: &[f32]) -> Result<Vec<u8>, QuantError> {
    todo!()
}
