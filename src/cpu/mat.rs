//! The CPU engine's activation matrix: row-major f32 whose storage is padded with zero rows to a
//! multiple of [`MB`](super::gemm::MB), so every product call has the same shape.

use super::gemm::MB;

/// `rows` real rows of `cols` f32, stored as `padded_rows()` rows (the padding stays zero unless
/// an op writes it; ops that matter keep it zero).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows.div_ceil(MB) * MB * cols],
        }
    }

    pub fn padded_rows(&self) -> usize {
        self.rows.div_ceil(MB) * MB
    }

    pub fn row_blocks(&self) -> usize {
        self.rows.div_ceil(MB)
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// The real rows (no padding).
    pub fn real(&self) -> &[f32] {
        &self.data[..self.rows * self.cols]
    }

    /// Bytes this matrix holds.
    pub fn bytes(&self) -> u64 {
        (self.data.len() * 4) as u64
    }

    /// `self += other` elementwise.
    pub fn add_assign(&mut self, other: &Mat) {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }
}

/// A raw pointer that tasks owning disjoint parts of one output may share.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
