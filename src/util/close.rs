//! Comparing float arrays with named tolerances: one `assert_close` that reports how many
//! elements failed, the largest error and where.

/// A tolerance: an element passes when `|got − want| ≤ abs + rel·|want|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    pub abs: f64,
    pub rel: f64,
}

impl Tol {
    pub const fn new(abs: f64, rel: f64) -> Tol {
        Tol { abs, rel }
    }
}

/// Summary of a comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseReport {
    pub n: usize,
    pub n_failed: usize,
    pub max_abs_err: f64,
    pub max_abs_at: usize,
    pub max_rel_err: f64,
    pub first_failure: Option<(usize, f64, f64)>,
}

/// Compares two slices elementwise (NaN or inf on either side where the other differs fails).
pub fn compare<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    got: &[A],
    want: &[B],
    tol: Tol,
) -> CloseReport {
    assert_eq!(
        got.len(),
        want.len(),
        "length mismatch: got {} want {}",
        got.len(),
        want.len()
    );
    let mut r = CloseReport {
        n: got.len(),
        n_failed: 0,
        max_abs_err: 0.0,
        max_abs_at: 0,
        max_rel_err: 0.0,
        first_failure: None,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        let err = (g - w).abs();
        let ok = if g.is_finite() && w.is_finite() {
            err <= tol.abs + tol.rel * w.abs()
        } else {
            g == w || (g.is_nan() && w.is_nan())
        };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if err > r.max_abs_err {
            r.max_abs_err = err;
            r.max_abs_at = i;
        }
        if w != 0.0 {
            r.max_rel_err = r.max_rel_err.max(err / w.abs());
        }
        if !ok {
            r.n_failed += 1;
            if r.first_failure.is_none() {
                r.first_failure = Some((i, g, w));
            }
        }
    }
    r
}

/// Panics with a full report unless every element is within `tol`.
#[track_caller]
pub fn assert_close<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    what: &str,
    got: &[A],
    want: &[B],
    tol: Tol,
) {
    let r = compare(got, want, tol);
    if r.n_failed > 0 {
        let (i, g, w) = r.first_failure.unwrap();
        panic!(
            "{what}: {} of {} elements outside tolerance (abs {:e}, rel {:e}); max abs error {:e} at index {}; max rel error {:e}; first failure at {i}: got {g}, want {w}",
            r.n_failed, r.n, tol.abs, tol.rel, r.max_abs_err, r.max_abs_at, r.max_rel_err
        );
    }
}

/// Largest absolute difference (NaN counts as infinite).
pub fn max_abs_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    compare(a, b, Tol::new(f64::INFINITY, 0.0)).max_abs_err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_failures_and_location() {
        let r = compare(
            &[1.0f32, 2.0, 3.5],
            &[1.0f32, 2.0001, 3.0],
            Tol::new(1e-3, 0.0),
        );
        assert_eq!(r.n_failed, 1);
        assert_eq!(r.max_abs_at, 2);
        assert!((r.max_abs_err - 0.5).abs() < 1e-12);
        let nan = compare(&[f32::NAN], &[0.0f32], Tol::new(1.0, 1.0));
        assert_eq!(nan.n_failed, 1);
        let res = std::panic::catch_unwind(|| {
            assert_close("x", &[1.0f64], &[2.0f64], Tol::new(0.1, 0.0))
        });
        let msg = *res.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("1 of 1 elements"), "{msg}");
    }
}
