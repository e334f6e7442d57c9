//! `diagnose`: the imputation diagnostics of seed 000 §6 as a stage: per-imputation means and
//! spreads, R̂ of the chains, observed-vs-imputed distance, the Rubin-pooled mean, plots, an HTML
//! report and checks with thresholds.
//!
//! It reads the `impute` stage's output directory and the table that was imputed (to know which
//! values were observed), and writes `diagnostics.json`, `report.html` and `plots/`.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

pub(crate) mod plots;
mod report;

use crate::io::table::read_table_inferred;
use crate::pointer::of as pointer;
use crate::ports::{Inputs, Port};
use crate::stats::{
    finite, gaussian_kde, gelman_rubin, ks_distance, quantile_linear, scott_bandwidth,
};
use crate::{BuiltinStage, StageError, StageIo, StageReport};

/// Params of `diagnose`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiagnoseParams {
    /// The imputed columns to diagnose (default: every column the impute stage imputed).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Column → `[lo, hi]`, the x range of its density plots (default: the range of its values). Values outside it widen the plots, which mark it; the report and a warning count them.
    #[serde(default)]
    pub range: BTreeMap<String, [f64; 2]>,
    /// The thresholds the imputations are checked against (defaults from the seed).
    #[serde(default)]
    pub checks: Checks,
}

/// The checks, each with its threshold and what a miss does.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// (max − min) / mean of the per-imputation means (seed §6: "< 5%").
    #[serde(default = "five_percent")]
    pub mean_spread: Check,
    /// (max − min) / mean of the per-imputation standard deviations.
    #[serde(default = "five_percent")]
    pub std_spread: Check,
    /// R̂ of the chains' per-iteration mean and standard deviation, over the last half of the
    /// iterations (the larger of the two is checked).
    #[serde(default = "rhat")]
    pub rhat: Check,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            mean_spread: five_percent(),
            std_spread: five_percent(),
            rhat: rhat(),
        }
    }
}

/// A threshold: the check passes when the value is below `max`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub max: f64,
    /// `warn` records and prints a miss; `fail` fails the stage.
    #[serde(default)]
    pub severity: Severity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Warn,
    Fail,
}

fn five_percent() -> Check {
    Check {
        max: 0.05,
        severity: Severity::Warn,
    }
}

fn rhat() -> Check {
    Check {
        max: 1.1,
        severity: Severity::Warn,
    }
}

/// The built-in `diagnose` stage.
pub struct Diagnose;

/// The imputed long table (`impute`'s `imputed_long.parquet`).
const IMPUTED: Port = Port::required("imputed", 0);
/// The table before imputation, for the observed values.
const DATA: Port = Port::required("data", 1);
/// The report folder: HTML, JSON and plots.
const DIAGNOSTICS: Port = Port::required("diagnostics", 0);

impl BuiltinStage for Diagnose {
    const NAME: &'static str = "diagnose";
    /// 2: plots widen to hold values outside `range`, which the report counts.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "imputation diagnostics: spreads, R-hat, KS, pooled means, plots, an HTML report, checks";
    type Params = DiagnoseParams;

    const INPUTS: Inputs = Inputs::Named(&[IMPUTED, DATA]);
    const OUTPUTS: &'static [Port] = &[DIAGNOSTICS];

    /// The imputations and the data, read whole: about 3 bytes per input byte.
    fn memory(_: &DiagnoseParams, inputs: &[std::path::PathBuf]) -> Option<u64> {
        Some(crate::memory::linear(
            35.0,
            3.0,
            crate::memory::total(inputs),
        ))
    }

    fn check_params(params: &DiagnoseParams) -> Vec<crate::ParamsError> {
        let mut errors: Vec<crate::ParamsError> = params
            .range
            .iter()
            .filter(|(_, [lo, hi])| !(lo.is_finite() && hi.is_finite() && lo < hi))
            .map(|(c, [lo, hi])| crate::ParamsError {
                pointer: pointer(&["range", c]),
                message: format!(
                    "`range` of `{c}` is [{lo}, {hi}]; it must be [low, high] with low < high"
                ),
            })
            .collect();
        let Some(columns) = &params.columns else {
            return errors;
        };
        errors.extend(
            params
                .range
                .keys()
                .filter(|c| !columns.contains(c))
                .map(|c| crate::ParamsError {
                    pointer: pointer(&["range", c]),
                    message: format!(
                        "`range` names `{c}`, which is not a diagnosed column ({})",
                        columns.join(", ")
                    ),
                }),
        );
        errors
    }

    fn run(params: &DiagnoseParams, io: &StageIo) -> Result<StageReport, StageError> {
        let imputed = io.input_at(IMPUTED)?;
        let data = io.input_at(DATA)?;
        let out = io.output(DIAGNOSTICS)?;
        let imputation = Imputation::read(imputed, data, params)?;
        let diagnostics: Vec<ColumnDiagnostics> = imputation
            .columns
            .iter()
            .map(|column| ColumnDiagnostics::new(&imputation, column))
            .collect::<Result<_, _>>()?;
        let checks = evaluate(&diagnostics, &params.checks);
        let ranges: BTreeMap<String, RangeUse> = diagnostics
            .iter()
            .filter_map(|d| {
                let configured = params.range.get(&d.name)?;
                Some((d.name.clone(), d.against(&imputation, *configured)))
            })
            .collect();
        let warnings: Vec<String> = ranges
            .iter()
            .filter(|(_, r)| r.outside())
            .map(|(name, r)| r.sentence(name))
            .collect();
        let mut report = json!({
            "rows": imputation.rows,
            "m": imputation.m,
            "iterations": imputation.iterations,
            "columns": diagnostics.iter().map(|d| (d.name.clone(), d.to_json())).collect::<serde_json::Map<_, _>>(),
            "checks": checks.iter().map(CheckResult::to_json).collect::<Vec<_>>(),
            "passed": checks.iter().all(|c| c.status != Status::Fail),
        });
        for (name, range) in &ranges {
            report["columns"][name]["plot_range"] = range.to_json();
        }
        report::write(out, &imputation, &diagnostics, &report, &ranges)?;
        // The orchestrator fails the stage on a missed `fail` check, keeping this report (red
        // at the top) in quarantine rather than committing it.
        Ok(StageReport {
            summary: report,
            warnings,
            checks: checks.iter().map(CheckResult::reported).collect(),
        })
    }
}

/// What the impute stage wrote, as the diagnostics need it.
pub(crate) struct Imputation {
    pub rows: usize,
    pub m: usize,
    pub iterations: usize,
    pub columns: Vec<String>,
    /// Per column: its values in each imputation (m × rows).
    pub values: BTreeMap<String, Vec<Vec<f64>>>,
    /// Per column: which rows were missing before imputation.
    pub missing: BTreeMap<String, Vec<bool>>,
    /// Per column: the trace, per chain, per iteration: (mean, std).
    pub trace: BTreeMap<String, Vec<Vec<(f64, f64)>>>,
}

fn polars_error(e: PolarsError) -> StageError {
    StageError::new(e.to_string())
}

fn floats(df: &DataFrame, column: &str) -> Result<Vec<f64>, StageError> {
    let series = df
        .column(column)
        .and_then(|c| c.cast(&DataType::Float64))
        .map_err(polars_error)?;
    Ok(series
        .f64()
        .map_err(polars_error)?
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

impl Imputation {
    fn read(dir: &Path, data: &Path, params: &DiagnoseParams) -> Result<Imputation, StageError> {
        let summary_path = dir.join("summaries/impute_summary.json");
        let read = || -> std::io::Result<String> {
            use std::io::Read;
            let mut text = String::new();
            crate::safe::open_file(&summary_path)?.read_to_string(&mut text)?;
            Ok(text)
        };
        let text = read().map_err(|e| {
            StageError::new(format!(
                "cannot read `{}` ({e}): input `imputed` must be the output directory of an `impute` stage",
                summary_path.display()
            ))
        })?;
        let summary: Json = serde_json::from_str(&text).map_err(|e| {
            StageError::new(format!("`{}` is not JSON: {e}", summary_path.display()))
        })?;
        let number = |key: &str| summary[key].as_u64().unwrap_or(0) as usize;
        let (m, iterations) = (number("m"), number("iterations"));
        let imputed: Vec<String> = summary["imputed_columns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let columns = match &params.columns {
            Some(columns) => {
                for (i, column) in columns.iter().enumerate() {
                    if !imputed.contains(column) {
                        return Err(StageError::new(format!(
                            "column `{column}` (param `columns[{i}]`) was not imputed; the imputed columns are: {}",
                            if imputed.is_empty() { "none".to_owned() } else { imputed.join(", ") }
                        ))
                        .at_param(pointer(&["columns", &i.to_string()])));
                    }
                }
                columns.clone()
            }
            None => imputed,
        };
        for column in params.range.keys() {
            if !columns.contains(column) {
                return Err(StageError::new(format!(
                    "`range` names `{column}`, which is not a diagnosed column ({})",
                    columns.join(", ")
                ))
                .at_param(pointer(&["range", column])));
            }
        }
        let long = read_table_inferred(&dir.join("imputed_long.parquet"))?;
        let before = read_table_inferred(data)?;
        let rows = before.height();
        if long.height() != rows * m {
            return Err(StageError::new(format!(
                "`{}` has {} rows, but {} imputations of the {rows} rows of `{}` would have {}: is `data` the table that was imputed?",
                dir.join("imputed_long.parquet").display(),
                long.height(),
                m,
                data.display(),
                rows * m
            )));
        }
        let trace = read_table_inferred(&dir.join("trace.parquet"))?;
        let trace_column = trace
            .column("column")
            .and_then(|c| c.str().cloned())
            .map_err(polars_error)?;
        let (chain, iteration) = (floats(&trace, "chain")?, floats(&trace, "iteration")?);
        let (mean, std) = (floats(&trace, "mean")?, floats(&trace, "std")?);
        let (mut values, mut missing, mut traces) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for column in &columns {
            let all = floats(&long, column)?;
            values.insert(
                column.clone(),
                (0..m)
                    .map(|k| all[k * rows..(k + 1) * rows].to_vec())
                    .collect::<Vec<_>>(),
            );
            let original = floats(&before, column)?;
            missing.insert(
                column.clone(),
                original.iter().map(|v| v.is_nan()).collect::<Vec<_>>(),
            );
            let mut per_chain = vec![vec![(f64::NAN, f64::NAN); iterations]; m];
            for (i, name) in trace_column.iter().enumerate() {
                if name == Some(column.as_str()) {
                    let (c, it) = (chain[i] as usize, iteration[i] as usize);
                    if c < m && (1..=iterations).contains(&it) {
                        per_chain[c][it - 1] = (mean[i], std[i]);
                    }
                }
            }
            traces.insert(column.clone(), per_chain);
        }
        Ok(Imputation {
            rows,
            m,
            iterations,
            columns,
            values,
            missing,
            trace: traces,
        })
    }
}

/// Everything computed about one imputed column.
pub(crate) struct ColumnDiagnostics {
    pub name: String,
    pub observed: Vec<f64>,
    /// Per imputation: mean and std of the completed column, and of its imputed values.
    pub per_imputation: Vec<Moments>,
    pub mean_spread: Option<f64>,
    pub std_spread: Option<f64>,
    pub rhat_mean: Option<f64>,
    pub rhat_std: Option<f64>,
    /// The iterations R̂ is computed over.
    pub rhat_iterations: (usize, usize),
    pub ks: Option<f64>,
    pub imputed_count: usize,
    pub pooled: Option<crate::stats::pool::Pooled>,
    pub interval: Option<(f64, f64)>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Moments {
    pub mean: f64,
    pub std: f64,
    pub imputed_mean: f64,
    pub imputed_std: f64,
}

/// (max − min) / |mean| of `values`; `None` with fewer than two or a zero mean.
fn spread(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    (mean != 0.0 && mean.is_finite()).then(|| (max - min) / mean.abs())
}

impl ColumnDiagnostics {
    fn new(imputation: &Imputation, column: &str) -> Result<ColumnDiagnostics, StageError> {
        let values = &imputation.values[column];
        let missing = &imputation.missing[column];
        let observed: Vec<f64> = values
            .first()
            .map(|v| {
                v.iter()
                    .zip(missing)
                    .filter(|(_, m)| !**m)
                    .map(|(v, _)| *v)
                    .collect()
            })
            .unwrap_or_default();
        let per_imputation: Vec<Moments> = values
            .iter()
            .map(|v| {
                let (mean, std) = crate::stats::mice::mean_std(v);
                let imputed: Vec<f64> = v
                    .iter()
                    .zip(missing)
                    .filter(|(_, m)| **m)
                    .map(|(v, _)| *v)
                    .collect();
                let (imputed_mean, imputed_std) = crate::stats::mice::mean_std(&imputed);
                Moments {
                    mean,
                    std,
                    imputed_mean,
                    imputed_std,
                }
            })
            .collect();
        let means: Vec<f64> = per_imputation.iter().map(|p| p.mean).collect();
        let stds: Vec<f64> = per_imputation.iter().map(|p| p.std).collect();
        // R̂ over the last half of the iterations (at least two).
        let iterations = imputation.iterations;
        let first = (iterations / 2).min(iterations.saturating_sub(2));
        let trace = &imputation.trace[column];
        let chains = |pick: fn(&(f64, f64)) -> f64| -> Vec<Vec<f64>> {
            trace
                .iter()
                .map(|c| c[first..].iter().map(pick).collect())
                .collect()
        };
        let imputed: Vec<f64> = values
            .iter()
            .flat_map(|v| v.iter().zip(missing).filter(|(_, m)| **m).map(|(v, _)| *v))
            .collect();
        let n = imputation.rows as f64;
        let variances: Vec<f64> = stds.iter().map(|s| s * s / n).collect();
        let pooled = crate::stats::pool::pool_scalar(&means, &variances, n - 1.0);
        Ok(ColumnDiagnostics {
            name: column.to_owned(),
            mean_spread: spread(&means),
            std_spread: spread(&stds),
            rhat_mean: gelman_rubin(&chains(|p| p.0)),
            rhat_std: gelman_rubin(&chains(|p| p.1)),
            rhat_iterations: (first + 1, iterations),
            ks: ks_distance(&observed, &imputed),
            imputed_count: missing.iter().filter(|m| **m).count(),
            interval: pooled.and_then(|p| p.interval(0.95)),
            pooled,
            observed,
            per_imputation,
        })
    }

    fn to_json(&self) -> Json {
        let (mean, std) = crate::stats::mice::mean_std(&self.observed);
        json!({
            "observed": {"count": self.observed.len(), "mean": finite(mean), "std": finite(std)},
            "missing": self.imputed_count,
            "imputations": self.per_imputation.iter().enumerate().map(|(k, p)| json!({
                "impute_id": k,
                "mean": finite(p.mean),
                "std": finite(p.std),
                "imputed_mean": finite(p.imputed_mean),
                "imputed_std": finite(p.imputed_std),
            })).collect::<Vec<_>>(),
            "mean_spread": self.mean_spread.map(finite),
            "std_spread": self.std_spread.map(finite),
            "rhat": {
                "mean": self.rhat_mean.map(finite),
                "std": self.rhat_std.map(finite),
                "iterations": [self.rhat_iterations.0, self.rhat_iterations.1],
            },
            "ks_distance": self.ks.map(finite),
            "pooled_mean": self.pooled.map(|p| json!({
                "estimate": finite(p.qbar),
                "ci95": self.interval.map(|(lo, hi)| json!([finite(lo), finite(hi)])),
                "within_variance": finite(p.ubar),
                "between_variance": finite(p.b),
                "total_variance": finite(p.t),
                "df": finite(p.df),
                "relative_increase_in_variance": finite(p.r),
                "fraction_of_missing_information": finite(p.fmi),
            })),
        })
    }

    /// Where the values lie against a configured plot range: how many observed and imputed
    /// values fall outside it, and the range the plots show (the configured one, widened to
    /// hold every value: a plot never hides data).
    pub fn against(&self, imputation: &Imputation, configured: [f64; 2]) -> RangeUse {
        let [lo, hi] = configured;
        let outside = |v: &f64| *v < lo || *v > hi;
        let missing = &imputation.missing[&self.name];
        let values = &imputation.values[&self.name];
        let imputed = || {
            values
                .iter()
                .flat_map(|v| v.iter().zip(missing).filter(|(_, m)| **m).map(|(v, _)| v))
        };
        let all = values.iter().flatten().filter(|v| v.is_finite());
        let shown = [
            all.clone().copied().fold(lo, f64::min),
            all.copied().fold(hi, f64::max),
        ];
        RangeUse {
            configured,
            shown,
            observed_outside: self.observed.iter().filter(|v| outside(v)).count(),
            observed: self.observed.len(),
            imputed_outside: imputed().filter(|v| outside(v)).count(),
            imputed: imputed().count(),
        }
    }

    /// The density curves of the plots: (x, observed, per imputation, all imputations), over
    /// `range` (else the range of the values) with Scott's bandwidth for each sample.
    pub fn densities(
        &self,
        imputation: &Imputation,
        range: Option<[f64; 2]>,
    ) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>, Vec<f64>) {
        let values = &imputation.values[&self.name];
        let [lo, hi] = range.unwrap_or_else(|| {
            let all = values.iter().flatten();
            let lo = all.clone().copied().fold(f64::INFINITY, f64::min);
            let hi = all.copied().fold(f64::NEG_INFINITY, f64::max);
            [lo, hi]
        });
        let x: Vec<f64> = (0..256)
            .map(|i| lo + (hi - lo) * i as f64 / 255.0)
            .collect();
        let kde = |sample: &[f64]| match scott_bandwidth(sample) {
            Some(h) => gaussian_kde(sample, h, &x),
            None => vec![0.0; x.len()],
        };
        let observed = kde(&self.observed);
        let each: Vec<Vec<f64>> = values.iter().map(|v| kde(v)).collect();
        let all: Vec<f64> = values.iter().flatten().copied().collect();
        let all = kde(&all);
        (x, observed, each, all)
    }

    /// Box-plot numbers of the observed values, then of each imputation's completed column:
    /// (q1, median, q3, lower whisker, upper whisker), whiskers at the furthest values within
    /// 1.5 IQR (Tukey, as seaborn).
    pub fn boxes(&self, imputation: &Imputation) -> Vec<[f64; 5]> {
        std::iter::once(&self.observed)
            .chain(&imputation.values[&self.name])
            .map(|v| tukey_box(v))
            .collect()
    }

    /// Whether every value of the column is a whole number (days, counts): its axes tick as
    /// integers.
    pub fn integral(&self, imputation: &Imputation) -> bool {
        imputation.values[&self.name]
            .iter()
            .flatten()
            .all(|v| !v.is_finite() || v.fract() == 0.0)
    }
}

/// How a column's values lie against its configured plot `range`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RangeUse {
    pub configured: [f64; 2],
    /// What the plots show: the configured range, widened to hold every value.
    pub shown: [f64; 2],
    pub observed_outside: usize,
    pub observed: usize,
    /// Imputed values (of every imputation) outside the configured range.
    pub imputed_outside: usize,
    pub imputed: usize,
}

impl RangeUse {
    pub fn outside(&self) -> bool {
        self.observed_outside + self.imputed_outside > 0
    }

    pub fn to_json(self) -> serde_json::Value {
        json!({
            "configured": self.configured,
            "shown": self.shown,
            "observed_outside": self.observed_outside,
            "imputed_outside": self.imputed_outside,
            "imputed": self.imputed,
        })
    }

    /// What the report and the warning say when values lie outside.
    pub fn sentence(&self, column: &str) -> String {
        let [lo, hi] = self.configured.map(plots::tick);
        let [slo, shi] = self.shown.map(plots::tick);
        format!(
            "`{column}`: {} of {} imputed values and {} of {} observed lie outside the configured `range` [{lo}, {hi}]; the plots show [{slo}, {shi}] to hold them",
            self.imputed_outside, self.imputed, self.observed_outside, self.observed
        )
    }
}

fn tukey_box(v: &[f64]) -> [f64; 5] {
    let mut sorted: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let q = |sorted: &mut Vec<f64>, p| quantile_linear(sorted, p).unwrap_or(f64::NAN);
    let (q1, median, q3) = (
        q(&mut sorted, 0.25),
        q(&mut sorted, 0.5),
        q(&mut sorted, 0.75),
    );
    let (lo, hi) = (q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1));
    let low = sorted
        .iter()
        .copied()
        .filter(|x| *x >= lo)
        .fold(f64::INFINITY, f64::min);
    let high = sorted
        .iter()
        .copied()
        .filter(|x| *x <= hi)
        .fold(f64::NEG_INFINITY, f64::max);
    [q1, median, q3, low, high]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Pass,
    Warn,
    Fail,
    /// The value cannot be computed (one imputation, one iteration): said, not guessed.
    Undefined,
}

pub(crate) struct CheckResult {
    pub name: &'static str,
    pub column: String,
    pub value: Option<f64>,
    pub max: f64,
    pub severity: Severity,
    pub status: Status,
    pub message: String,
}

impl CheckResult {
    fn reported(&self) -> crate::checks::Reported {
        use crate::checks::{Severity as S, Status as V};
        crate::checks::Reported {
            name: format!("{}({})", self.name, self.column),
            severity: match self.severity {
                Severity::Warn => S::Warn,
                Severity::Fail => S::Fail,
            },
            status: match self.status {
                Status::Pass => V::Pass,
                Status::Warn | Status::Fail => V::Fail,
                Status::Undefined => V::Undefined,
            },
            value: self.value.map(finite).unwrap_or(Json::Null),
            expected: format!("< {}", self.max),
            detail: self.message.clone(),
        }
    }

    fn to_json(&self) -> Json {
        json!({
            "check": self.name,
            "column": self.column,
            "value": self.value.map(finite),
            "max": self.max,
            "severity": self.severity,
            "status": self.status,
            "message": self.message,
        })
    }
}

fn evaluate(diagnostics: &[ColumnDiagnostics], checks: &Checks) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for d in diagnostics {
        let rhat = match (d.rhat_mean, d.rhat_std) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (name, value, check, what, why) in [
            (
                "mean_spread",
                d.mean_spread,
                checks.mean_spread,
                "spread of the per-imputation means",
                "it needs two imputations and a mean other than 0",
            ),
            (
                "std_spread",
                d.std_spread,
                checks.std_spread,
                "spread of the per-imputation standard deviations",
                "it needs two imputations and a standard deviation other than 0",
            ),
            (
                "rhat",
                rhat,
                checks.rhat,
                "R̂ of the chains",
                "it needs two chains of at least two iterations that vary",
            ),
        ] {
            let (status, message) = match value {
                None => (
                    Status::Undefined,
                    format!("{}: {what} is undefined ({why})", d.name),
                ),
                Some(v) if v < check.max => (
                    Status::Pass,
                    format!("{}: {what} {v:.4} < {}", d.name, check.max),
                ),
                Some(v) => (
                    match check.severity {
                        Severity::Warn => Status::Warn,
                        Severity::Fail => Status::Fail,
                    },
                    format!("{}: {what} {v:.4} is not below {}", d.name, check.max),
                ),
            };
            out.push(CheckResult {
                name,
                column: d.name.clone(),
                value,
                max: check.max,
                severity: check.severity,
                status,
                message,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impute::{Impute, ImputeParams};

    /// Imputes a small generated table (`m` imputations, seed 1) and diagnoses it.
    fn diagnose(m: usize, params: Json) -> (Result<Json, StageError>, tempfile::TempDir) {
        let (report, dir) = diagnose_report(m, params);
        (report.map(|r| r.summary), dir)
    }

    fn diagnose_report(
        m: usize,
        params: Json,
    ) -> (Result<StageReport, StageError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("users.csv");
        let mut csv = String::from("id,y,x\n");
        for i in 0..60 {
            let x = (i % 10) as f64;
            if i % 3 == 0 {
                csv.push_str(&format!("{i},,{x}\n"));
            } else {
                csv.push_str(&format!("{i},{},{x}\n", 2.0 * x + ((i * 7) % 5) as f64));
            }
        }
        std::fs::write(&data, csv).unwrap();
        let imputed = dir.path().join("imputed");
        let impute: ImputeParams = serde_json::from_value(
            json!({"columns": ["y", "x"], "id": "id", "m": m, "iterations": 4, "seed": 1}),
        )
        .unwrap();
        Impute::run(
            &impute,
            &StageIo {
                inputs: vec![(None, data.clone())],
                outputs: vec![(Some("imputed".into()), imputed.clone())],
                ..StageIo::default()
            },
        )
        .unwrap();
        let params: DiagnoseParams = serde_json::from_value(params).unwrap();
        let io = StageIo {
            inputs: vec![
                (Some("imputed".into()), imputed),
                (Some("data".into()), data),
            ],
            outputs: vec![(Some("diagnostics".into()), dir.path().join("diagnostics"))],
            ..StageIo::default()
        };
        (Diagnose::run(&params, &io), dir)
    }

    /// Floats to 9 significant digits, so that the snapshot does not hang on the last bits of
    /// a platform's `sqrt` or `ln`.
    fn rounded(value: &Json) -> Json {
        match value {
            Json::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or_default();
                json!(format!("{f:.9e}").parse::<f64>().unwrap_or(f))
            }
            Json::Array(a) => Json::Array(a.iter().map(rounded).collect()),
            Json::Object(o) => {
                Json::Object(o.iter().map(|(k, v)| (k.clone(), rounded(v))).collect())
            }
            other => other.clone(),
        }
    }

    #[test]
    fn diagnostics_of_a_fixed_seed_imputation() {
        let (report, dir) = diagnose(3, json!({}));
        let report = report.unwrap();
        let written: Json = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("diagnostics/diagnostics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rounded(&written), rounded(&report));
        insta::assert_json_snapshot!(rounded(&report));
    }

    #[test]
    fn plots_are_pngs_and_svgs_and_the_report_stands_alone() {
        let (report, dir) = diagnose(3, json!({"range": {"y": [0, 25]}}));
        report.unwrap();
        let out = dir.path().join("diagnostics");
        for kind in ["density", "density_all", "trace", "box"] {
            let png = std::fs::File::open(out.join(format!("plots/y_{kind}.png"))).unwrap();
            let mut reader = png::Decoder::new(std::io::BufReader::new(png))
                .read_info()
                .unwrap();
            let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
            let frame = reader.next_frame(&mut buffer).unwrap();
            assert_eq!((frame.width, frame.height), plots::SIZE);
            // Not a blank canvas: the text and lines are drawn.
            assert!(buffer.iter().filter(|b| **b < 128).count() > 1000, "{kind}");
            let svg = std::fs::read_to_string(out.join(format!("plots/y_{kind}.svg"))).unwrap();
            roxmltree::Document::parse(&svg).unwrap();
        }
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        let document = roxmltree::Document::parse_with_options(
            &html,
            roxmltree::ParsingOptions {
                allow_dtd: true,
                ..Default::default()
            },
        )
        .unwrap();
        let images: Vec<_> = document
            .descendants()
            .filter(|n| n.has_tag_name("img"))
            .collect();
        assert_eq!(images.len(), 4);
        for image in &images {
            assert!(image
                .attribute("src")
                .unwrap()
                .starts_with("data:image/png;base64,"));
        }
        for node in document.descendants() {
            for attribute in node.attributes() {
                assert!(
                    !attribute.value().contains("://"),
                    "an external reference: {}",
                    attribute.value()
                );
            }
        }
        let rows: Vec<_> = document
            .descendants()
            .filter(|n| n.has_tag_name("tr") && n.attribute("class").is_some())
            .collect();
        assert_eq!(rows.len(), 3, "one row per check");
    }

    /// One imputation: spreads, R̂ and the pooled mean are undefined, said so, and null in JSON.
    #[test]
    fn a_single_imputation_leaves_the_checks_undefined() {
        let (report, dir) = diagnose(1, json!({}));
        let report = report.unwrap();
        assert_eq!(report["passed"], true);
        for check in report["checks"].as_array().unwrap() {
            assert_eq!(check["status"], "undefined", "{check}");
            assert_eq!(check["value"], Json::Null);
        }
        assert_eq!(report["columns"]["y"]["mean_spread"], Json::Null);
        assert_eq!(report["columns"]["y"]["pooled_mean"], Json::Null);
        let text =
            std::fs::read_to_string(dir.path().join("diagnostics/diagnostics.json")).unwrap();
        assert!(!text.contains("NaN"));
    }

    /// A check that misses is reported with its severity, for the orchestrator to fail the stage
    /// (`fail`, keeping this report in quarantine) or warn (`warn`).
    #[test]
    fn missed_checks_are_reported_with_their_severity() {
        use crate::checks::{Severity as S, Status as V};
        for (severity, expected) in [("fail", S::Fail), ("warn", S::Warn)] {
            let (report, dir) = diagnose_report(
                3,
                json!({"checks": {"mean_spread": {"max": 0.0, "severity": severity}}}),
            );
            let report = report.unwrap();
            let missed = &report.checks[0];
            assert_eq!(missed.name, "mean_spread(y)");
            assert_eq!((missed.severity, missed.status), (expected, V::Fail));
            assert_eq!(missed.expected, "< 0");
            assert!(
                missed
                    .detail
                    .starts_with("y: spread of the per-imputation means "),
                "{}",
                missed.detail
            );
            assert_eq!(report.summary["checks"][0]["status"], severity);
            assert_eq!(report.summary["passed"], severity == "warn");
            // The report was written either way, to be committed or kept in quarantine.
            assert!(dir.path().join("diagnostics/report.html").is_file());
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        }
    }

    #[test]
    fn params_that_do_not_fit_name_the_param() {
        let (report, _dir) = diagnose(2, json!({"columns": ["x"]}));
        let error = report.unwrap_err();
        assert_eq!(error.param.as_deref(), Some("/columns/0"));
        assert_eq!(
            error.message,
            "column `x` (param `columns[0]`) was not imputed; the imputed columns are: y"
        );
        let (report, _dir) = diagnose(2, json!({"range": {"z": [0, 1]}}));
        assert_eq!(report.unwrap_err().param.as_deref(), Some("/range/z"));
    }

    /// A `range` narrower than the data: the plots widen to hold every value, mark the
    /// configured range, and the report and a warning count what lies outside it, exactly.
    #[test]
    fn a_narrow_range_never_hides_values() {
        let (report, dir) = diagnose_report(3, json!({"range": {"y": [0, 10]}}));
        let report = report.unwrap();
        let summary = &report.summary["columns"]["y"]["plot_range"];
        // Counted here from the files the stages wrote.
        let data = std::fs::read_to_string(dir.path().join("users.csv")).unwrap();
        let observed: Vec<f64> = data
            .lines()
            .skip(1)
            .filter_map(|l| l.split(',').nth(1)?.parse().ok())
            .collect();
        let observed_outside = observed.iter().filter(|v| **v > 10.0).count();
        assert!(observed_outside > 0);
        assert_eq!(summary["observed_outside"], observed_outside);
        let imputed_outside = summary["imputed_outside"].as_u64().unwrap();
        assert_eq!(
            summary["imputed"],
            3 * 20,
            "20 missing values, 3 imputations"
        );
        assert!(imputed_outside > 0);
        let max = observed.iter().copied().fold(0.0, f64::max);
        assert!(summary["shown"][1].as_f64().unwrap() >= max);
        assert_eq!(summary["configured"], json!([0.0, 10.0]));
        assert_eq!(
            report.warnings,
            [format!(
                "`y`: {imputed_outside} of 60 imputed values and {observed_outside} of 40 observed lie outside the configured `range` [0, 10]; the plots show [0, {}] to hold them",
                plots::tick(summary["shown"][1].as_f64().unwrap())
            )]
        );
        let out = dir.path().join("diagnostics");
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert!(html.contains("dashed lines mark the configured range"));
        let svg = std::fs::read_to_string(out.join("plots/y_density.svg")).unwrap();
        assert!(svg.contains("configured range"));
        // Whole-number data ticks as whole numbers (`5`, never `5.0`).
        let document = roxmltree::Document::parse(&svg).unwrap();
        let numbers: Vec<&str> = document
            .descendants()
            .filter_map(|n| n.text())
            .map(str::trim)
            .filter(|t| t.parse::<f64>().is_ok())
            .collect();
        assert!(numbers.len() >= 5, "{numbers:?}");
        assert!(numbers.iter().all(|t| !t.ends_with(".0")), "{numbers:?}");
    }

    /// Legends sit in a column of their own, right of every plot's area; the box plot starts
    /// with the observed values' box.
    #[test]
    fn legends_beside_the_data_and_an_observed_box_first() {
        let (report, dir) = diagnose(3, json!({}));
        report.unwrap();
        let plots = dir.path().join("diagnostics/plots");
        let plot_width = (plots::SIZE.0 - 150) as f64;
        for (kind, label) in [("density", "imputation 2"), ("trace", "chain 1")] {
            let svg = std::fs::read_to_string(plots.join(format!("y_{kind}.svg"))).unwrap();
            let document = roxmltree::Document::parse(&svg).unwrap();
            let text = document
                .descendants()
                .find(|n| {
                    n.is_element()
                        && n.tag_name().name() == "text"
                        && n.text().map(str::trim) == Some(label)
                })
                .unwrap_or_else(|| {
                    let texts: Vec<_> = document.descendants().filter_map(|n| n.text()).collect();
                    panic!("{kind}: no legend entry `{label}` in {texts:?}")
                });
            let x: f64 = text.attribute("x").unwrap().parse().unwrap();
            assert!(x >= plot_width, "{kind}: `{label}` at x = {x}");
        }
        let svg = std::fs::read_to_string(plots.join("y_box.svg")).unwrap();
        let document = roxmltree::Document::parse(&svg).unwrap();
        let labels: Vec<&str> = document
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == "text")
            .filter_map(|n| n.text())
            .map(str::trim)
            .filter(|t| *t == "observed" || t.len() == 1)
            .collect();
        assert!(
            labels.windows(4).any(|w| w == ["observed", "0", "1", "2"]),
            "x labels: the observed box, then imputations 0 to 2: {labels:?}"
        );
    }

    #[test]
    fn ticks_read_as_people_write_numbers() {
        assert_eq!(plots::tick(5.0), "5");
        assert_eq!(plots::tick(-2.0), "-2");
        assert_eq!(plots::tick(2.5), "2.5");
        assert_eq!(plots::tick(0.1 + 0.2), "0.3");
        assert_eq!(plots::tick(1234.56789), "1234.5679");
    }
}
