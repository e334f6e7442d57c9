//! MICE: multiple imputation by chained equations, on plain columns of numbers.
//!
//! The algorithm of van Buuren & Groothuis-Oudshoorn (2011), *mice: Multivariate Imputation by
//! Chained Equations in R*, J. Stat. Softw. 45(3), and van Buuren, *Flexible Imputation of Missing
//! Data*, 2nd ed. (FIMD), §3.2–3.4 and §4.5. Each of the `m` imputations is its own chain: its
//! missing values start as random draws from the observed ones; each iteration then visits the
//! incomplete columns in order and draws each one's missing values from a regression on the
//! current values of its predictors. A chain's random numbers come from its own stream of ChaCha8
//! seeded with (`seed`, chain), so the result does not depend on how many threads run the chains.

use nalgebra::{DMatrix, DVector};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{ChiSquared, Distribution, Exp, StandardNormal};

/// How one column's missing values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Predictive mean matching (FIMD §3.4), type-1 matching: a donor's observed value.
    Pmm,
    /// Bayesian linear regression (FIMD §3.2, algorithm 3.1).
    Norm,
    /// Bayesian linear regression drawn from its predictive distribution truncated at `at`: every
    /// missing value of the column is known to lie `above` (≥) or below (≤) it.
    Censored { at: f64, above: bool },
}

/// What to impute and how.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The number of imputations (chains).
    pub m: usize,
    /// Iterations per chain.
    pub iterations: usize,
    pub seed: u64,
    /// PMM's donor pool size.
    pub donors: usize,
    /// Per column.
    pub methods: Vec<Method>,
    /// Per column, the columns (indices) its model uses.
    pub predictors: Vec<Vec<usize>>,
}

/// One chain's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// The completed values of each incomplete column (in [`Imputation::incomplete`] order).
    pub columns: Vec<Vec<f64>>,
    /// Per iteration (from 1) and incomplete column: the column's mean and standard deviation
    /// (ddof 1) over all rows after the iteration.
    pub trace: Vec<TracePoint>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TracePoint {
    pub iteration: usize,
    /// Index into the data's columns.
    pub column: usize,
    pub mean: f64,
    pub std: f64,
}

/// The result of [`impute`].
#[derive(Debug, Clone, PartialEq)]
pub struct Imputation {
    /// The columns with missing values, in data order.
    pub incomplete: Vec<usize>,
    /// Per column, the rows that were missing.
    pub missing: Vec<Vec<usize>>,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MiceError {
    /// A column has no observed value, so nothing can model it.
    AllMissing(usize),
    /// `cancel` was set: the chains stopped between iterations.
    Cancelled,
}

/// Imputes the missing values (NaN) of `columns` (all of the same length) `spec.m` times.
pub fn impute(columns: &[Vec<f64>], spec: &Spec) -> Result<Imputation, MiceError> {
    impute_until(columns, spec, &crate::Cancel::default())
}

/// [`impute`], stopping between iterations once `cancel` is set.
pub fn impute_until(
    columns: &[Vec<f64>],
    spec: &Spec,
    cancel: &crate::Cancel,
) -> Result<Imputation, MiceError> {
    let shared = Shared::new(columns, spec, true)?;
    let chains = crate::threads::spread(spec.m, |chain| {
        run_chain(columns, spec, &shared, chain, cancel)
    });
    if cancel.is_cancelled() {
        return Err(MiceError::Cancelled);
    }
    Ok(Imputation {
        incomplete: shared.incomplete,
        missing: shared.missing,
        chains,
    })
}

/// What every chain starts from: each column's missing and observed rows, the incomplete
/// columns, and the models that are the same in every iteration of every chain.
struct Shared {
    missing: Vec<Vec<usize>>,
    observed: Vec<Vec<usize>>,
    incomplete: Vec<usize>,
    /// Per incomplete column, its observed values, which a chain's first values are drawn from.
    values: Vec<Vec<f64>>,
    /// Per column, its model when none of its predictors has missing values: fitted (and for
    /// PMM its donors sorted) once, here, instead of in each of the chains' iterations.
    fixed: Vec<Option<Model>>,
}

impl Shared {
    /// What the chains share; with `fit_once` false, no model is fixed (every one is refitted in
    /// every iteration, which the fixed ones must draw exactly as).
    fn new(columns: &[Vec<f64>], spec: &Spec, fit_once: bool) -> Result<Shared, MiceError> {
        let (missing, observed): (Vec<Vec<usize>>, Vec<Vec<usize>>) = columns
            .iter()
            .map(|c| (0..c.len()).partition(|&r| c[r].is_nan()))
            .unzip();
        let incomplete: Vec<usize> = (0..columns.len())
            .filter(|&j| !missing[j].is_empty())
            .collect();
        if let Some(&j) = incomplete.iter().find(|&&j| observed[j].is_empty()) {
            return Err(MiceError::AllMissing(j));
        }
        let values = (0..columns.len())
            .map(|j| match missing[j].is_empty() {
                true => Vec::new(),
                false => observed[j].iter().map(|&r| columns[j][r]).collect(),
            })
            .collect();
        let fixed = (0..columns.len())
            .map(|j| {
                let complete = spec.predictors[j].iter().all(|&p| missing[p].is_empty());
                (fit_once && complete && !missing[j].is_empty())
                    .then(|| Model::fit(columns, j, spec, &observed[j], &missing[j]))
            })
            .collect();
        Ok(Shared {
            missing,
            observed,
            incomplete,
            values,
            fixed,
        })
    }
}

fn run_chain(
    columns: &[Vec<f64>],
    spec: &Spec,
    shared: &Shared,
    chain: usize,
    cancel: &crate::Cancel,
) -> Chain {
    let Shared {
        missing,
        observed,
        incomplete,
        values,
        fixed,
    } = shared;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    rng.set_stream(chain as u64);
    let mut x: Vec<Vec<f64>> = columns.to_vec();
    // Start: random draws from the observed values (mice's default), or the censoring point,
    // which the true value lies beyond.
    for &j in incomplete {
        match spec.methods[j] {
            Method::Censored { at, .. } => {
                for &r in &missing[j] {
                    x[j][r] = at;
                }
            }
            _ => {
                for &r in &missing[j] {
                    x[j][r] = values[j][rng.random_range(0..values[j].len())];
                }
            }
        }
    }
    let mut trace = Vec::with_capacity(spec.iterations * incomplete.len());
    for iteration in 1..=spec.iterations {
        if cancel.is_cancelled() {
            break;
        }
        for &j in incomplete {
            match &fixed[j] {
                Some(model) => model.draw(&mut x[j], &missing[j], &mut rng),
                None => Model::fit(&x, j, spec, &observed[j], &missing[j]).draw(
                    &mut x[j],
                    &missing[j],
                    &mut rng,
                ),
            }
        }
        for &j in incomplete {
            let (mean, std) = mean_std(&x[j]);
            trace.push(TracePoint {
                iteration,
                column: j,
                mean,
                std,
            });
        }
    }
    Chain {
        columns: incomplete
            .iter()
            .map(|&j| std::mem::take(&mut x[j]))
            .collect(),
        trace,
    }
}

/// Mean and sample standard deviation (ddof 1; NaN for fewer than two values).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let ss = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
    (mean, (ss / (n - 1.0)).sqrt())
}

/// The model that draws column `j`'s missing values from the current values of its
/// predictors: the least-squares fit on the observed rows, the design of the missing rows, and
/// for PMM the observed rows sorted by their predicted means.
struct Model {
    fit: Fit,
    /// The design matrix of the missing rows.
    x_mis: DMatrix<f64>,
    rule: Rule,
}

/// How a [`Model`] turns the predicted means of the missing rows into values: [`Method`], with
/// PMM's donors sorted by their predicted means, and their observed values in that order (a
/// donor's value is then read near its neighbours', not from anywhere in the column).
enum Rule {
    Pmm { donors: Donors, values: Vec<f64> },
    Norm,
    Censored { at: f64, above: bool },
}

impl Model {
    /// Fits column `j` on its predictors' values in `x`.
    fn fit(x: &[Vec<f64>], j: usize, spec: &Spec, observed: &[usize], missing: &[usize]) -> Model {
        // A predictor constant over the observed rows carries nothing and makes XᵀX singular:
        // left out, as mice's `remove.lindep` does.
        let predictors: Vec<usize> = spec.predictors[j]
            .iter()
            .copied()
            .filter(|&p| {
                let first = x[p][observed[0]];
                observed.iter().any(|&r| x[p][r] != first)
            })
            .collect();
        let design = |rows: &[usize]| {
            DMatrix::from_fn(rows.len(), predictors.len() + 1, |i, k| {
                if k == 0 {
                    1.0
                } else {
                    x[predictors[k - 1]][rows[i]]
                }
            })
        };
        let x_obs = design(observed);
        let y_obs = DVector::from_iterator(observed.len(), observed.iter().map(|&r| x[j][r]));
        let fit = Fit::least_squares(&x_obs, &y_obs);
        let rule = match spec.methods[j] {
            Method::Pmm => {
                let donors = Donors::new((&x_obs * &fit.beta).as_slice(), spec.donors);
                let values = donors.order.iter().map(|&i| y_obs[i]).collect();
                Rule::Pmm { donors, values }
            }
            Method::Norm => Rule::Norm,
            Method::Censored { at, above } => Rule::Censored { at, above },
        };
        Model {
            fit,
            x_mis: design(missing),
            rule,
        }
    }

    /// Draws the `missing` values of `column` (the model's column `j`).
    fn draw(&self, column: &mut [f64], missing: &[usize], rng: &mut ChaCha8Rng) {
        let draw = self.fit.draw(rng);
        let mean_mis = &self.x_mis * &draw.beta;
        match &self.rule {
            Rule::Norm => {
                for (i, &r) in missing.iter().enumerate() {
                    let e: f64 = rng.sample(StandardNormal);
                    column[r] = mean_mis[i] + draw.sigma * e;
                }
            }
            &Rule::Censored { at, above } => {
                for (i, &r) in missing.iter().enumerate() {
                    column[r] = if above {
                        truncated_normal_above(rng, mean_mis[i], draw.sigma, at)
                    } else {
                        -truncated_normal_above(rng, -mean_mis[i], draw.sigma, -at)
                    };
                }
            }
            Rule::Pmm { donors, values } => {
                let drawn = donors.positions(mean_mis.as_slice(), rng);
                for (&r, position) in missing.iter().zip(drawn) {
                    column[r] = values[position];
                }
            }
        }
    }
}

/// A least-squares fit and what its posterior draw needs.
struct Fit {
    /// β̂.
    beta: DVector<f64>,
    /// The residual sum of squares.
    rss: f64,
    /// F with F·Fᵀ = (XᵀX)⁻¹ (or its ridge version).
    factor: DMatrix<f64>,
    /// n_obs − p, at least 1.
    df: f64,
}

/// One draw of the parameters from their posterior.
struct Draw {
    beta: DVector<f64>,
    sigma: f64,
}

/// mice's ridge penalty, used only when X is (nearly) rank deficient.
const RIDGE: f64 = 1e-5;

impl Fit {
    /// By QR (X = QR, β̂ = R⁻¹Qᵀy, (XᵀX)⁻¹ = R⁻¹R⁻ᵀ); when R is (nearly) singular, by the normal
    /// equations with mice's ridge, (XᵀX + κ·diag(XᵀX))⁻¹.
    fn least_squares(x: &DMatrix<f64>, y: &DVector<f64>) -> Fit {
        let (n, p) = x.shape();
        let df = (n as f64 - p as f64).max(1.0);
        if n >= p {
            let qr = x.clone().qr();
            let r = qr.r();
            let diag: Vec<f64> = (0..p).map(|i| r[(i, i)].abs()).collect();
            let largest = diag.iter().cloned().fold(0.0, f64::max);
            if largest > 0.0 && diag.iter().all(|d| *d > 1e-8 * largest) {
                let mut qty = y.clone();
                qr.q_tr_mul(&mut qty);
                let qty = qty.rows(0, p).into_owned();
                if let (Some(beta), Some(factor)) = (
                    r.solve_upper_triangular(&qty),
                    r.solve_upper_triangular(&DMatrix::identity(p, p)),
                ) {
                    let rss = (y - x * &beta).norm_squared();
                    return Fit {
                        beta,
                        rss,
                        factor,
                        df,
                    };
                }
            }
        }
        let xtx = x.transpose() * x;
        let mut penalised = xtx.clone();
        for i in 0..p {
            penalised[(i, i)] += RIDGE * xtx[(i, i)].max(f64::MIN_POSITIVE);
        }
        let inverse = penalised
            .clone()
            .cholesky()
            .map(|c| c.inverse())
            .unwrap_or_else(|| DMatrix::identity(p, p) / RIDGE);
        let beta = &inverse * (x.transpose() * y);
        let rss = (y - x * &beta).norm_squared();
        let factor = inverse
            .clone()
            .cholesky()
            .map(|c| c.l())
            .unwrap_or_else(|| DMatrix::identity(p, p) * (1.0 / RIDGE).sqrt());
        Fit {
            beta,
            rss,
            factor,
            df,
        }
    }

    /// σ̇² = RSS / χ²(df), β̇ = β̂ + σ̇·F·z (FIMD algorithm 3.1, steps 5–8).
    fn draw(&self, rng: &mut ChaCha8Rng) -> Draw {
        let chi2 = ChiSquared::new(self.df)
            .map(|d| d.sample(rng))
            .unwrap_or(self.df);
        let sigma = (self.rss / chi2).sqrt();
        let z = DVector::from_fn(self.beta.len(), |_, _| rng.sample(StandardNormal));
        Draw {
            beta: &self.beta + (&self.factor * z) * sigma,
            sigma,
        }
    }
}

/// The observed rows sorted by their predicted means, from which PMM draws each target's donor
/// (type-1 matching): a row at random among the `donors` whose predicted means are nearest the
/// target (a missing row's predicted mean).
///
/// Ties are broken at random for each target. When more observed rows than needed lie at the
/// distance of the farthest donor (with an integer predictor, thousands share one predicted
/// mean), the donors are all the strictly nearer rows plus a random choice among the tied ones,
/// drawn anew for every target. R's `mice` breaks ties once per call, so every missing value with
/// the same prediction shares the same few donors; that clusters the imputations and inflates
/// their spread across imputations (docs/stages.md, `impute`).
struct Donors {
    /// The observed rows (indices into the predicted means), by predicted mean and then row.
    order: Vec<usize>,
    /// The predicted means in that order.
    sorted: Vec<f64>,
    /// For each position, the positions holding the same value (its run of ties).
    runs: Vec<(usize, usize)>,
    /// The distinct values, with where their runs start: searched instead of every value (an
    /// integer predictor gives a few hundred distinct values for hundreds of thousands of rows).
    distinct: Vec<f64>,
    starts: Vec<usize>,
    /// How many donors a target draws from.
    k: usize,
}

impl Donors {
    /// The donors among rows with predicted means `observed`, `donors` nearest for each target.
    fn new(observed: &[f64], donors: usize) -> Donors {
        // (value, row) pairs are all distinct, so the unstable sort is deterministic.
        let mut pairs: Vec<(f64, usize)> = observed.iter().copied().zip(0..).collect();
        pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let order: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        let sorted: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        drop(pairs);
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(sorted.len());
        let (mut distinct, mut starts) = (Vec::new(), Vec::new());
        let mut start = 0;
        for i in 1..=sorted.len() {
            if i == sorted.len() || sorted[i] != sorted[start] {
                runs.extend(std::iter::repeat_n((start, i), i - start));
                distinct.push(sorted[start]);
                starts.push(start);
                start = i;
            }
        }
        Donors {
            k: donors.clamp(1, sorted.len()),
            order,
            sorted,
            runs,
            distinct,
            starts,
        }
    }

    /// Where the donors of target value `t` are.
    fn window(&self, t: f64) -> Window {
        let Donors {
            sorted, runs, k, ..
        } = self;
        // The k nearest values of a sorted list are a window of it.
        let at = self
            .starts
            .get(self.distinct.partition_point(|v| *v < t))
            .copied()
            .unwrap_or(sorted.len());
        let (mut lo, mut hi) = (at, at);
        while hi - lo < *k {
            let take_low = if lo == 0 {
                false
            } else if hi == sorted.len() {
                true
            } else {
                t - sorted[lo - 1] <= sorted[hi] - t
            };
            if take_low {
                lo -= 1;
            } else {
                hi += 1;
            }
        }
        // The farthest donor's distance, and the rows at exactly that distance, on either
        // side (all equal to the window's end value on that side).
        let (left, right) = (sorted[lo], sorted[hi - 1]);
        let far = (t - left).abs().max((right - t).abs());
        let mut tied: [(usize, usize); 2] = [(0, 0); 2];
        let (mut nearer_from, mut nearer_to) = (lo, hi);
        if (t - left).abs() == far {
            tied[0] = runs[lo];
            nearer_from = tied[0].1;
        }
        if (right - t).abs() == far && right != left {
            tied[1] = runs[hi - 1];
            nearer_to = tied[1].0;
        } else if (right - t).abs() == far {
            nearer_to = nearer_from;
        }
        Window {
            nearer_from,
            nearer: nearer_to.saturating_sub(nearer_from),
            tied,
        }
    }

    /// For each of `targets`, its donor's position in [`Donors::order`].
    fn positions(&self, targets: &[f64], rng: &mut ChaCha8Rng) -> Vec<usize> {
        // A target's window depends on its value alone, and targets repeat (an integer
        // predictor gives a few hundred distinct values), so windows are remembered in a small
        // direct-mapped cache.
        let mut cache: Vec<Option<(u64, Window)>> = vec![None; 1024];
        targets
            .iter()
            .map(|&t| {
                let key = t.to_bits();
                let slot = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize;
                let Window {
                    nearer_from,
                    nearer,
                    tied,
                } = match cache[slot] {
                    Some((cached, w)) if cached == key => w,
                    _ => {
                        let w = self.window(t);
                        cache[slot] = Some((key, w));
                        w
                    }
                };
                let pick = rng.random_range(0..self.k);
                if pick < nearer {
                    nearer_from + pick
                } else {
                    let sizes = (tied[0].1 - tied[0].0, tied[1].1 - tied[1].0);
                    let r = rng.random_range(0..sizes.0 + sizes.1);
                    if r < sizes.0 {
                        tied[0].0 + r
                    } else {
                        tied[1].0 + r - sizes.0
                    }
                }
            })
            .collect()
    }
}

/// The donors of one target value (see [`Donors`]): `nearer` positions from
/// `nearer_from` are strictly nearer than the farthest donor, and the rows in `tied` lie exactly
/// as far.
#[derive(Debug, Clone, Copy)]
struct Window {
    nearer_from: usize,
    nearer: usize,
    tied: [(usize, usize); 2],
}

/// A draw from N(μ, σ²) truncated to [a, ∞): plain rejection when a is below the mean (each try
/// succeeds with probability ≥ ½), else Robert's (1995) exponential proposal with its optimal
/// rate (*Statistics and Computing* 5, 121–125), efficient however far out the tail is.
pub fn truncated_normal_above(rng: &mut ChaCha8Rng, mu: f64, sigma: f64, a: f64) -> f64 {
    if sigma.is_nan() || sigma <= 0.0 || !sigma.is_finite() {
        return mu.max(a);
    }
    let alpha = (a - mu) / sigma;
    if !alpha.is_finite() {
        return mu.max(a);
    }
    let z = if alpha <= 0.0 {
        loop {
            let z: f64 = rng.sample(StandardNormal);
            if z >= alpha {
                break z;
            }
        }
    } else {
        let rate = (alpha + (alpha * alpha + 4.0).sqrt()) / 2.0;
        let Ok(exp) = Exp::new(rate) else {
            return a;
        };
        loop {
            let z = alpha + exp.sample(rng);
            let u: f64 = rng.random();
            if u <= (-(z - rate).powi(2) / 2.0).exp() {
                break z;
            }
        }
    };
    (mu + sigma * z).max(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::pool::pool_scalar;

    fn spec(methods: Vec<Method>, m: usize, iterations: usize, seed: u64) -> Spec {
        let k = methods.len();
        Spec {
            m,
            iterations,
            seed,
            donors: 5,
            methods,
            predictors: (0..k)
                .map(|j| (0..k).filter(|&p| p != j).collect())
                .collect(),
        }
    }

    /// The posterior draw of `norm`: over many draws on fixed data, β̇ averages β̂ and has
    /// covariance E[σ̇²]·(XᵀX)⁻¹ = RSS/(df − 2)·(XᵀX)⁻¹ (σ̇² = RSS/χ²_df, E[1/χ²_df] = 1/(df − 2)).
    #[test]
    fn the_norm_draw_has_the_posterior_mean_and_covariance() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 40;
        let xs: Vec<f64> = (0..n).map(|i| i as f64 / 4.0).collect();
        let x = DMatrix::from_fn(n, 2, |i, k| if k == 0 { 1.0 } else { xs[i] });
        let y = DVector::from_fn(n, |i, _| {
            let e: f64 = rng.sample(StandardNormal);
            2.0 + 3.0 * xs[i] + 2.0 * e
        });
        let fit = Fit::least_squares(&x, &y);
        let xtx_inv = (x.transpose() * &x).try_inverse().unwrap();
        // β̂ agrees with the normal equations.
        let beta = &xtx_inv * (x.transpose() * &y);
        assert!((&fit.beta - &beta).norm() < 1e-9);
        let expected = &xtx_inv * (fit.rss / (fit.df - 2.0));
        let draws = 40_000;
        let samples: Vec<DVector<f64>> = (0..draws).map(|_| fit.draw(&mut rng).beta).collect();
        let mean = samples.iter().fold(DVector::zeros(2), |a, b| a + b) / draws as f64;
        let mut cov = DMatrix::zeros(2, 2);
        for s in &samples {
            let d = s - &mean;
            cov += &d * d.transpose();
        }
        cov /= draws as f64 - 1.0;
        // The mean: within 4 Monte-Carlo standard errors, √(var/draws).
        for k in 0..2 {
            let se = (expected[(k, k)] / draws as f64).sqrt();
            assert!(
                (mean[k] - fit.beta[k]).abs() < 4.0 * se,
                "β̇[{k}] averages {}",
                mean[k]
            );
        }
        // The covariance: a sample variance of 40,000 draws of a t-like variable (df 38, excess
        // kurtosis 6/(df − 4) ≈ 0.18) has a relative standard error of √((2 + 0.18)/40000) ≈ 0.74%;
        // 4% is over five of them. The covariance is compared through the correlation-scaled
        // difference, on the same footing.
        for (a, b) in [(0, 0), (1, 1), (0, 1)] {
            let scale = (expected[(a, a)] * expected[(b, b)]).sqrt();
            assert!(
                (cov[(a, b)] - expected[(a, b)]).abs() < 0.04 * scale,
                "cov[{a},{b}] = {} vs {}",
                cov[(a, b)],
                expected[(a, b)]
            );
        }
    }

    /// What [`simulate`] measures over its replications.
    struct Simulation {
        /// Average pooled estimate minus the truth, and the Monte-Carlo standard error of that
        /// average (sd of the estimates / √reps).
        mean_bias: (f64, f64),
        slope_bias: (f64, f64),
        /// Share of 95% intervals that hold the truth.
        mean_coverage: f64,
        slope_coverage: f64,
        /// The complete-case mean of y minus the truth, and its standard error.
        complete_case_bias: (f64, f64),
    }

    /// Simulated data with known truth: y = 2 + 3x + ε, x ~ N(0, 1), ε ~ N(0, 2²), n = 1000, 30%
    /// of y missing, completely at random or at random given x (logistic in x: 18% missing at
    /// x = −2, 43% at x = 2). Over `reps` replications, imputes m = 5 times and pools the mean of
    /// y (truth 2) and the slope of y on x (truth 3) with Rubin's rules.
    fn simulate(method: Method, mar: bool, reps: usize) -> Simulation {
        let n = 1000;
        let mut rng = ChaCha8Rng::seed_from_u64(if mar { 11 } else { 7 });
        let (mut means, mut slopes, mut cover_mean, mut cover_slope) = (vec![], vec![], 0, 0);
        let mut complete_case = Vec::new();
        for rep in 0..reps {
            let x: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
            let mut y: Vec<f64> = x
                .iter()
                .map(|x| {
                    let e: f64 = rng.sample(StandardNormal);
                    2.0 + 3.0 * x + 2.0 * e
                })
                .collect();
            for i in 0..n {
                let p = if mar {
                    1.0 / (1.0 + (-(-0.87 + 0.3 * x[i])).exp())
                } else {
                    0.3
                };
                if rng.random::<f64>() < p {
                    y[i] = f64::NAN;
                }
            }
            let observed: Vec<f64> = y.iter().copied().filter(|v| !v.is_nan()).collect();
            complete_case.push(observed.iter().sum::<f64>() / observed.len() as f64);
            let result = impute(
                &[y.clone(), x.clone()],
                &spec(vec![method, Method::Pmm], 5, 5, rep as u64),
            )
            .unwrap();
            let (mut q_mean, mut u_mean, mut q_slope, mut u_slope) =
                (vec![], vec![], vec![], vec![]);
            let (mx, _) = mean_std(&x);
            let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
            for chain in &result.chains {
                let yc = &chain.columns[0];
                let (my, sy) = mean_std(yc);
                q_mean.push(my);
                u_mean.push(sy * sy / n as f64);
                let sxy: f64 = x.iter().zip(yc).map(|(a, b)| (a - mx) * (b - my)).sum();
                let slope = sxy / sxx;
                let rss: f64 = x
                    .iter()
                    .zip(yc)
                    .map(|(a, b)| (b - my - slope * (a - mx)).powi(2))
                    .sum();
                q_slope.push(slope);
                u_slope.push(rss / (n as f64 - 2.0) / sxx);
            }
            let pm = pool_scalar(&q_mean, &u_mean, n as f64 - 1.0).unwrap();
            let ps = pool_scalar(&q_slope, &u_slope, n as f64 - 2.0).unwrap();
            means.push(pm.qbar);
            slopes.push(ps.qbar);
            let (lo, hi) = pm.interval(0.95).unwrap();
            cover_mean += usize::from(lo <= 2.0 && 2.0 <= hi);
            let (lo, hi) = ps.interval(0.95).unwrap();
            cover_slope += usize::from(lo <= 3.0 && 3.0 <= hi);
        }
        let r = reps as f64;
        let bias = |values: &[f64], truth: f64| {
            let (mean, sd) = mean_std(values);
            (mean - truth, sd / r.sqrt())
        };
        Simulation {
            mean_bias: bias(&means, 2.0),
            slope_bias: bias(&slopes, 3.0),
            mean_coverage: cover_mean as f64 / r,
            slope_coverage: cover_slope as f64 / r,
            complete_case_bias: bias(&complete_case, 2.0),
        }
    }

    /// `pmm` and `norm`, under MCAR and MAR: the pooled estimates are unbiased and their 95%
    /// intervals cover the truth; complete-case analysis is biased under MAR in the same data,
    /// so an imputation that ignored x would fail.
    ///
    /// Tolerances. A bias is within four Monte-Carlo standard errors of zero. With 1,000
    /// replications a 95% coverage has a Monte-Carlo standard error of √(.95·.05/1000) = 0.7%,
    /// so 92–98% is more than four of them either way. One exception, stated: PMM only ever
    /// imputes observed values, so at the edges of the data its donors sit nearer the centre
    /// and the slope shrinks a little (van Buuren, FIMD 2nd ed. §3.4.3; Morris, White & Royston,
    /// BMC Med. Res. Methodol. 14:75, 2014). That shrinkage is of the order of donors / n_obs;
    /// here (5 donors, ≈700 observed) PMM's slope may be low by up to 1%, where `norm`'s must
    /// not be.
    #[test]
    fn pooled_estimates_are_unbiased_and_cover_the_truth() {
        for method in [Method::Pmm, Method::Norm] {
            for mar in [false, true] {
                let s = simulate(method, mar, 1000);
                let case = format!("{method:?}, {}", if mar { "MAR" } else { "MCAR" });
                let (bias, se) = s.mean_bias;
                assert!(bias.abs() < 4.0 * se, "{case}: mean bias {bias} (se {se})");
                let (bias, se) = s.slope_bias;
                if method == Method::Pmm {
                    assert!(
                        bias < 4.0 * se && bias > -0.03 - 4.0 * se,
                        "{case}: slope bias {bias} (se {se})"
                    );
                } else {
                    assert!(bias.abs() < 4.0 * se, "{case}: slope bias {bias} (se {se})");
                }
                for coverage in [s.mean_coverage, s.slope_coverage] {
                    assert!(
                        (0.92..=0.98).contains(&coverage),
                        "{case}: coverage {coverage}"
                    );
                }
                let (cc, se) = s.complete_case_bias;
                if mar {
                    // Missing more often where x (and so y) is large: the observed mean is low.
                    assert!(cc < -10.0 * se, "{case}: complete-case bias {cc} (se {se})");
                } else {
                    assert!(
                        cc.abs() < 4.0 * se,
                        "{case}: complete-case bias {cc} (se {se})"
                    );
                }
            }
        }
    }

    /// y = 20 + 5x + ε (σ 5) censored at 30: every y ≥ 30 is recorded as missing (the seed's
    /// days = 30). `censored` imputes values ≥ 30 whose mean is near that of the true censored
    /// values; PMM can only give observed values, all below 30.
    #[test]
    fn censored_draws_respect_the_bound_where_pmm_cannot() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 5000;
        let x: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
        let truth: Vec<f64> = x
            .iter()
            .map(|x| {
                let e: f64 = rng.sample(StandardNormal);
                20.0 + 5.0 * x + 5.0 * e
            })
            .collect();
        let y: Vec<f64> = truth
            .iter()
            .map(|v| if *v >= 30.0 { f64::NAN } else { *v })
            .collect();
        let censored: Vec<usize> = (0..n).filter(|&i| y[i].is_nan()).collect();
        let true_mean = censored.iter().map(|&i| truth[i]).sum::<f64>() / censored.len() as f64;
        let imputed_mean = |method| {
            let result = impute(
                &[y.clone(), x.clone()],
                &spec(vec![method, Method::Pmm], 5, 10, 1),
            )
            .unwrap();
            let values: Vec<f64> = result
                .chains
                .iter()
                .flat_map(|c| censored.iter().map(|&i| c.columns[0][i]))
                .collect();
            (values.iter().sum::<f64>() / values.len() as f64, values)
        };
        let (mean, values) = imputed_mean(Method::Censored {
            at: 30.0,
            above: true,
        });
        assert!(values.iter().all(|v| *v >= 30.0));
        let (pmm, pmm_values) = imputed_mean(Method::Pmm);
        assert!(pmm_values.iter().all(|v| *v < 30.0));
        // The true mean of the censored values is about 33.4 here. The regression is fitted on
        // the uncensored rows only (so its slope is attenuated); its truncated draws still land
        // within 1.0 of the truth, where PMM is off by more than 4.
        assert!(
            (mean - true_mean).abs() < 1.0,
            "censored {mean} vs {true_mean}"
        );
        assert!((pmm - true_mean).abs() > 4.0, "pmm {pmm} vs {true_mean}");
    }

    #[test]
    fn truncated_normal_draws_stay_beyond_the_bound_and_have_the_right_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // E[Z | Z ≥ a] = φ(a)/(1 − Φ(a)): 0.7979 at a = 0, 2.3732 at a = 2, 5.1865 at a = 5.
        for (a, expected) in [
            (0.0, 0.797_884_6),
            (2.0, 2.373_215_5),
            (5.0, 5.186_503_2),
            (-1.0, 0.287_599_9),
        ] {
            let draws: Vec<f64> = (0..100_000)
                .map(|_| truncated_normal_above(&mut rng, 0.0, 1.0, a))
                .collect();
            assert!(draws.iter().all(|d| *d >= a));
            let (mean, sd) = mean_std(&draws);
            // Four standard errors of the mean of 100,000 draws.
            assert!(
                (mean - expected).abs() < 4.0 * sd / 100_000f64.sqrt(),
                "a = {a}: {mean} vs {expected}"
            );
        }
    }

    #[test]
    fn chains_do_not_depend_on_threads_and_repeat_exactly() {
        let y: Vec<f64> = (0..300)
            .map(|i| {
                if i % 3 == 0 {
                    f64::NAN
                } else {
                    (i % 17) as f64
                }
            })
            .collect();
        let x: Vec<f64> = (0..300)
            .map(|i| if i % 7 == 0 { f64::NAN } else { (i % 5) as f64 })
            .collect();
        let s = spec(vec![Method::Pmm, Method::Norm], 4, 3, 42);
        let a = impute(&[y.clone(), x.clone()], &s).unwrap();
        assert_eq!(a, impute(&[y.clone(), x.clone()], &s).unwrap());
        assert_eq!(
            a.incomplete,
            vec![0, 1],
            "a predictor with missing values is imputed too"
        );
        let columns = [y, x];
        for (chain, result) in a.chains.iter().enumerate() {
            assert_eq!(
                result,
                &run_chain(
                    &columns,
                    &s,
                    &Shared::new(&columns, &s, true).unwrap(),
                    chain,
                    &crate::Cancel::default()
                )
            );
        }
        assert_ne!(a.chains[0], a.chains[1]);
        assert!(a
            .chains
            .iter()
            .all(|c| c.columns.iter().flatten().all(|v| v.is_finite())));
        assert_eq!(a.chains[0].trace.len(), 3 * 2);
    }

    #[test]
    fn a_model_fitted_once_draws_what_one_refitted_every_iteration_draws() {
        // y is missing a third of its values; its predictor x is complete, so y's model (the
        // fit and, for PMM, the donors sorted by predicted mean) is fitted once for all chains
        // and iterations. Refitted every iteration instead (no fixed models), each chain must
        // come out the same, value for value.
        let x: Vec<f64> = (0..400).map(|i| (i % 23) as f64).collect();
        let y: Vec<f64> = (0..400)
            .map(|i| {
                if i % 3 == 0 {
                    f64::NAN
                } else {
                    0.5 * (i % 23) as f64 + (i % 7) as f64
                }
            })
            .collect();
        for method in [
            Method::Pmm,
            Method::Norm,
            Method::Censored {
                at: 12.0,
                above: true,
            },
        ] {
            let s = spec(vec![method, Method::Pmm], 3, 4, 7);
            let a = impute(&[y.clone(), x.clone()], &s).unwrap();
            assert_eq!(a.incomplete, vec![0]);
            let columns = [y.clone(), x.clone()];
            let fixed = Shared::new(&columns, &s, true).unwrap().fixed;
            assert!(
                fixed[0].is_some() && fixed[1].is_none(),
                "y's model is fitted once"
            );
            let refit_always = Shared::new(&columns, &s, false).unwrap();
            assert!(refit_always.fixed.iter().all(Option::is_none));
            for (chain, result) in a.chains.iter().enumerate() {
                let refitted = run_chain(&columns, &s, &refit_always, chain, &Default::default());
                assert_eq!(result, &refitted, "{method:?}, chain {chain}");
            }
        }
    }

    #[test]
    fn edge_cases() {
        // Nothing missing: nothing to do.
        let result = impute(
            &[vec![1.0, 2.0], vec![3.0, 4.0]],
            &spec(vec![Method::Pmm; 2], 3, 2, 0),
        )
        .unwrap();
        assert!(result.incomplete.is_empty());
        assert!(result.chains.iter().all(|c| c.columns.is_empty()));
        // A column all missing.
        assert_eq!(
            impute(
                &[vec![f64::NAN; 3], vec![1.0, 2.0, 3.0]],
                &spec(vec![Method::Pmm; 2], 1, 1, 0)
            ),
            Err(MiceError::AllMissing(0))
        );
        // A constant predictor, and fewer observed values than donors: PMM still gives observed
        // values; norm gives finite ones.
        let y = vec![1.0, f64::NAN, 3.0, f64::NAN, 2.0];
        let c = vec![7.0; 5];
        for method in [Method::Pmm, Method::Norm] {
            let result = impute(
                &[y.clone(), c.clone()],
                &spec(vec![method, Method::Pmm], 2, 3, 9),
            )
            .unwrap();
            for chain in &result.chains {
                for &r in &[1, 3] {
                    let v = chain.columns[0][r];
                    assert!(v.is_finite());
                    if method == Method::Pmm {
                        assert!([1.0, 2.0, 3.0].contains(&v), "{v}");
                    }
                }
            }
        }
        // One observed value, two predictors equal to each other (collinear): the ridge fit.
        let y = vec![f64::NAN, 2.0, f64::NAN];
        let a = vec![1.0, 2.0, 3.0];
        let result = impute(
            &[y, a.clone(), a],
            &spec(vec![Method::Norm, Method::Pmm, Method::Pmm], 2, 2, 1),
        )
        .unwrap();
        assert!(result
            .chains
            .iter()
            .all(|c| c.columns[0].iter().all(|v| v.is_finite())));
    }

    /// The observed rows [`Donors`] draws for `targets`.
    fn rows(donors: &Donors, targets: &[f64], rng: &mut ChaCha8Rng) -> Vec<usize> {
        let positions = donors.positions(targets, rng);
        positions.into_iter().map(|p| donors.order[p]).collect()
    }

    #[test]
    fn pmm_takes_one_of_the_nearest_donors() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let observed = [0.0, 10.0, 1.0, 9.0, 2.0, 8.0];
        for _ in 0..200 {
            let picks = rows(&Donors::new(&observed, 2), &[0.4, 9.6, 100.0], &mut rng);
            assert!([0, 2].contains(&picks[0]), "{picks:?}");
            assert!([1, 3].contains(&picks[1]), "{picks:?}");
            assert!([1, 3].contains(&picks[2]), "{picks:?}");
        }
    }

    /// Ties at the farthest donor's distance are broken for each target: the strictly nearer
    /// rows are always donors, the tied ones share the remaining places at random.
    #[test]
    fn pmm_breaks_ties_for_each_target() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let observed = [1.0, 0.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0];
        let draws = 9000;
        let picks = rows(&Donors::new(&observed, 3), &vec![0.1; draws], &mut rng);
        let mut counts = [0usize; 8];
        for p in &picks {
            counts[*p] += 1;
        }
        // Row 1 (value 0) is one of the 3 donors every time: picked a third of the time
        // (standard error √(⅓·⅔/9000) ≈ 0.005); each of the six rows valued 1 a ninth.
        let share = |c: usize| c as f64 / draws as f64;
        assert!((share(counts[1]) - 1.0 / 3.0).abs() < 0.02, "{counts:?}");
        for row in [0, 2, 3, 5, 6, 7] {
            assert!((share(counts[row]) - 1.0 / 9.0).abs() < 0.015, "{counts:?}");
        }
        assert_eq!(counts[4], 0);
        // A target inside a block of ties draws from the whole block.
        let picks = rows(&Donors::new(&[2.0; 50], 5), &vec![2.0; 5000], &mut rng);
        let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
        assert_eq!(distinct.len(), 50);
    }
}
