//! Matrix products of the CPU engine: one wrapper around the `gemm` crate (pure Rust, runtime SIMD
//! dispatch: AVX-512 with the `x86-v4` feature, AVX2/FMA, NEON) and the products against
//! quantized weights, which are dequantized in cache-sized panels right before each product.
//!
//! **Determinism.** Every `gemm` call here is single-threaded and has a shape fixed by the
//! operation, never by the thread count: rows go in blocks of [`MB`] (activation matrices are
//! allocated with their rows padded to a multiple of `MB`, padded rows zero), output columns in
//! panels of [`NB`] (forward) or [`NC`] (input gradient), and reductions over a weight's output
//! dimension in chunks of [`KO`] accumulated in chunk order. Threads (rayon) own whole panels or
//! row blocks and write disjoint outputs, so the same inputs give the same bits with 1 or N
//! threads, and a row's result does not depend on which other rows share its batch (the
//! per-element summation order depends only on the reduction length).

use super::mat::{Mat, SendPtr};
use crate::gguf::GgmlType;
use crate::gguf::quant::dequantize;
use rayon::prelude::*;

/// Rows per product call (activation matrices are padded to a multiple of this).
pub const MB: usize = 64;
/// Output columns per forward panel (rows of W dequantized together: `NB · n_in` f32).
pub const NB: usize = 64;
/// Input-gradient columns per panel (a multiple of every block size: 32 and 256).
pub const NC: usize = 256;
/// Chunk of the reduction over a weight's output dimension in `dx = dy·W`.
pub const KO: usize = 256;
/// Rows of W dequantized together when a panel is written transposed ([`QMat::rows_t`]).
pub const TT: usize = 16;

/// `C[m×n] = alpha·C + beta·A·B` for one call. Strides in elements: A is `a_rs`/`a_cs`
/// (row/column), B is `b_rs` (along the reduction) / `b_cs` (along n), C row-major `ldc`.
///
/// # Safety
/// The pointers must address matrices of the given shapes and strides; C must not alias A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A weight matrix in its GGUF type: `n_out` rows of `n_in` elements (`y = W·x`).
#[derive(Clone, Copy, Debug)]
pub struct QMat<'a> {
    pub ty: GgmlType,
    pub n_in: usize,
    pub n_out: usize,
    pub data: &'a [u8],
}

impl QMat<'_> {
    fn row_bytes(&self) -> usize {
        self.n_in / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// Dequantizes rows `o0..o0+n` into `out` `[n, n_in]`.
    pub fn rows(&self, o0: usize, n: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let src = &self.data[o0 * rb..(o0 + n) * rb];
        dequantize(self.ty, src, &mut out[..n * self.n_in]).expect("validated at load");
    }

    /// Dequantizes rows `o0..o0+n` into `out` transposed, `[n_in, n]` row-major (column `j` of
    /// `out` is row `o0 + j` of W), [`TT`] rows at a time through `scratch` (`TT · n_in` f32),
    /// so each output row gets `TT` contiguous values per pass. The products read their weight
    /// operand in this layout: the `gemm` crate runs `x·B` about twice as fast with B row-major
    /// along the output than column-major (`cargo bench --bench cpu`; docs/cpu-engine.md).
    pub fn rows_t(&self, o0: usize, n: usize, scratch: &mut [f32], out: &mut [f32]) {
        let n_in = self.n_in;
        for j0 in (0..n).step_by(TT) {
            let tt = TT.min(n - j0);
            self.rows(o0 + j0, tt, scratch);
            for c in 0..n_in {
                let dst = &mut out[c * n + j0..c * n + j0 + tt];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = scratch[j * n_in + c];
                }
            }
        }
    }

    /// Dequantizes rows `o0..o0+n`, columns `c0..c0+nc` (block-aligned) into `out` `[n, nc]`.
    pub fn block(&self, o0: usize, n: usize, c0: usize, nc: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let (be, bb) = (self.ty.block_elems(), self.ty.block_bytes());
        let (b0, b1) = (c0 / be * bb, (c0 + nc) / be * bb);
        for r in 0..n {
            let row = &self.data[(o0 + r) * rb..(o0 + r + 1) * rb];
            dequantize(self.ty, &row[b0..b1], &mut out[r * nc..(r + 1) * nc])
                .expect("validated at load");
        }
    }

    /// Bytes of one f32 forward panel and its scratch.
    pub fn panel_bytes(&self) -> u64 {
        ((NB + TT) * self.n_in * 4) as u64
    }
}

/// `y = x·Wᵀ` (`accumulate`: `y += x·Wᵀ`): x `[R, n_in]`, y `[R, n_out]`. Threads own panels of
/// [`NB`] output columns; each dequantizes its rows of W once, transposed ([`QMat::rows_t`]), and
/// runs every row block.
pub fn matmul_fwd(w: &QMat, x: &Mat, y: &mut Mat, accumulate: bool) {
    assert_eq!((x.cols, y.cols, x.rows), (w.n_in, w.n_out, y.rows));
    let (n_in, n_out, blocks) = (w.n_in, w.n_out, x.row_blocks());
    let yp = SendPtr(y.data.as_mut_ptr());
    let xp = x.data.as_ptr() as usize;
    (0..n_out.div_ceil(NB)).into_par_iter().for_each(|p| {
        let o0 = p * NB;
        let nb = NB.min(n_out - o0);
        let mut panel = vec![0f32; nb * n_in];
        let mut scratch = vec![0f32; TT * n_in];
        w.rows_t(o0, nb, &mut scratch, &mut panel);
        for rb in 0..blocks {
            // SAFETY: this task alone writes columns o0..o0+nb of y.
            unsafe {
                sgemm(
                    MB,
                    nb,
                    n_in,
                    yp.get().add(rb * MB * n_out + o0),
                    n_out,
                    accumulate,
                    (xp as *const f32).add(rb * MB * n_in),
                    n_in,
                    1,
                    panel.as_ptr(),
                    nb,
                    1,
                    1.0,
                );
            }
        }
    });
}

/// `dx = dy·W` (`accumulate`: `dx += dy·W`): dy `[R, n_out]`, dx `[R, n_in]`, from the same
/// quantized bytes as the forward. Threads own [`NC`]-column panels of dx; the reduction over
/// `n_out` runs in [`KO`]-row chunks of W in order.
pub fn matmul_back(w: &QMat, dy: &Mat, dx: &mut Mat, accumulate: bool) {
    assert_eq!((dy.cols, dx.cols, dy.rows), (w.n_out, w.n_in, dx.rows));
    let (n_in, n_out, blocks) = (w.n_in, w.n_out, dy.row_blocks());
    let dxp = SendPtr(dx.data.as_mut_ptr());
    let dyp = dy.data.as_ptr() as usize;
    (0..n_in.div_ceil(NC)).into_par_iter().for_each(|p| {
        let c0 = p * NC;
        let nc = NC.min(n_in - c0);
        let mut panel = vec![0f32; KO * nc];
        for (ci, o0) in (0..n_out).step_by(KO).enumerate() {
            let ko = KO.min(n_out - o0);
            w.block(o0, ko, c0, nc, &mut panel);
            for rb in 0..blocks {
                // SAFETY: this task alone writes columns c0..c0+nc of dx.
                unsafe {
                    sgemm(
                        MB,
                        nc,
                        ko,
                        dxp.get().add(rb * MB * n_in + c0),
                        n_in,
                        accumulate || ci > 0,
                        (dyp as *const f32).add(rb * MB * n_out + o0),
                        n_out,
                        1,
                        panel.as_ptr(),
                        nc,
                        1,
                        1.0,
                    );
                }
            }
        }
    });
}

/// `y (+)= beta · x·B` for a dense f32 `b` read with strides `b_rs` (along the reduction k) and
/// `b_cs` (along n): x `[R, k]`, y `[R, n]`; threads own row blocks.
#[allow(clippy::too_many_arguments)]
fn dense(
    x: &Mat,
    b: &[f32],
    n: usize,
    b_rs: usize,
    b_cs: usize,
    y: &mut Mat,
    accumulate: bool,
    beta: f32,
) {
    let k = x.cols;
    assert_eq!((b.len(), y.cols, y.rows), (n * k, n, x.rows));
    let xp = x.data.as_ptr() as usize;
    let bp = b.as_ptr() as usize;
    y.data
        .par_chunks_mut(MB * n)
        .enumerate()
        .for_each(|(rb, yb)| unsafe {
            sgemm(
                MB,
                n,
                k,
                yb.as_mut_ptr(),
                n,
                accumulate,
                (xp as *const f32).add(rb * MB * k),
                k,
                1,
                bp as *const f32,
                b_rs,
                b_cs,
                beta,
            )
        });
}

/// `y (+)= beta · x·Bᵀ` for a dense f32 `b` `[n, k]` row-major: x `[R, k]`, y `[R, n]`. `b` is
/// transposed once (LoRA factors are small) so the product reads it row-major, the fast layout.
pub fn dense_nt(x: &Mat, b: &[f32], n: usize, y: &mut Mat, accumulate: bool, beta: f32) {
    let k = x.cols;
    let mut bt = vec![0f32; b.len()];
    for (j, row) in b.chunks_exact(k).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            bt[c * n + j] = v;
        }
    }
    dense(x, &bt, n, n, 1, y, accumulate, beta)
}

/// `y (+)= beta · x·B` for a dense f32 `b` `[k, n]` row-major: x `[R, k]`, y `[R, n]`.
pub fn dense_nn(x: &Mat, b: &[f32], n: usize, y: &mut Mat, accumulate: bool, beta: f32) {
    dense(x, b, n, n, 1, y, accumulate, beta)
}

/// `g[m×n] += beta · aᵀ·b` over all rows: a `[R, m]`, b `[R, n]` (weight gradients: the
/// reduction runs over every padded row, whose values are zero). Threads own [`NC`]-column
/// panels of g.
pub fn dense_tn_acc(a: &Mat, b: &Mat, g: &mut [f32], beta: f32) {
    let (m, n, r) = (a.cols, b.cols, a.padded_rows());
    assert_eq!((g.len(), a.rows), (m * n, b.rows));
    let gp = SendPtr(g.as_mut_ptr());
    let ap = a.data.as_ptr() as usize;
    let bp = b.data.as_ptr() as usize;
    (0..n.div_ceil(NC)).into_par_iter().for_each(|p| {
        let c0 = p * NC;
        let nc = NC.min(n - c0);
        // SAFETY: this task alone writes columns c0..c0+nc of g.
        unsafe {
            sgemm(
                m,
                nc,
                r,
                gp.get().add(c0),
                n,
                true,
                ap as *const f32,
                1,
                m,
                (bp as *const f32).add(c0),
                n,
                1,
                beta,
            )
        }
    });
}
