//! Embedding gather with dequantization (`kernels/embedding.wgsl`, decoding with the shared
//! `dequant.wgsl`), and an f32 row gather (`kernels/gather_rows.wgsl`) used to pick the rows whose
//! next token is scored before the LM head.

use super::check::{bad_shape, need_words};
use super::matmul::GpuWeight;
use crate::gpu::{Bind, Gpu, GpuBuf, GpuError, Recorder, groups};
use crate::kernel_source;

/// Params of `kernels/embedding.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EmbeddingParams {
    /// Tokens T.
    pub n_tokens: u32,
    /// Elements per row (multiple of 8).
    pub n_embd: u32,
    /// Bytes per table row.
    pub row_bytes: u32,
    /// Vocabulary id of the chunk's first row.
    pub row_start: u32,
    /// Rows in the chunk.
    pub n_rows: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Params of `kernels/gather_rows.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GatherParams {
    /// Rows gathered.
    pub n_out: u32,
    /// Elements per row.
    pub dim: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Records `x[t, :] = table[ids[t], :]` (dequantized to f32) for `t < n_tokens`.
/// ids: `[n_tokens]` u32, each `< table.n_out` (the caller validates ids); x: `[n_tokens, n_in]`.
pub fn embedding(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    table: &GpuWeight,
    ids: &GpuBuf,
    x: &GpuBuf,
    n_tokens: usize,
) -> Result<(), GpuError> {
    if n_tokens == 0 {
        return Ok(());
    }
    let d = table.n_in;
    if d % 8 != 0 {
        return Err(bad_shape(
            "embedding",
            format!(
                "{}: rows of {d} elements are not a multiple of 8",
                table.name
            ),
        ));
    }
    let row_bytes = table.ty.row_bytes(d).ok_or_else(|| {
        bad_shape(
            "embedding",
            format!(
                "{}: {d} elements is not a whole number of {} blocks",
                table.name, table.ty
            ),
        )
    })?;
    let shape = format!("embedding of {n_tokens} tokens × {d}");
    need_words("embedding", ids, n_tokens, &shape)?;
    need_words("embedding", x, n_tokens * d, &shape)?;
    let p = gpu.pipeline(
        &kernel_source!("embedding"),
        "main",
        &[("WTYPE", table.ty.name().to_string())],
    )?;
    let n_inv = (n_tokens * d / 8) as u32;
    for c in &table.chunks {
        let params = EmbeddingParams {
            n_tokens: n_tokens as u32,
            n_embd: d as u32,
            row_bytes: row_bytes as u32,
            row_start: c.row_start as u32,
            n_rows: c.n_rows as u32,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
        };
        rec.dispatch(
            &p,
            &[Bind::Whole(ids), Bind::Whole(&c.buf), Bind::Whole(x)],
            &params,
            groups(n_inv.div_ceil(256)),
        )?;
    }
    Ok(())
}

/// CPU reference: rows of a dequantized `[n_vocab, d]` table.
pub fn embedding_ref(table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * d..(id as usize + 1) * d]
                .iter()
                .copied()
        })
        .collect()
}

/// Records `y[n, :] = x[rows[n], :]` for `n < n_out`. x: `[T, dim]`, rows: `[n_out]` u32 (each
/// `< T`, validated by the caller), y: `[n_out, dim]`; all f32 except rows.
#[allow(clippy::too_many_arguments)]
pub fn gather_rows(
    gpu: &Gpu,
    rec: &mut Recorder<'_>,
    x: &GpuBuf,
    rows: &GpuBuf,
    y: &GpuBuf,
    n_out: usize,
    dim: usize,
) -> Result<(), GpuError> {
    if n_out == 0 || dim == 0 {
        return Ok(());
    }
    let shape = format!("gather of {n_out} rows × {dim}");
    need_words("gather_rows", rows, n_out, &shape)?;
    need_words("gather_rows", y, n_out * dim, &shape)?;
    let p = gpu.pipeline(&kernel_source!("gather_rows"), "main", &[])?;
    let params = GatherParams {
        n_out: n_out as u32,
        dim: dim as u32,
        _pad0: 0,
        _pad1: 0,
    };
    rec.dispatch(
        &p,
        &[Bind::Whole(x), Bind::Whole(rows), Bind::Whole(y)],
        &params,
        groups(((n_out * dim) as u32).div_ceil(256)),
    )
}

/// CPU reference.
pub fn gather_rows_ref(x: &[f32], rows: &[u32], dim: usize) -> Vec<f32> {
    embedding_ref(x, dim, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{Rng, Tol, assert_close};

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<EmbeddingParams>(), 32);
        assert_eq!(std::mem::size_of::<GatherParams>(), 16);
        assert_eq!(std::mem::align_of::<EmbeddingParams>(), 4);
    }

    #[test]
    fn gather_rows_matches_reference() {
        let gpu = crate::gpu::test_device();
        let mut rng = Rng::new(61);
        for (t, dim, n) in [(7usize, 5usize, 3usize), (40, 257, 17), (1, 1, 1)] {
            let x = rng.normal_vec(t * dim, 1.0);
            let rows: Vec<u32> = (0..n).map(|_| rng.below(t as u64) as u32).collect();
            let xb = gpu.upload("x", &x).unwrap();
            let rb = gpu.upload("rows", &rows).unwrap();
            let yb = gpu.alloc("y", (n * dim * 4) as u64).unwrap();
            let mut rec = gpu.recorder();
            gather_rows(&gpu, &mut rec, &xb, &rb, &yb, n, dim).unwrap();
            rec.run("gather test").unwrap();
            let got: Vec<f32> = gpu.read(&yb).unwrap();
            // A copy: exact.
            assert_close(
                "gather_rows",
                &got[..n * dim],
                &gather_rows_ref(&x, &rows, dim),
                Tol::new(0.0, 0.0),
            );
        }
    }
}
