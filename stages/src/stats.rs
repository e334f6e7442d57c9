//! Small statistics shared by stages: quantiles as pandas computes them.

/// The `q`-quantile of `values` with linear interpolation between the closest ranks, which is
/// pandas' `Series.quantile` default (and numpy's `linear`): with the values sorted,
/// `h = (n − 1)·q`, the result is `x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])`.
/// NaNs must be removed first. `None` for an empty slice. Reorders `values`.
pub fn quantile_linear(values: &mut [f64], q: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let h = (n - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let frac = h - lo as f64;
    let (_, low, above) = values.select_nth_unstable_by(lo, f64::total_cmp);
    let low = *low;
    if frac == 0.0 || above.is_empty() {
        return Some(low);
    }
    // The next order statistic is the smallest value above position `lo`.
    let high = above.iter().copied().fold(f64::INFINITY, f64::min);
    Some(low + frac * (high - low))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(values: &[f64], q: f64) -> Option<f64> {
        quantile_linear(&mut values.to_vec(), q)
    }

    #[test]
    fn odd_count() {
        // Sorted 1 2 3 4 5: h = 4·0.25 = 1 → 2; h = 3 → 4.
        assert_eq!(q(&[5.0, 1.0, 4.0, 2.0, 3.0], 0.25), Some(2.0));
        assert_eq!(q(&[5.0, 1.0, 4.0, 2.0, 3.0], 0.75), Some(4.0));
        assert_eq!(q(&[5.0, 1.0, 4.0, 2.0, 3.0], 0.5), Some(3.0));
    }

    #[test]
    fn even_count_interpolates() {
        // Sorted 1 2 3 4: h = 3·0.25 = 0.75 → 1 + 0.75·(2 − 1) = 1.75; h = 2.25 → 3.25.
        assert_eq!(q(&[4.0, 3.0, 2.0, 1.0], 0.25), Some(1.75));
        assert_eq!(q(&[4.0, 3.0, 2.0, 1.0], 0.75), Some(3.25));
        // Sorted 0 10: h = 0.25 → 2.5.
        assert_eq!(q(&[10.0, 0.0], 0.25), Some(2.5));
    }

    #[test]
    fn ties() {
        // Sorted 1 2 2 2 9: h = 1 → 2; h = 3 → 2; h = 3.2 (q = 0.8) → 2 + 0.2·7 = 3.4.
        let v = [2.0, 9.0, 2.0, 1.0, 2.0];
        assert_eq!(q(&v, 0.25), Some(2.0));
        assert_eq!(q(&v, 0.75), Some(2.0));
        assert!((q(&v, 0.8).unwrap() - 3.4).abs() < 1e-12);
        assert_eq!(q(&[7.0; 6], 0.3), Some(7.0));
    }

    #[test]
    fn edges() {
        assert_eq!(q(&[], 0.5), None);
        assert_eq!(q(&[3.0], 0.25), Some(3.0));
        assert_eq!(q(&[1.0, 2.0, 3.0], 0.0), Some(1.0));
        assert_eq!(q(&[1.0, 2.0, 3.0], 1.0), Some(3.0));
    }
}
