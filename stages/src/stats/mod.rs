//! Small statistics shared by stages: quantiles as pandas computes them, the two-sample
//! Kolmogorov–Smirnov distance, Gaussian kernel densities and Gelman–Rubin's R̂.

pub mod mice;
pub mod pool;

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

/// The two-sample Kolmogorov–Smirnov statistic D = sup_x |F_a(x) − F_b(x)| of the empirical
/// distribution functions (scipy's `ks_2samp` statistic). NaNs must be removed first; `None`
/// when either sample is empty.
pub fn ks_distance(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable_by(f64::total_cmp);
    b.sort_unstable_by(f64::total_cmp);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        // Step past every copy of the smaller value in both samples, then compare.
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    Some(d)
}

/// Scott's rule bandwidth for a Gaussian kernel, as scipy's `gaussian_kde`: the sample standard
/// deviation (ddof 1) times n^(−1/5). `None` with fewer than two values or no spread.
pub fn scott_bandwidth(values: &[f64]) -> Option<f64> {
    let n = values.len() as f64;
    if values.len() < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n;
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    (sd > 0.0 && sd.is_finite()).then(|| sd * n.powf(-0.2))
}

/// A Gaussian kernel density estimate of `values` with bandwidth `h`, at each point of `at`.
///
/// Linear binning (Silverman 1982; Wand & Jones 1995, §D.2): the values are spread over 4,096
/// equally spaced bin centres, each value's weight split between its two neighbours, and the
/// density is the kernel sum over the bins within 6h. A million values cost one pass; against
/// the exact sum the relative error is of order (bin width / h)², under 10⁻⁴ for the data this
/// is used on (the test compares with scipy).
pub fn gaussian_kde(values: &[f64], h: f64, at: &[f64]) -> Vec<f64> {
    const BINS: usize = 4096;
    if values.is_empty() || h.is_nan() || h <= 0.0 {
        return vec![f64::NAN; at.len()];
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let width = ((hi - lo) / (BINS - 1) as f64).max(f64::MIN_POSITIVE);
    let mut weights = vec![0f64; BINS];
    for v in values {
        let position = ((v - lo) / width).clamp(0.0, (BINS - 1) as f64);
        let left = (position.floor() as usize).min(BINS - 2);
        let frac = position - left as f64;
        weights[left] += 1.0 - frac;
        weights[left + 1] += frac;
    }
    let norm = 1.0 / (values.len() as f64 * h * (2.0 * std::f64::consts::PI).sqrt());
    let reach = 6.0 * h;
    at.iter()
        .map(|&x| {
            let first = (((x - reach - lo) / width).floor().max(0.0) as usize).min(BINS);
            let last = (((x + reach - lo) / width).ceil().max(-1.0) + 1.0).clamp(0.0, BINS as f64)
                as usize;
            let sum: f64 = (first..last.max(first))
                .map(|b| {
                    let z = (x - (lo + b as f64 * width)) / h;
                    weights[b] * (-0.5 * z * z).exp()
                })
                .sum();
            sum * norm
        })
        .collect()
}

/// Gelman & Rubin's (1992) potential scale reduction factor R̂ of `chains`, each a sequence of
/// one quantity (e.g. the imputed column's mean after each iteration), all of one length n:
/// B = n·var(chain means), W = mean(chain variances), V̂ = (n − 1)/n·W + B/n, R̂ = √(V̂/W)
/// (Gelman et al., *Bayesian Data Analysis*, 3rd ed., §11.4, without splitting). `None` with
/// fewer than two chains, fewer than two draws each, or no variation within chains.
pub fn gelman_rubin(chains: &[Vec<f64>]) -> Option<f64> {
    let m = chains.len();
    let n = chains.first()?.len();
    if m < 2 || n < 2 || chains.iter().any(|c| c.len() != n) {
        return None;
    }
    let nf = n as f64;
    let means: Vec<f64> = chains.iter().map(|c| c.iter().sum::<f64>() / nf).collect();
    let grand = means.iter().sum::<f64>() / m as f64;
    let b = nf * means.iter().map(|x| (x - grand).powi(2)).sum::<f64>() / (m as f64 - 1.0);
    let w = chains
        .iter()
        .zip(&means)
        .map(|(c, mean)| c.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0))
        .sum::<f64>()
        / m as f64;
    if w.is_nan() || w <= 0.0 {
        return None;
    }
    let v = (nf - 1.0) / nf * w + b / nf;
    Some((v / w).sqrt())
}

/// A number for JSON: NaN and infinities (a standard deviation of one value, say) become null,
/// so that summaries never hold a value JSON cannot.
pub fn finite(value: f64) -> serde_json::Value {
    if value.is_finite() {
        serde_json::json!(value)
    } else {
        serde_json::Value::Null
    }
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

    /// scipy 1.17: `ks_2samp(a, b).statistic` for these samples (ties within and across).
    #[test]
    fn ks_distance_matches_scipy() {
        let a = [0.1, 0.5, 0.5, 1.2, 3.0, 4.4, 5.0];
        let b = [0.3, 0.5, 2.2, 2.9, 6.1];
        assert!((ks_distance(&a, &b).unwrap() - 0.228_571_428_571_428_56).abs() < 1e-12);
        let a: Vec<f64> = (0..300).map(|i| (i as f64 * 1.3).sin() * 2.0).collect();
        let b: Vec<f64> = (0..200)
            .map(|i| (i as f64 * 0.7).cos() * 2.5 + 0.3)
            .collect();
        assert!((ks_distance(&a, &b).unwrap() - 0.265).abs() < 1e-12);
        assert_eq!(ks_distance(&a, &a), Some(0.0));
        assert_eq!(ks_distance(&[], &a), None);
    }

    /// scipy 1.17: `gaussian_kde(x)` (Scott's rule) at these points, for x_i = 3·sin(i) +
    /// 0.5·(i mod 7), i < 1000. Linear binning on 4,096 bins is within 1e-4 relative of the
    /// exact sum here (bin width 0.0027 against h = 0.587); 1e-3 leaves room.
    #[test]
    fn gaussian_kde_matches_scipy() {
        let x: Vec<f64> = (0..1000)
            .map(|i| (i as f64).sin() * 3.0 + (i % 7) as f64 * 0.5)
            .collect();
        let h = scott_bandwidth(&x).unwrap();
        assert!((h - 0.586_591_389_552_115_3).abs() < 1e-12);
        let at = [-3.0, -1.0, 0.0, 0.5, 2.0, 3.5, 4.0, 6.0];
        let expected = [
            0.034_598_588_245_359_17,
            0.119_135_474_358_663_16,
            0.138_209_926_582_158_42,
            0.131_750_420_862_212_48,
            0.123_408_174_266_922_87,
            0.132_241_357_319_324_8,
            0.118_738_229_955_147_2,
            0.034_625_174_388_324_27,
        ];
        for (got, want) in gaussian_kde(&x, h, &at).iter().zip(expected) {
            assert!((got - want).abs() < 1e-3 * want, "{got} vs {want}");
        }
        // Far from the data: 1.5e-8 in scipy; the binned sum stops at 6h, which gives 0.
        assert!(gaussian_kde(&x, h, &[9.0])[0] < 2e-8);
    }

    /// R̂ computed by hand (numpy) for three chains of five draws.
    #[test]
    fn gelman_rubin_matches_a_hand_computation() {
        let chains = vec![
            vec![1.0, 1.2, 0.9, 1.1, 1.0],
            vec![1.3, 1.1, 1.2, 1.4, 1.25],
            vec![0.8, 1.0, 0.95, 0.85, 0.9],
        ];
        assert!((gelman_rubin(&chains).unwrap() - 1.931_911_867_701_767_3).abs() < 1e-12);
        // Chains drawn from one distribution: R̂ near 1.
        let same: Vec<Vec<f64>> = (0..4)
            .map(|c| {
                (0..500)
                    .map(|i| ((i * 7 + c * 13) as f64 * 0.917).sin())
                    .collect()
            })
            .collect();
        let r = gelman_rubin(&same).unwrap();
        assert!((0.99..1.01).contains(&r), "{r}");
        assert_eq!(gelman_rubin(&chains[..1]), None, "one chain");
        assert_eq!(
            gelman_rubin(&[vec![1.0, 1.0], vec![2.0, 2.0]]),
            None,
            "no variation within"
        );
    }
}
