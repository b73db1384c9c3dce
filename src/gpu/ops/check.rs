//! Launch-time checks shared by the launchers: a buffer too small for the shape it is given is a
//! clear error naming the op, the buffer and the numbers, never an out-of-bounds dispatch.

use crate::gpu::{GpuBuf, GpuError};

/// Fails unless `buf` holds at least `words` 4-byte elements.
pub(crate) fn need_words(
    op: &str,
    buf: &GpuBuf,
    words: usize,
    shape: &str,
) -> Result<(), GpuError> {
    if buf.len_words() < words {
        return Err(GpuError::Validation {
            context: format!("launching {op}"),
            detail: format!(
                "buffer {:?} holds {} 4-byte elements but {shape} needs {words}",
                buf.label,
                buf.len_words()
            ),
        });
    }
    Ok(())
}

/// A shape or parameter the kernel does not support.
pub(crate) fn bad_shape(op: &str, detail: String) -> GpuError {
    GpuError::Validation {
        context: format!("launching {op}"),
        detail,
    }
}

/// f32 → f64, for calling the f64 reference (`model::reference`) from an op's `*_ref`.
pub(crate) fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// f64 → f32, for returning the f64 reference's result from an op's `*_ref`.
pub(crate) fn narrow(x: Vec<f64>) -> Vec<f32> {
    x.into_iter().map(|v| v as f32).collect()
}
