//! Rubin's rules: pooling one estimate over multiply imputed data sets.
//!
//! Rubin (1987), *Multiple Imputation for Nonresponse in Surveys*, §3.1, with the small-sample
//! degrees of freedom of Barnard & Rubin (1999), *Biometrika* 86, 948–955, written as the R
//! `mice` package's `pool.scalar` and `barnard.rubin` do (van Buuren, *Flexible Imputation of
//! Missing Data*, 2nd ed., §2.3–2.4).

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

/// One estimate pooled over `m` imputations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pooled {
    /// The number of imputations.
    pub m: usize,
    /// The pooled estimate q̄ (3.1.2): the mean of the estimates.
    pub qbar: f64,
    /// Within-imputation variance ū (3.1.3): the mean of the estimates' variances.
    pub ubar: f64,
    /// Between-imputation variance b (3.1.4): the sample variance of the estimates.
    pub b: f64,
    /// Total variance t = ū + (1 + 1/m)·b (3.1.5).
    pub t: f64,
    /// Degrees of freedom of the t reference distribution (Barnard–Rubin).
    pub df: f64,
    /// Relative increase in variance due to nonresponse, r = (1 + 1/m)·b / ū (3.1.7).
    pub r: f64,
    /// Proportion of the total variance due to nonresponse, λ = (1 + 1/m)·b / t.
    pub lambda: f64,
    /// Fraction of missing information, (r + 2/(df + 3)) / (r + 1) (3.1.10).
    pub fmi: f64,
}

/// Pools `estimates` (one per imputation) with their `variances` (squared standard errors).
/// `dfcom` is the complete-data degrees of freedom, n − k (`f64::INFINITY` for a large sample).
/// `None` with fewer than two imputations, where the between variance is undefined.
pub fn pool_scalar(estimates: &[f64], variances: &[f64], dfcom: f64) -> Option<Pooled> {
    let m = estimates.len();
    if m < 2 || variances.len() != m {
        return None;
    }
    let mf = m as f64;
    let qbar = estimates.iter().sum::<f64>() / mf;
    let ubar = variances.iter().sum::<f64>() / mf;
    let b = estimates.iter().map(|q| (q - qbar).powi(2)).sum::<f64>() / (mf - 1.0);
    let t = ubar + (1.0 + 1.0 / mf) * b;
    let r = (1.0 + 1.0 / mf) * b / ubar;
    let lambda = (1.0 + 1.0 / mf) * b / t;
    let df = barnard_rubin(m, lambda, dfcom);
    let fmi = (r + 2.0 / (df + 3.0)) / (r + 1.0);
    Some(Pooled {
        m,
        qbar,
        ubar,
        b,
        t,
        df,
        r,
        lambda,
        fmi,
    })
}

/// Barnard & Rubin's degrees of freedom, in the form that stays finite as λ → 0 (where it tends to
/// dfcom·(dfcom + 1)/(dfcom + 3)); (m − 1)/λ² for an infinite sample.
pub fn barnard_rubin(m: usize, lambda: f64, dfcom: f64) -> f64 {
    let m1 = m as f64 - 1.0;
    if dfcom.is_infinite() {
        return m1 / (lambda * lambda);
    }
    let tmp = (1.0 - lambda) * (1.0 + dfcom) * dfcom;
    m1 * tmp / ((dfcom + 3.0) * m1 + lambda * lambda * tmp)
}

impl Pooled {
    /// The `level` (e.g. 0.95) confidence interval q̄ ± t_{df, (1+level)/2} · √t.
    pub fn interval(&self, level: f64) -> Option<(f64, f64)> {
        if self.df.is_nan() || self.df <= 0.0 || self.t.is_nan() || self.t < 0.0 {
            return None;
        }
        let quantile = if self.df.is_infinite() {
            statrs::distribution::Normal::standard().inverse_cdf((1.0 + level) / 2.0)
        } else {
            StudentsT::new(0.0, 1.0, self.df)
                .ok()?
                .inverse_cdf((1.0 + level) / 2.0)
        };
        let half = quantile * self.t.sqrt();
        Some((self.qbar - half, self.qbar + half))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of `mice::pool.scalar`'s documentation (mice 3.x): the slope of `bmi ~ age`
    /// in two imputations of `nhanes`, n = 25, k = 2. The expected values were computed apart,
    /// with numpy and scipy, from Rubin's formulas as `pool.scalar` and `barnard.rubin` write
    /// them: the inputs have 4–5 significant digits, so agreement to 1e-9 tests the arithmetic,
    /// not rounding.
    #[test]
    fn the_mice_pool_scalar_example() {
        let p = pool_scalar(
            &[-1.5457, -1.428],
            &[0.9723f64.powi(2), 1.041f64.powi(2)],
            23.0,
        )
        .unwrap();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        close(p.qbar, -1.48685);
        close(p.ubar, 1.014524145);
        close(p.b, 0.006926645000000016);
        close(p.t, 1.0249141125);
        close(p.df, 20.9702548380792);
        close(p.r, 0.010241222499440882);
        close(p.lambda, 0.010137403098740162);
        close(p.fmi, 0.09272831450855648);
        // scipy.stats.t.ppf(0.975, 20.9702548380792) = 2.0797934733128467.
        let (lo, hi) = p.interval(0.95).unwrap();
        close(hi - p.qbar, 2.0797934733128467 * p.t.sqrt());
        close(p.qbar - lo, hi - p.qbar);
    }

    /// `mice`'s own tests of `barnard.rubin`: the limit at λ = 0 and the infinite-sample form.
    #[test]
    fn barnard_rubin_limits() {
        let dfcom = 100.0;
        assert!(
            (barnard_rubin(10, 0.0, dfcom) - dfcom * (dfcom + 1.0) / (dfcom + 3.0)).abs() < 1e-9
        );
        for lambda in [1e-4, 1e-3, 0.2, 1.0] {
            assert!(
                (barnard_rubin(8, lambda, f64::INFINITY) - 7.0 / (lambda * lambda)).abs() < 1e-6
            );
            // Equal to dfold·dfobs / (dfold + dfobs), the textbook form.
            let dfold = 9.0 / (lambda * lambda);
            let dfobs = (dfcom + 1.0) / (dfcom + 3.0) * dfcom * (1.0 - lambda);
            let textbook = dfold * dfobs / (dfold + dfobs);
            assert!((barnard_rubin(10, lambda, dfcom) - textbook).abs() < 1e-9 * textbook.max(1.0));
        }
        assert!(pool_scalar(&[1.0], &[1.0], 10.0).is_none());
    }
}
