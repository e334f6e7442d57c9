//! Data checks on a table a stage wrote: what each check measures, and whether it passes.
//!
//! The orchestrator parses `checks:` from the pipeline file into [`Check`]s and calls
//! [`evaluate`] on a stage's staged output before committing it, with the output committed at the
//! same place (if any) as the baseline of `change` checks. A table is read once for all its
//! checks, and only the columns they name (Parquet); a `rows` check alone reads only the Parquet
//! footer.
//!
//! Missing values: a null, or a NaN in a float column, counts as missing (as pandas' `isna`),
//! for `not_null` and `null_fraction`; `mean` and `range` look at the other values only.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use polars::prelude::*;
use serde_json::{json, Value as Json};

use crate::io::table::{is_csv, read_parquet, read_table_inferred};

pub mod spark;

/// One check on one table.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// The table has at least `min` and at most `max` rows.
    Rows { min: Option<u64>, max: Option<u64> },
    /// `metric` moved by at most `max_pct` percent from its value on the baseline: the output
    /// committed at the same place, or the previous partition's (`against`).
    Change {
        metric: Metric,
        max_pct: f64,
        against: Against,
    },
    /// None of these columns has a missing value.
    NotNull(Vec<String>),
    /// These columns together identify a row: no two rows share their values.
    Unique(Vec<String>),
    /// Every present value of each column lies in `[lo, hi]` (an absent bound is open).
    Range(Vec<(String, Option<f64>, Option<f64>)>),
    /// A polars SQL query over the table (called `self`) whose every value is `true`.
    Sql(String),
}

/// What a `change` check compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Against {
    /// The output committed at the same place (the previous run's).
    #[default]
    Committed,
    /// The same output of the previous partition, in partition order (month over month).
    Previous,
}

impl Against {
    /// The value in the pipeline file.
    pub fn as_str(self) -> &'static str {
        match self {
            Against::Committed => "committed",
            Against::Previous => "previous",
        }
    }
}

/// The tables `change` checks compare with.
#[derive(Debug, Clone, Default)]
pub struct Baselines<'a> {
    /// `against: committed`: the output committed at the same place, if any.
    pub committed: Option<&'a Path>,
    /// `against: previous`: the previous partition's output, or why there is none.
    pub previous: Previous<'a>,
}

/// The previous partition's output, for `against: previous`.
#[derive(Debug, Clone)]
pub enum Previous<'a> {
    /// Its committed table, `then` and `now` the two partitions' keys (`2017-04`, `2017-05`).
    Table {
        path: &'a Path,
        then: String,
        now: String,
    },
    /// Why there is no baseline: `2017-04 has not run`.
    Missing(String),
}

impl Default for Previous<'_> {
    fn default() -> Self {
        Previous::Missing("the stage is not partitioned".to_owned())
    }
}

/// What a `change` check compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metric {
    Rows,
    Mean(String),
    NullFraction(String),
}

impl std::str::FromStr for Metric {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "rows" {
            return Ok(Metric::Rows);
        }
        let call = |name: &str| {
            text.strip_prefix(name)
                .map(str::trim_start)
                .and_then(|rest| rest.strip_prefix('('))
                .and_then(|rest| rest.strip_suffix(')'))
                .map(|column| column.trim().to_owned())
        };
        match (call("mean"), call("null_fraction")) {
            (Some(column), _) if !column.is_empty() => Ok(Metric::Mean(column)),
            (_, Some(column)) if !column.is_empty() => Ok(Metric::NullFraction(column)),
            _ => Err(format!(
                "unknown metric `{text}`: expected `rows`, `mean(COLUMN)` or `null_fraction(COLUMN)`"
            )),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::Rows => write!(f, "rows"),
            Metric::Mean(column) => write!(f, "mean({column})"),
            Metric::NullFraction(column) => write!(f, "null_fraction({column})"),
        }
    }
}

impl Check {
    /// The check's key in the pipeline file.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Rows { .. } => "rows",
            Check::Change { .. } => "change",
            Check::NotNull(_) => "not_null",
            Check::Unique(_) => "unique",
            Check::Range(_) => "range",
            Check::Sql(_) => "sql",
        }
    }

    /// The columns the check names (a `sql` check's are not known without running it).
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Check::Rows { .. } | Check::Sql(_) => Vec::new(),
            Check::Change { metric, .. } => match metric {
                Metric::Rows => Vec::new(),
                Metric::Mean(c) | Metric::NullFraction(c) => vec![c.as_str()],
            },
            Check::NotNull(columns) | Check::Unique(columns) => {
                columns.iter().map(String::as_str).collect()
            }
            Check::Range(ranges) => ranges.iter().map(|(c, _, _)| c.as_str()).collect(),
        }
    }

    /// The check as written, in canonical JSON (for fingerprints and records).
    pub fn to_json(&self) -> Json {
        match self {
            Check::Rows { min, max } => json!({"rows": {"min": min, "max": max}}),
            // `against: committed` is left out: fingerprints of checks written before it existed
            // stay as they were.
            Check::Change {
                metric,
                max_pct,
                against: Against::Committed,
            } => json!({"change": {"metric": metric.to_string(), "max_pct": max_pct}}),
            Check::Change {
                metric,
                max_pct,
                against,
            } => json!({"change": {
                "metric": metric.to_string(),
                "max_pct": max_pct,
                "against": against.as_str(),
            }}),
            Check::NotNull(columns) => json!({ "not_null": columns }),
            Check::Unique(columns) => json!({ "unique": columns }),
            Check::Range(ranges) => {
                let map: serde_json::Map<String, Json> = ranges
                    .iter()
                    .map(|(c, lo, hi)| (c.clone(), json!([lo, hi])))
                    .collect();
                json!({ "range": map })
            }
            Check::Sql(query) => json!({ "sql": query }),
        }
    }

    /// A short name for tables and messages: `rows`, `change(rows)`, `not_null(a, b)`…
    pub fn label(&self) -> String {
        match self {
            Check::Rows { .. } | Check::Sql(_) => self.kind().to_owned(),
            Check::Change { metric, .. } => format!("change({metric})"),
            Check::NotNull(columns) | Check::Unique(columns) => {
                format!("{}({})", self.kind(), columns.join(", "))
            }
            Check::Range(ranges) => format!(
                "range({})",
                ranges
                    .iter()
                    .map(|(c, _, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// What passing means, in words: `≥ 1000`, `≤ 20%`, `no nulls`…
    pub fn expected(&self) -> String {
        match self {
            Check::Rows { min, max } => match (min, max) {
                (Some(min), Some(max)) => format!("between {min} and {max}"),
                (Some(min), None) => format!("≥ {min}"),
                (None, Some(max)) => format!("≤ {max}"),
                (None, None) => "any".to_owned(),
            },
            Check::Change { max_pct, .. } => format!("≤ {}%", number(*max_pct)),
            Check::NotNull(_) => "no missing values".to_owned(),
            Check::Unique(_) => "no repeated keys".to_owned(),
            Check::Range(ranges) => ranges
                .iter()
                .map(|(_, lo, hi)| interval(*lo, *hi))
                .collect::<Vec<_>>()
                .join(", "),
            Check::Sql(_) => "every value true".to_owned(),
        }
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    /// The check could not be evaluated (a missing column, a SQL error…).
    Error,
    /// The checked quantity does not exist for this data (R̂ of a single imputation): said, not
    /// guessed, and never a reason to fail.
    Undefined,
}

/// What a failing check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Print and record; the outputs are committed.
    Warn,
    /// Fail the stage: its outputs are quarantined, not committed.
    Fail,
}

/// A check a built-in stage evaluated itself (the `diagnose` stage's thresholds), reported to
/// the orchestrator, which treats it as one of the stage's `checks:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    pub name: String,
    pub severity: Severity,
    pub status: Status,
    pub value: Json,
    /// What passing means: `< 0.05`…
    pub expected: String,
    pub detail: String,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub status: Status,
    /// The measured value (`null` when undefined or not measured).
    pub value: Json,
    /// One line: what was measured, and why it passed or failed.
    pub detail: String,
}

impl Verdict {
    fn pass(value: Json, detail: impl Into<String>) -> Self {
        Verdict {
            status: Status::Pass,
            value,
            detail: detail.into(),
        }
    }

    fn judged(passed: bool, value: Json, detail: impl Into<String>) -> Self {
        Verdict {
            status: if passed { Status::Pass } else { Status::Fail },
            value,
            detail: detail.into(),
        }
    }

    fn error(detail: impl Into<String>) -> Self {
        Verdict {
            status: Status::Error,
            value: Json::Null,
            detail: detail.into(),
        }
    }
}

/// Evaluates `checks` on the table at `table`; `change` checks compare with `baselines`. One
/// verdict per check, in order.
pub fn evaluate(checks: &[Check], table: &Path, baselines: &Baselines) -> Vec<Verdict> {
    let loaded = match Loaded::read(table, checks) {
        Ok(loaded) => loaded,
        Err(message) => return checks.iter().map(|_| Verdict::error(&message)).collect(),
    };
    let mut here = Here {
        table: loaded,
        path: table,
    };
    judge_all(checks, &mut here, baselines, &mut |baseline, columns| {
        let table = Loaded::read_columns(baseline, false, columns)?;
        Ok(Box::new(Here {
            table,
            path: baseline,
        }))
    })
}

/// Opens a baseline table (a committed output, a previous partition's) to measure the columns
/// given on it.
pub(crate) type OpenBaseline<'a> =
    dyn FnMut(&'a Path, &BTreeSet<String>) -> Result<Box<dyn Measures + 'a>, String> + 'a;

/// Every check judged on what `table` measures.
pub(crate) fn judge_all<'a>(
    checks: &[Check],
    table: &mut dyn Measures,
    baselines: &Baselines<'a>,
    open: &mut OpenBaseline<'a>,
) -> Vec<Verdict> {
    checks
        .iter()
        .map(|check| match check_one(check, table, baselines, open) {
            Ok(verdict) => verdict,
            Err(message) => Verdict::error(message),
        })
        .collect()
}

/// What checks measure of one table, wherever it is: read here, or on a Spark cluster
/// (`spark`). Both answer the same, floats within a few ulps (a mean adds in another order).
pub(crate) trait Measures {
    /// How many rows.
    fn rows(&mut self) -> Result<u64, String>;
    /// Missing values of `column`: nulls, and NaNs in a float column.
    fn missing(&mut self, column: &str) -> Result<u64, String>;
    /// The mean of `column`'s values, NaN left out; NaN when there are none.
    fn mean(&mut self, column: &str) -> Result<f64, String>;
    /// `column`'s values (NaN left out) outside `[lo, hi]`, and their min and max (∞ and -∞
    /// when there are none).
    fn range(
        &mut self,
        column: &str,
        lo: Option<f64>,
        hi: Option<f64>,
    ) -> Result<(u64, f64, f64), String>;
    /// The rows that repeat an earlier row on `columns` (nulls equal nulls, NaN equals NaN):
    /// how many, and the first of them: its position (from 0) and its values (`c=v`).
    fn repeats(&mut self, columns: &[String]) -> Result<Repeats, String>;
    /// The values of a SQL query over the table (`self`), all booleans: how many are true,
    /// false and null.
    fn booleans(&mut self, query: &str) -> Result<(u64, u64, u64), String>;
}

/// How many rows repeat an earlier one, and the first of them: its position (from 0) and its
/// values shown as `c=v`.
pub(crate) type Repeats = (u64, Option<(u64, Vec<String>)>);

/// A table read here, for its checks.
struct Here<'a> {
    table: Loaded,
    path: &'a Path,
}

impl Measures for Here<'_> {
    fn rows(&mut self) -> Result<u64, String> {
        Ok(self.table.rows as u64)
    }

    fn missing(&mut self, column: &str) -> Result<u64, String> {
        missing_count(self.table.column(column, self.path)?).map(|n| n as u64)
    }

    fn mean(&mut self, column: &str) -> Result<f64, String> {
        let values = numbers(self.table.column(column, self.path)?, "mean")?;
        let (mut sum, mut n) = (0.0, 0u64);
        for v in values.iter().flatten().filter(|v| !v.is_nan()) {
            sum += v;
            n += 1;
        }
        Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
    }

    fn range(
        &mut self,
        column: &str,
        lo: Option<f64>,
        hi: Option<f64>,
    ) -> Result<(u64, f64, f64), String> {
        let values = numbers(self.table.column(column, self.path)?, "range")?;
        let (mut outside, mut min, mut max) = (0u64, f64::INFINITY, f64::NEG_INFINITY);
        for v in values.iter().flatten().filter(|v| !v.is_nan()) {
            if lo.is_some_and(|lo| v < lo) || hi.is_some_and(|hi| v > hi) {
                outside += 1;
            }
            min = min.min(v);
            max = max.max(v);
        }
        Ok((outside, min, max))
    }

    fn repeats(&mut self, columns: &[String]) -> Result<Repeats, String> {
        for name in columns {
            self.table.column(name, self.path)?;
        }
        let Some(df) = &self.table.df else {
            return Err("internal error: table not read".to_owned());
        };
        let names: Vec<PlSmallStr> = columns.iter().map(|c| c.as_str().into()).collect();
        let alive = BooleanChunked::full("alive".into(), true, df.height());
        let repeats = crate::io::rows::repeated_rows(df, &names, &alive)
            .map_err(|e| format!("cannot compare rows: {e}"))?;
        let first = repeats.first().map(|&first| {
            let example = columns
                .iter()
                .map(
                    |c| match df.column(c).and_then(|col| col.get(first as usize)) {
                        Ok(v) => format!("{c}={}", any_value(&v)),
                        Err(_) => format!("{c}=?"),
                    },
                )
                .collect();
            (first as u64, example)
        });
        Ok((repeats.len() as u64, first))
    }

    fn booleans(&mut self, query: &str) -> Result<(u64, u64, u64), String> {
        let Some(df) = &self.table.df else {
            return Err("internal error: table not read".to_owned());
        };
        let result = self_query(df, query)?;
        let (mut true_count, mut false_count, mut null_count) = (0u64, 0u64, 0u64);
        for column in result.columns() {
            let bools = column
                .bool()
                .map_err(|_| not_booleans(column.name(), column.dtype()))?;
            for value in bools.iter() {
                match value {
                    Some(true) => true_count += 1,
                    Some(false) => false_count += 1,
                    None => null_count += 1,
                }
            }
        }
        Ok((true_count, false_count, null_count))
    }
}

/// A polars SQL query over `df` as the table `self`.
fn self_query(df: &DataFrame, query: &str) -> Result<DataFrame, String> {
    let mut context = polars::sql::SQLContext::new();
    context.register("self", df.clone().lazy());
    context
        .execute(query)
        .and_then(|lf| lf.collect())
        .map_err(|e| format!("the query failed: {e}"))
}

/// A `sql` check's query that gives a column of another type.
pub(crate) fn not_booleans(column: &str, dtype: impl fmt::Display) -> String {
    format!("the query must return booleans, but column `{column}` is {dtype}")
}

/// A table read for its checks: the columns they need, and the row count.
struct Loaded {
    rows: usize,
    df: Option<DataFrame>,
}

impl Loaded {
    fn read(path: &Path, checks: &[Check]) -> Result<Self, String> {
        let mut columns: BTreeSet<String> = BTreeSet::new();
        let mut everything = false;
        for check in checks {
            match check {
                // The baseline is read separately; the new value needs the column here.
                Check::Sql(_) => everything = true,
                other => columns.extend(other.columns().into_iter().map(str::to_owned)),
            }
        }
        Self::read_columns(path, everything, &columns)
    }

    fn read_columns(
        path: &Path,
        everything: bool,
        columns: &BTreeSet<String>,
    ) -> Result<Self, String> {
        if !is_csv(path) && !everything && columns.is_empty() {
            return Ok(Loaded {
                rows: parquet_rows(path)?,
                df: None,
            });
        }
        let df = if is_csv(path) {
            read_table_inferred(path)
        } else if everything {
            read_parquet(path, None)
        } else {
            let wanted: Vec<String> = columns.iter().cloned().collect();
            read_parquet(path, Some(&wanted))
        }
        .map_err(|e| e.message)?;
        Ok(Loaded {
            rows: df.height(),
            df: Some(df),
        })
    }

    fn column(&self, name: &str, path: &Path) -> Result<&Column, String> {
        let Some(df) = &self.df else {
            return Err(format!("internal error: `{}` was not read", path.display()));
        };
        df.column(name).map_err(|_| {
            let present: Vec<String> = df
                .get_column_names()
                .iter()
                .map(|c| format!("`{}`", crate::safe::escape(c)))
                .collect();
            format!(
                "column `{}` is not in `{}`; its columns are {}",
                crate::safe::escape(name),
                crate::safe::escape(&path.to_string_lossy()),
                present.join(", ")
            )
        })
    }
}

fn parquet_rows(path: &Path) -> Result<usize, String> {
    let file = crate::io::table::open(path).map_err(|e| e.message)?;
    ParquetReader::new(file)
        .num_rows()
        .map_err(|e| format!("cannot read Parquet file `{}`: {e}", path.display()))
}

fn check_one<'a>(
    check: &Check,
    table: &mut dyn Measures,
    baselines: &Baselines<'a>,
    open: &mut OpenBaseline<'a>,
) -> Result<Verdict, String> {
    match check {
        Check::Rows { min, max } => {
            let rows = table.rows()?;
            let passed = min.is_none_or(|m| rows >= m) && max.is_none_or(|m| rows <= m);
            Ok(Verdict::judged(
                passed,
                json!(rows),
                format!(
                    "{}, expected {}",
                    plural(rows, "row", "rows"),
                    check.expected()
                ),
            ))
        }
        Check::Change {
            metric,
            max_pct,
            against,
        } => {
            let now = measure(metric, table)?;
            // The baseline, and the two tables' names when they are partitions.
            let (baseline, names) = match (against, &baselines.previous) {
                (Against::Committed, _) => (
                    baselines
                        .committed
                        .ok_or_else(|| "no committed output to compare with".to_owned()),
                    None,
                ),
                (Against::Previous, Previous::Table { path, then, now }) => {
                    (Ok(*path), Some((then.as_str(), now.as_str())))
                }
                (Against::Previous, Previous::Missing(why)) => (Err(why.clone()), None),
            };
            let baseline = match baseline {
                Ok(baseline) => baseline,
                Err(why) => {
                    return Ok(Verdict::pass(
                        json!({"now": finite(now), "baseline": null, "change_pct": null}),
                        format!("no baseline: {why} ({metric} is {})", shown(now)),
                    ))
                }
            };
            let mut columns = BTreeSet::new();
            columns.extend(check.columns().into_iter().map(str::to_owned));
            let before = open(baseline, &columns)
                .and_then(|mut loaded| measure(metric, &mut *loaded))
                .map_err(|e| format!("cannot measure the baseline: {e}"))?;
            let value = |pct: Option<f64>| json!({"now": finite(now), "baseline": finite(before), "change_pct": pct.and_then(|p| finite(p).as_f64())});
            // `3 → 2` or, between partitions, `3 in 2017-04 → 2 in 2017-05`.
            let (was, is) = match names {
                Some((then, now_key)) => (
                    format!("{} in {then}", shown(before)),
                    format!("{} in {now_key}", shown(now)),
                ),
                None => (shown(before), shown(now)),
            };
            let (Some(a), Some(b)) = (defined(before), defined(now)) else {
                let baseline_name = match names {
                    Some((then, _)) => format!("in {then}"),
                    None => "in the baseline".to_owned(),
                };
                return Ok(match (defined(before), defined(now)) {
                    (None, None) => Verdict::pass(
                        value(None),
                        format!("{metric} is undefined now and {baseline_name}"),
                    ),
                    (None, Some(_)) => Verdict::pass(
                        value(None),
                        match names {
                            Some((then, _)) => {
                                format!("no baseline: {metric} is undefined in {then} (now {is})")
                            }
                            None => format!(
                                "no baseline: {metric} of the committed output is undefined (now {})",
                                shown(now)
                            ),
                        },
                    ),
                    _ => Verdict::judged(
                        false,
                        value(None),
                        format!(
                            "{metric} is undefined now, was {} {baseline_name}",
                            shown(before)
                        ),
                    ),
                });
            };
            let pct = if a == 0.0 {
                if b == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (b - a).abs() / a.abs() * 100.0
            };
            let moved = if pct.is_finite() {
                format!("{}%", number((pct * 100.0).round() / 100.0))
            } else {
                "∞% (from 0)".to_owned()
            };
            Ok(Verdict::judged(
                pct <= *max_pct,
                value(Some(pct)),
                format!(
                    "{metric} changed by {moved}: {was} → {is}, expected {}",
                    check.expected()
                ),
            ))
        }
        Check::NotNull(columns) => {
            let mut counts = serde_json::Map::new();
            let mut failing = Vec::new();
            for name in columns {
                let missing = table.missing(name)?;
                if missing > 0 {
                    failing.push(format!("`{name}` has {} missing", grouped(missing)));
                }
                counts.insert(name.clone(), json!(missing));
            }
            let rows = table.rows()?;
            let detail = if failing.is_empty() {
                format!("no missing values in {}", plural(rows, "row", "rows"))
            } else {
                format!(
                    "{} (of {})",
                    failing.join(", "),
                    plural(rows, "row", "rows")
                )
            };
            Ok(Verdict::judged(
                failing.is_empty(),
                Json::Object(counts),
                detail,
            ))
        }
        Check::Unique(columns) => {
            let (repeats, first) = table.repeats(columns)?;
            let key = if columns.len() == 1 {
                format!("`{}`", columns[0])
            } else {
                format!("({})", columns.join(", "))
            };
            let detail = match first {
                None => format!(
                    "every {key} is unique in {}",
                    plural(table.rows()?, "row", "rows")
                ),
                Some((first, example)) => format!(
                    "{} an earlier {key}, first at row {} ({})",
                    plural(repeats, "row repeats", "rows repeat"),
                    first + 1,
                    example.join(", ")
                ),
            };
            Ok(Verdict::judged(repeats == 0, json!(repeats), detail))
        }
        Check::Range(ranges) => {
            let mut value = serde_json::Map::new();
            let mut failing = Vec::new();
            for (name, lo, hi) in ranges {
                let (outside, min, max) = table.range(name, *lo, *hi)?;
                value.insert(
                    name.clone(),
                    json!({"outside": outside, "min": finite(min), "max": finite(max)}),
                );
                if outside > 0 {
                    failing.push(format!(
                        "`{name}` has {} outside {} (min {}, max {})",
                        plural(outside, "value", "values"),
                        interval(*lo, *hi),
                        number(min),
                        number(max)
                    ));
                }
            }
            let detail = if failing.is_empty() {
                "every value within its range".to_owned()
            } else {
                failing.join("; ")
            };
            Ok(Verdict::judged(
                failing.is_empty(),
                Json::Object(value),
                detail,
            ))
        }
        Check::Sql(query) => {
            let (true_count, false_count, null_count) = table.booleans(query)?;
            Ok(sql_verdict(true_count, false_count, null_count))
        }
    }
}

fn sql_verdict(true_count: u64, false_count: u64, null_count: u64) -> Verdict {
    let value = json!({"true": true_count, "false": false_count, "null": null_count});
    let detail = match (false_count, null_count, true_count) {
        (0, 0, 0) => "the query returned no rows".to_owned(),
        (0, 0, 1) => "the query returned true".to_owned(),
        (0, 0, n) => format!("all {} values true", grouped(n)),
        (1, 0, 0) => "the query returned false".to_owned(),
        (0, 1, 0) => "the query returned null".to_owned(),
        (f, n, t) => format!(
            "{} false, {} null, {} true",
            grouped(f),
            grouped(n),
            grouped(t)
        ),
    };
    Verdict::judged(false_count == 0 && null_count == 0, value, detail)
}

/// A value a stage's `metrics:` tracks on one of its outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Measure {
    /// `rows`, `mean(COLUMN)`, `null_fraction(COLUMN)` of a table.
    Table(Metric),
    /// A polars SQL query over the table (`self`) giving one number: one row, one column.
    Sql(String),
    /// A JSON pointer into a JSON file (a stage's summary): a number there.
    Json(String),
}

impl Measure {
    /// As written in the pipeline file, in canonical JSON.
    pub fn to_json(&self) -> Json {
        match self {
            Measure::Table(metric) => json!(metric.to_string()),
            Measure::Sql(query) => json!({ "sql": query }),
            Measure::Json(pointer) => json!({ "json": pointer }),
        }
    }
}

/// Measures `measure` on the file at `path`: a number, or `None` when it is undefined there
/// (the mean of no values, a null from the query or the JSON).
pub fn measure_value(what: &Measure, path: &Path) -> Result<Option<f64>, String> {
    let defined = |v: f64| (!v.is_nan()).then_some(v);
    match what {
        Measure::Table(metric) => {
            let columns: BTreeSet<String> = match metric {
                Metric::Rows => BTreeSet::new(),
                Metric::Mean(c) | Metric::NullFraction(c) => BTreeSet::from([c.clone()]),
            };
            let table = Loaded::read_columns(path, false, &columns)?;
            measure(metric, &mut Here { table, path }).map(defined)
        }
        Measure::Sql(query) => {
            let table = Loaded::read_columns(path, true, &BTreeSet::new())?;
            let Some(df) = &table.df else {
                return Err("internal error: table not read".to_owned());
            };
            let result = self_query(df, query)?;
            if result.height() != 1 || result.width() != 1 {
                return Err(format!(
                    "the query must give one value (one row, one column), it gave {} × {}",
                    plural(result.height() as u64, "row", "rows"),
                    plural(result.width() as u64, "column", "columns")
                ));
            }
            let column = &result.columns()[0];
            let values = numbers(column, "a metric")?;
            Ok(values.get(0).and_then(defined))
        }
        Measure::Json(pointer) => {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            let value: Json = serde_json::from_slice(&bytes)
                .map_err(|e| format!("`{}` is not JSON: {e}", path.display()))?;
            match value.pointer(pointer) {
                None => Err(format!(
                    "`{}` has nothing at `{pointer}`",
                    crate::safe::escape(&path.to_string_lossy())
                )),
                Some(Json::Null) => Ok(None),
                Some(Json::Number(n)) => Ok(n.as_f64()),
                Some(Json::Bool(b)) => Ok(Some(f64::from(u8::from(*b)))),
                Some(other) => Err(format!(
                    "`{pointer}` is not a number but {}",
                    match other {
                        Json::String(_) => "a string",
                        Json::Array(_) => "a list",
                        _ => "a map",
                    }
                )),
            }
        }
    }
}

/// The metric's value (NaN when undefined: the mean of no values, the null fraction of no rows).
fn measure(metric: &Metric, table: &mut dyn Measures) -> Result<f64, String> {
    match metric {
        Metric::Rows => Ok(table.rows()? as f64),
        Metric::Mean(column) => table.mean(column),
        Metric::NullFraction(column) => {
            let missing = table.missing(column)?;
            let rows = table.rows()?;
            Ok(if rows == 0 {
                f64::NAN
            } else {
                missing as f64 / rows as f64
            })
        }
    }
}

/// Nulls, and NaNs in a float column.
fn missing_count(column: &Column) -> Result<usize, String> {
    if column.dtype().is_float() {
        let values = column.cast(&DataType::Float64).map_err(|e| e.to_string())?;
        let values = values.f64().map_err(|e| e.to_string())?;
        Ok(values.iter().filter(|v| v.is_none_or(f64::is_nan)).count())
    } else {
        Ok(column.null_count())
    }
}

/// A numeric (or boolean) column as float64.
fn numbers(column: &Column, check: &str) -> Result<Float64Chunked, String> {
    let dtype = column.dtype();
    if !(dtype.is_primitive_numeric() || dtype == &DataType::Boolean) {
        return Err(format!(
            "`{check}` needs a numeric column, but `{}` is {dtype}",
            column.name()
        ));
    }
    let cast = column.cast(&DataType::Float64).map_err(|e| e.to_string())?;
    cast.f64().cloned().map_err(|e| e.to_string())
}

fn defined(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

fn finite(value: f64) -> Json {
    crate::stats::finite(value)
}

/// A measured value in a message: whole numbers exactly (`3,430,925`), others to 6 digits.
pub fn shown(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
        let sign = if value < 0.0 { "-" } else { "" };
        format!("{sign}{}", grouped(value.abs() as u64))
    } else if value.is_finite() {
        number(round_to(value, 6))
    } else {
        "undefined".to_owned()
    }
}

/// Rounds to `digits` significant digits (for messages only).
fn round_to(value: f64, digits: i32) -> f64 {
    if value == 0.0 || !value.is_finite() {
        return value;
    }
    let scale = 10f64.powi(digits - 1 - value.abs().log10().floor() as i32);
    (value * scale).round() / scale
}

/// A number as a person writes it: `3`, `0.25`, `1e-7`.
fn number(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// `1 row`, `3,012 rows`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", grouped(n), if n == 1 { one } else { many })
}

/// `1234567` → `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn interval(lo: Option<f64>, hi: Option<f64>) -> String {
    let end = |v: Option<f64>, open: &str| v.map_or(open.to_owned(), number);
    format!("[{}, {}]", end(lo, "-∞"), end(hi, "∞"))
}

fn any_value(value: &AnyValue) -> String {
    match value {
        AnyValue::Null => "null".to_owned(),
        AnyValue::String(s) => format!("{s:?}"),
        AnyValue::StringOwned(s) => format!("{:?}", s.as_str()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(csv: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, csv).unwrap();
        (dir, path)
    }

    fn parquet(dir: &Path, name: &str, csv: &str) -> std::path::PathBuf {
        let source = dir.join(format!("{name}.csv"));
        std::fs::write(&source, csv).unwrap();
        let mut df = read_table_inferred(&source).unwrap();
        let path = dir.join(format!("{name}.parquet"));
        crate::io::table::write_table(&mut df, &path).unwrap();
        path
    }

    fn one(check: Check, path: &Path, baseline: Option<&Path>) -> Verdict {
        let baselines = Baselines {
            committed: baseline,
            ..Baselines::default()
        };
        evaluate(&[check], path, &baselines).remove(0)
    }

    const ORDERS: &str = "id,user,days,hour\n1,a,3.0,10\n2,a,,11\n3,b,7.0,23\n4,c,NaN,0\n";

    #[test]
    fn rows_passes_inside_its_bounds_and_fails_outside() {
        let (_dir, path) = table(ORDERS);
        let rows = |min, max| one(Check::Rows { min, max }, &path, None);
        assert_eq!(rows(Some(4), Some(4)).status, Status::Pass);
        assert_eq!(rows(Some(5), None).status, Status::Fail);
        assert_eq!(rows(None, Some(3)).status, Status::Fail);
        assert_eq!(rows(Some(5), None).detail, "4 rows, expected ≥ 5");
        assert_eq!(rows(Some(5), None).value, json!(4));
    }

    #[test]
    fn rows_of_a_parquet_file_come_from_its_footer() {
        let dir = tempfile::tempdir().unwrap();
        let path = parquet(dir.path(), "t", ORDERS);
        let verdict = one(
            Check::Rows {
                min: Some(1),
                max: None,
            },
            &path,
            None,
        );
        assert_eq!((verdict.status, verdict.value), (Status::Pass, json!(4)));
    }

    #[test]
    fn not_null_counts_nulls_and_nans() {
        let (_dir, path) = table(ORDERS);
        let verdict = one(
            Check::NotNull(vec!["id".into(), "days".into()]),
            &path,
            None,
        );
        assert_eq!(verdict.status, Status::Fail);
        assert_eq!(verdict.value, json!({"id": 0, "days": 2}));
        assert_eq!(verdict.detail, "`days` has 2 missing (of 4 rows)");
        let ok = one(Check::NotNull(vec!["id".into()]), &path, None);
        assert_eq!(ok.status, Status::Pass);
    }

    #[test]
    fn unique_treats_the_columns_as_one_key() {
        let (_dir, path) = table("a,b\n1,x\n1,y\n2,x\n1,x\n");
        let verdict = one(Check::Unique(vec!["a".into(), "b".into()]), &path, None);
        assert_eq!(verdict.status, Status::Fail);
        assert_eq!(verdict.value, json!(1));
        assert_eq!(
            verdict.detail,
            "1 row repeats an earlier (a, b), first at row 4 (a=1, b=\"x\")"
        );
        assert_eq!(
            one(Check::Unique(vec!["a".into()]), &path, None).value,
            json!(2)
        );
        let (_d, unique) = table("a,b\n1,x\n1,y\n2,x\n");
        assert_eq!(
            one(Check::Unique(vec!["a".into(), "b".into()]), &unique, None).status,
            Status::Pass
        );
    }

    #[test]
    fn range_ignores_missing_values_and_honours_open_ends() {
        let (_dir, path) = table(ORDERS);
        let check = |lo, hi| one(Check::Range(vec![("days".into(), lo, hi)]), &path, None);
        assert_eq!(check(Some(0.0), Some(30.0)).status, Status::Pass);
        let fail = check(Some(4.0), None);
        assert_eq!(fail.status, Status::Fail);
        assert_eq!(
            fail.detail,
            "`days` has 1 value outside [4, ∞] (min 3, max 7)"
        );
        assert_eq!(
            fail.value,
            json!({"days": {"outside": 1, "min": 3.0, "max": 7.0}})
        );
        let text = one(
            Check::Range(vec![("user".into(), None, Some(1.0))]),
            &path,
            None,
        );
        assert_eq!(text.status, Status::Error);
        assert_eq!(
            text.detail,
            "`range` needs a numeric column, but `user` is str"
        );
    }

    #[test]
    fn sql_passes_when_every_value_is_true() {
        let (_dir, path) = table(ORDERS);
        let sql = |q: &str| one(Check::Sql(q.into()), &path, None);
        assert_eq!(sql("SELECT count(*) = 4 FROM self").status, Status::Pass);
        assert_eq!(sql("SELECT hour <= 23 FROM self").status, Status::Pass);
        let fail = sql("SELECT hour < 23 FROM self");
        assert_eq!(
            (fail.status, fail.detail.as_str()),
            (Status::Fail, "1 false, 0 null, 3 true")
        );
        let null = sql("SELECT days > 0 FROM self");
        assert_eq!(null.status, Status::Fail, "a null is not a pass: {null:?}");
        let typed = sql("SELECT count(*) FROM self");
        assert_eq!(typed.status, Status::Error);
        assert!(
            typed
                .detail
                .starts_with("the query must return booleans, but column"),
            "{}",
            typed.detail
        );
        assert_eq!(sql("SELEC 1").status, Status::Error);
    }

    #[test]
    fn change_compares_with_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let before = parquet(dir.path(), "before", "x\n1\n2\n3\n4\n5\n");
        let after = parquet(dir.path(), "after", "x\n1\n2\n3\n4\n5\n6\n");
        let change = |metric: &str, max_pct: f64, baseline: Option<&Path>| {
            one(
                Check::Change {
                    metric: metric.parse().unwrap(),
                    max_pct,
                    against: Against::Committed,
                },
                &after,
                baseline,
            )
        };
        // 5 → 6 rows is +20%; the mean 3 → 3.5 is +16.67%.
        assert_eq!(change("rows", 20.0, Some(&before)).status, Status::Pass);
        let fail = change("rows", 19.9, Some(&before));
        assert_eq!(fail.status, Status::Fail);
        assert_eq!(fail.detail, "rows changed by 20%: 5 → 6, expected ≤ 19.9%");
        assert_eq!(
            fail.value,
            json!({"now": 6.0, "baseline": 5.0, "change_pct": 20.0})
        );
        let mean = change("mean(x)", 16.0, Some(&before));
        assert_eq!(mean.status, Status::Fail);
        assert_eq!(
            mean.detail,
            "mean(x) changed by 16.67%: 3 → 3.5, expected ≤ 16%"
        );
        // Counts are shown exactly, however large.
        assert_eq!(shown(3_430_925.0), "3,430,925");
        assert_eq!(shown(2.0 / 3.0), "0.666667");
        let first = change("rows", 1.0, None);
        assert_eq!(first.status, Status::Pass);
        assert!(first.detail.starts_with("no baseline"), "{}", first.detail);
    }

    #[test]
    fn change_against_the_previous_partition_names_both() {
        let dir = tempfile::tempdir().unwrap();
        let april = parquet(dir.path(), "april", "x\n1\n2\n3\n");
        let may = parquet(dir.path(), "may", "x\n1\n2\n");
        let check = Check::Change {
            metric: Metric::Rows,
            max_pct: 20.0,
            against: Against::Previous,
        };
        let committed = parquet(dir.path(), "committed", "x\n1\n2\n");
        let baselines = Baselines {
            // Not what `against: previous` reads: the same row count would pass.
            committed: Some(&committed),
            previous: Previous::Table {
                path: &april,
                then: "2017-04".into(),
                now: "2017-05".into(),
            },
        };
        let verdict = evaluate(std::slice::from_ref(&check), &may, &baselines).remove(0);
        assert_eq!(verdict.status, Status::Fail);
        assert_eq!(
            verdict.detail,
            "rows changed by 33.33%: 3 in 2017-04 → 2 in 2017-05, expected ≤ 20%"
        );
        let first = Baselines {
            committed: Some(&committed),
            previous: Previous::Missing("2017-04 has not run".into()),
        };
        let verdict = evaluate(std::slice::from_ref(&check), &may, &first).remove(0);
        assert_eq!(verdict.status, Status::Pass);
        assert_eq!(
            verdict.detail,
            "no baseline: 2017-04 has not run (rows is 2)"
        );
        // The default stays out of the check's JSON, so that older fingerprints hold.
        assert_eq!(
            check.to_json(),
            json!({"change": {"metric": "rows", "max_pct": 20.0, "against": "previous"}})
        );
        let committed_check = Check::Change {
            metric: Metric::Rows,
            max_pct: 20.0,
            against: Against::Committed,
        };
        assert_eq!(
            committed_check.to_json(),
            json!({"change": {"metric": "rows", "max_pct": 20.0}})
        );
    }

    #[test]
    fn change_from_zero_and_from_undefined() {
        let dir = tempfile::tempdir().unwrap();
        let empty = parquet(dir.path(), "empty", "x\n");
        let some = parquet(dir.path(), "some", "x\n1\n");
        let change = |table: &Path, baseline: &Path, metric: &str| {
            one(
                Check::Change {
                    metric: metric.parse().unwrap(),
                    max_pct: 50.0,
                    against: Against::Committed,
                },
                table,
                Some(baseline),
            )
        };
        let from_zero = change(&some, &empty, "rows");
        assert_eq!(from_zero.status, Status::Fail);
        assert_eq!(from_zero.value["change_pct"], Json::Null);
        assert_eq!(change(&empty, &empty, "rows").status, Status::Pass);
        // The null fraction of no rows is undefined: no baseline to compare with.
        assert_eq!(
            change(&some, &empty, "null_fraction(x)").status,
            Status::Pass
        );
        assert_eq!(
            change(&empty, &some, "null_fraction(x)").status,
            Status::Fail
        );
    }

    #[test]
    fn a_missing_column_is_an_error_naming_the_columns_there_are() {
        let (_dir, path) = table(ORDERS);
        let verdict = one(Check::NotNull(vec!["nope".into()]), &path, None);
        assert_eq!(verdict.status, Status::Error);
        assert_eq!(
            verdict.detail,
            format!(
                "column `nope` is not in `{}`; its columns are `id`, `user`, `days`, `hour`",
                path.display()
            )
        );
    }

    #[test]
    fn metrics_parse_and_print_back() {
        for text in ["rows", "mean(days)", "null_fraction(days)"] {
            assert_eq!(text.parse::<Metric>().unwrap().to_string(), text);
        }
        assert_eq!(
            "mean( days )".parse::<Metric>(),
            Ok(Metric::Mean("days".into()))
        );
        assert!("median(days)".parse::<Metric>().is_err());
        assert!("mean()".parse::<Metric>().is_err());
    }
}
