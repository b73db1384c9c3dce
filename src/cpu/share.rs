//! Prompt sharing: sequences of one batch that begin with the same tokens (a pair's chosen and
//! rejected responses after their common prompt) compute that prefix once.
//!
//! A row's values depend only on its token, its position and the rows before it in its sequence
//! (causal attention), and every row-wise op of this engine gives a row the same bits whatever
//! else is in its product call (see [`super::gemm`]). So rows `0..p` of a sequence whose first
//! `p` tokens equal those of an earlier sequence are bit-for-bit that sequence's rows: the
//! forward computes each such row once, in a *compact* layout that leaves the copies out, and
//! attention reads every sequence's keys and values whole through the map. The result is exact:
//! the same bits as computing every sequence whole (`tests/cpu_engine.rs` checks it). The
//! backward stays unshared (the chosen and rejected copies of a prompt row get different
//! gradients); a kept tape is expanded back to the packed layout before it is stored.
//!
//! Dropout masks depend on a row's place in the batch, not its tokens, so sharing is off then.

use super::mat::Mat;
use super::ops::Seqs;
use rayon::prelude::*;

/// Shared prefixes shorter than this are computed twice (copying would cost about as much).
pub const MIN_SHARED: usize = 8;

/// The compact layout of a packed batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Share {
    /// The compact row every packed row reads (rows of a shared prefix read the row they copy).
    pub of_packed: Vec<usize>,
    /// The packed row of every compact row, in order.
    pub packed: Vec<usize>,
    /// Leading rows of each sequence that are copies.
    pub shared: Vec<usize>,
}

impl Share {
    /// The compact layout for sequences `ids` packed in order (see [`Seqs::from_lens`]): each
    /// sequence shares its longest common prefix with an earlier one when it is at least
    /// [`MIN_SHARED`] tokens; `None` when no sequence shares anything.
    pub fn plan(ids: &[&[u32]]) -> Option<Share> {
        let lens: Vec<usize> = ids.iter().map(|s| s.len()).collect();
        let seqs = Seqs::from_lens(&lens);
        let mut of_packed = Vec::with_capacity(seqs.total());
        let mut packed = Vec::new();
        let mut shared = Vec::with_capacity(ids.len());
        for (s, cur) in ids.iter().enumerate() {
            let (src, p) = (0..s)
                .map(|o| {
                    let n = cur.iter().zip(ids[o]).take_while(|(a, b)| a == b).count();
                    (o, n)
                })
                .max_by_key(|&(o, n)| (n, usize::MAX - o))
                .filter(|&(_, n)| n >= MIN_SHARED)
                .unwrap_or((0, 0));
            shared.push(p);
            for t in 0..cur.len() {
                if t < p {
                    of_packed.push(of_packed[seqs.start[src] + t]);
                } else {
                    of_packed.push(packed.len());
                    packed.push(seqs.start[s] + t);
                }
            }
        }
        (packed.len() < of_packed.len()).then_some(Share {
            of_packed,
            packed,
            shared,
        })
    }

    /// Rows of the compact layout.
    pub fn rows(&self) -> usize {
        self.packed.len()
    }

    /// `items` per packed row → per compact row.
    pub fn compact_items<T: Copy>(&self, items: &[T]) -> Vec<T> {
        self.packed.iter().map(|&r| items[r]).collect()
    }

    /// A compact-layout matrix → the packed layout (shared rows copied).
    pub fn expand(&self, m: &Mat) -> Mat {
        assert_eq!(m.rows, self.rows());
        gather(m, &self.of_packed)
    }

    /// A packed-layout matrix → the compact layout.
    pub fn compact(&self, m: &Mat) -> Mat {
        assert_eq!(m.rows, self.of_packed.len());
        gather(m, &self.packed)
    }

    /// `w` values per compact row → per packed row.
    pub fn expand_vals(&self, v: &[f32], w: usize) -> Vec<f32> {
        self.of_packed
            .iter()
            .flat_map(|&c| v[c * w..(c + 1) * w].iter().copied())
            .collect()
    }

    /// `w` values per packed row → per compact row.
    pub fn compact_vals(&self, v: &[f32], w: usize) -> Vec<f32> {
        self.packed
            .iter()
            .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
            .collect()
    }
}

/// Rows `from[i]` of `m` as rows `i` of a new matrix (threads own row blocks).
fn gather(m: &Mat, from: &[usize]) -> Mat {
    let w = m.cols;
    let mut out = Mat::zeros(from.len(), w);
    out.data[..from.len() * w]
        .par_chunks_mut(64 * w)
        .zip(from.par_chunks(64))
        .for_each(|(dst, rows)| {
            for (d, &r) in dst.chunks_exact_mut(w).zip(rows) {
                d.copy_from_slice(m.row(r));
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_the_longest_prefix_and_chains() {
        let a: Vec<u32> = (0..12).collect();
        let mut b = a[..10].to_vec();
        b.extend([90, 91]);
        let c = a[..5].to_vec(); // shares 5 < MIN_SHARED: computed whole
        let d = b[..11].to_vec(); // wholly a prefix of b (which shares 10 with a)
        let s = Share::plan(&[&a, &b, &c, &d]).expect("shares");
        // a: 12 own rows; b: 2 own; c: 5 own; d: 0 own.
        assert_eq!(s.rows(), 12 + 2 + 5);
        assert_eq!(&s.of_packed[12..22], &(0..10).collect::<Vec<_>>()[..]);
        assert_eq!(s.of_packed[22..24], [12, 13]);
        assert_eq!(s.of_packed[24..29], [14, 15, 16, 17, 18]);
        // d's 11 rows read a's first 10 and b's first own row.
        assert_eq!(s.of_packed[29..39], s.of_packed[12..22]);
        assert_eq!(s.of_packed[39], 12);
        let m = {
            let mut m = Mat::zeros(s.rows(), 2);
            for r in 0..s.rows() {
                m.row_mut(r).copy_from_slice(&[r as f32, -(r as f32)]);
            }
            m
        };
        let e = s.expand(&m);
        assert_eq!(e.rows, 40);
        assert_eq!(s.compact(&e), m);
        assert_eq!(s.compact_vals(&s.expand_vals(m.real(), 2), 2), m.real());
        assert!(Share::plan(&[&a[..], &c[..]]).is_none());
    }
}
