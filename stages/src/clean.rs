//! `clean`: type casts, domain filters, IQR outliers, missing and duplicate rows, and a summary.
//!
//! The steps and the summary keys are those of `clean_orders` in the seed (sections 3–4):
//! cast → domain filter → IQR filter → dropna and dedup. Nothing about orders is hard-coded; the
//! monthly pipeline configures them. Input row order is kept.

use std::collections::BTreeMap;

use polars::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::stats::quantile_linear;
use crate::table::{read_table, require_columns, write_table};
use crate::{BuiltinStage, StageError, StageIo, StageReport};

/// Params of `clean`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanParams {
    /// Column → type. An empty or unparseable value becomes null (see `on_cast_error`).
    #[serde(default)]
    pub cast: BTreeMap<String, CastType>,
    /// What to do with a value that cannot be cast: keep the row with a null (`null`, the
    /// default, as the seed keeps NaN days), `drop` the row, or `fail` the stage.
    #[serde(default)]
    pub on_cast_error: OnCastError,
    /// Column → allowed values (`in: [...]`, case-sensitive) or inclusive range
    /// (`between: [lo, hi]`). A null fails the filter.
    #[serde(default)]
    pub domain: BTreeMap<String, Domain>,
    /// Tukey's fences: keep a row whose value lies in [q1 − k·IQR, q3 + k·IQR], or is null.
    #[serde(default)]
    pub iqr: Option<Iqr>,
    /// Drop rows with missing values in `subset` (default: all columns).
    #[serde(default)]
    pub dropna: Option<DropNa>,
    /// Drop exact duplicate rows (nulls equal to nulls), keeping the first: `true`, or
    /// `{subset: [...]}` to compare only those columns.
    #[serde(default)]
    pub dedup: Option<Dedup>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CastType {
    #[serde(alias = "int")]
    Int64,
    #[serde(alias = "float")]
    Float64,
    #[serde(alias = "str")]
    String,
    Bool,
    /// `YYYY-MM-DD`.
    Date,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnCastError {
    #[default]
    Null,
    Drop,
    Fail,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Domain {
    In {
        /// The allowed values.
        #[serde(rename = "in")]
        values: Vec<Scalar>,
    },
    Between {
        /// `[lo, hi]`, inclusive.
        between: [f64; 2],
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Iqr {
    /// The columns to filter; their bounds are all computed on the table after the domain filter.
    pub columns: Vec<String>,
    /// The fence multiplier.
    #[serde(default = "default_k")]
    #[schemars(range(min = 0.0))]
    pub k: f64,
}

fn default_k() -> f64 {
    1.5
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DropNa {
    #[serde(default)]
    pub subset: Option<Vec<String>>,
    /// `any`: drop a row with any missing value in `subset`; `all`: only when all are missing.
    #[serde(default)]
    pub how: How,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum How {
    #[default]
    Any,
    All,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Dedup {
    All(bool),
    Subset { subset: Vec<String> },
}

/// The built-in `clean` stage.
pub struct Clean;

impl BuiltinStage for Clean {
    const NAME: &'static str = "clean";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "casts, domain filters, IQR outliers, missing and duplicate rows, with a summary";
    type Params = CleanParams;

    fn check_ports(
        inputs: &[Option<String>],
        outputs: &[Option<String>],
    ) -> Result<(), crate::ports::PortError> {
        crate::ports::exactly_one_input(inputs)?;
        crate::ports::named_outputs(outputs, &["table"], &["summary"])
    }

    fn run(params: &CleanParams, io: &StageIo) -> Result<StageReport, StageError> {
        let input = io.input(0)?;
        let table_path = io.output("table", 0)?;
        let summary_path = io.output_opt("summary", 1);
        let df = match read_typed(input, params) {
            Some(df) => df,
            None => read_table(input)?,
        };
        let (mut cleaned, summary) = clean(df, params, input)?;
        write_table(&mut cleaned, table_path)?;
        if let Some(path) = summary_path {
            let mut text = serde_json::to_string_pretty(&summary)
                .map_err(|e| StageError::new(e.to_string()))?;
            text.push('\n');
            std::fs::write(path, text)
                .map_err(|e| StageError::new(format!("cannot write `{}`: {e}", path.display())))?;
        }
        Ok(StageReport { summary })
    }
}

/// The CSV with its int64/float64 cast columns parsed while reading, when every value parses
/// (`None` otherwise, or when the input is not CSV). `clean` then gives exactly what it gives on
/// the text columns: a NaN still counts as a value that could not be cast.
fn read_typed(input: &std::path::Path, params: &CleanParams) -> Option<DataFrame> {
    if !crate::table::is_csv(input) || params.cast.is_empty() {
        return None;
    }
    let mut types = Vec::new();
    for (column, to) in &params.cast {
        match to {
            CastType::Int64 => types.push((column.clone(), DataType::Int64)),
            CastType::Float64 => types.push((column.clone(), DataType::Float64)),
            CastType::String => {}
            CastType::Bool | CastType::Date => return None,
        }
    }
    let df = crate::table::read_csv_typed(input, &types).ok()?;
    // The columns must all be there (else the text path reports the missing one).
    types
        .iter()
        .all(|(c, _)| df.column(c).is_ok())
        .then_some(df)
}

fn err(e: PolarsError) -> StageError {
    StageError::new(e.to_string())
}

/// Runs the four steps on `df` (read from `source`, named in errors) and returns the cleaned
/// table and the summary.
pub fn clean(
    df: DataFrame,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<(DataFrame, Json), StageError> {
    let mut wanted: Vec<(&str, String)> = Vec::new();
    wanted.extend(
        params
            .cast
            .keys()
            .map(|c| (c.as_str(), crate::table::pointer(&["cast", c]))),
    );
    wanted.extend(
        params
            .domain
            .keys()
            .map(|c| (c.as_str(), crate::table::pointer(&["domain", c]))),
    );
    if let Some(iqr) = &params.iqr {
        wanted.extend(iqr.columns.iter().enumerate().map(|(i, c)| {
            (
                c.as_str(),
                crate::table::pointer(&["iqr", "columns", &i.to_string()]),
            )
        }));
    }
    if let Some(subset) = params.dropna.as_ref().and_then(|d| d.subset.as_ref()) {
        wanted.extend(subset.iter().enumerate().map(|(i, c)| {
            (
                c.as_str(),
                crate::table::pointer(&["dropna", "subset", &i.to_string()]),
            )
        }));
    }
    if let Some(Dedup::Subset { subset }) = &params.dedup {
        wanted.extend(subset.iter().enumerate().map(|(i, c)| {
            (
                c.as_str(),
                crate::table::pointer(&["dedup", "subset", &i.to_string()]),
            )
        }));
    }
    require_columns(&df, wanted, source)?;

    let mut summary = serde_json::Map::new();
    let initial = df.height();
    summary.insert("initial".into(), json!(initial));

    // 1. Cast.
    let (df, cast_nulls, removed_cast) = cast(df, params, source)?;
    summary.insert("after_cast".into(), json!(df.height()));

    // 2. Domain.
    let before = df.height();
    let mut by_rule = serde_json::Map::new();
    let mut rules = Vec::new();
    for (column, rule) in &params.domain {
        rules.push((column, domain_expr(&df, column, rule)?));
    }
    let df = if rules.is_empty() {
        df
    } else {
        // One pass evaluates every rule; the counts and the filter come from its masks.
        let masks = df
            .clone()
            .lazy()
            .select(
                rules
                    .iter()
                    .map(|(c, ok)| ok.clone().alias(c.as_str()))
                    .collect::<Vec<_>>(),
            )
            .collect()
            .map_err(err)?;
        let mut keep = BooleanChunked::full("keep".into(), true, df.height());
        for (column, _) in &rules {
            let ok = masks
                .column(column)
                .and_then(|c| c.bool().cloned())
                .map_err(err)?;
            by_rule.insert(
                (*column).clone(),
                json!(ok.len() - ok.sum().unwrap_or(0) as usize),
            );
            keep = keep & ok;
        }
        df.filter(&keep).map_err(err)?
    };
    summary.insert("after_domain".into(), json!(df.height()));
    summary.insert("removed_domain".into(), json!(before - df.height()));

    // 3. IQR, bounds of every column from the same (post-domain) table.
    let before = df.height();
    let mut bounds = serde_json::Map::new();
    let mut keep: Option<Expr> = None;
    if let Some(iqr) = &params.iqr {
        for column in &iqr.columns {
            let values = numeric_values(&df, column)?;
            let mut values = values;
            let q1 = quantile_linear(&mut values, 0.25);
            let q3 = quantile_linear(&mut values, 0.75);
            let (lower, upper) = match (q1, q3) {
                (Some(q1), Some(q3)) => {
                    (Some(q1 - iqr.k * (q3 - q1)), Some(q3 + iqr.k * (q3 - q1)))
                }
                _ => (None, None),
            };
            bounds.insert(
                column.clone(),
                json!({"q1": q1, "q3": q3, "lower": lower, "upper": upper}),
            );
            if let (Some(lower), Some(upper)) = (lower, upper) {
                let value = col(column.as_str()).cast(DataType::Float64);
                let ok = value
                    .clone()
                    .gt_eq(lit(lower))
                    .and(value.clone().lt_eq(lit(upper)))
                    .or(value.is_null());
                keep = Some(match keep {
                    Some(k) => k.and(ok),
                    None => ok,
                });
            }
        }
    }
    let df = match keep {
        Some(keep) => df.lazy().filter(keep).collect().map_err(err)?,
        None => df,
    };
    summary.insert("after_iqr".into(), json!(df.height()));
    summary.insert("removed_iqr".into(), json!(before - df.height()));
    if let Some(iqr) = &params.iqr {
        let value = if iqr.columns.len() == 1 {
            bounds.values().next().cloned().unwrap_or(Json::Null)
        } else {
            Json::Object(bounds)
        };
        summary.insert("iqr_bounds".into(), value);
    }

    // 4. Missing values, then duplicates.
    let before = df.height();
    let df = match &params.dropna {
        Some(dropna) => {
            let columns: Vec<String> = dropna.subset.clone().unwrap_or_else(|| {
                df.get_column_names()
                    .iter()
                    .map(|c| c.to_string())
                    .collect()
            });
            let missing: Vec<Expr> = columns.iter().map(|c| missing_expr(&df, c)).collect();
            let drop = match dropna.how {
                How::Any => any_horizontal(missing).map_err(err)?,
                How::All => all_horizontal(missing).map_err(err)?,
            };
            if columns.is_empty() {
                df
            } else {
                df.lazy().filter(drop.not()).collect().map_err(err)?
            }
        }
        None => df,
    };
    let removed_dropna = before - df.height();
    let after_dropna = df.height();
    let df = match &params.dedup {
        None | Some(Dedup::All(false)) => df,
        Some(Dedup::All(true)) => df
            .lazy()
            .unique_stable_generic(None, UniqueKeepStrategy::First)
            .collect()
            .map_err(err)?,
        Some(Dedup::Subset { subset }) => df
            .lazy()
            .unique_stable_generic(
                Some(subset.iter().map(|c| col(c.as_str())).collect()),
                UniqueKeepStrategy::First,
            )
            .collect()
            .map_err(err)?,
    };
    summary.insert("after_dropna_dedup".into(), json!(df.height()));
    summary.insert("removed_dropna_dedup".into(), json!(before - df.height()));

    // More than the seed's keys: where each row went.
    summary.insert("removed_cast".into(), json!(removed_cast));
    summary.insert("cast_nulls".into(), Json::Object(cast_nulls));
    summary.insert("removed_domain_by_rule".into(), Json::Object(by_rule));
    summary.insert("removed_dropna".into(), json!(removed_dropna));
    summary.insert("removed_dedup".into(), json!(after_dropna - df.height()));
    summary.insert(
        "columns".into(),
        json!(df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()),
    );
    Ok((df, Json::Object(summary)))
}

/// The cast of `column` to `to`, from whatever it is (a string when read from CSV).
fn cast_expr(column: &str, from: &DataType, to: CastType) -> Expr {
    let c = col(column);
    if !matches!(from, DataType::String) {
        return match to {
            CastType::Int64 => c.cast(DataType::Int64),
            CastType::Float64 => {
                let f = c.cast(DataType::Float64);
                when(f.clone().is_nan())
                    .then(lit(NULL).cast(DataType::Float64))
                    .otherwise(f)
            }
            CastType::String => c.cast(DataType::String),
            CastType::Bool => c.cast(DataType::Boolean),
            CastType::Date => c.cast(DataType::Date),
        };
    }
    let text = c.str().strip_chars(lit(NULL));
    match to {
        CastType::Int64 => {
            // "7" directly; "7.0" (as pandas writes an int column that held NaN) through a float.
            let direct = text.clone().cast(DataType::Int64);
            let float = text.cast(DataType::Float64);
            let integral = float
                .clone()
                .eq(float.clone().floor())
                .and(float.clone().abs().lt(lit(9.007_199_254_740_992e15)));
            let via_float = when(integral)
                .then(float.cast(DataType::Int64))
                .otherwise(lit(NULL).cast(DataType::Int64));
            direct.fill_null(via_float)
        }
        CastType::Float64 => {
            // pandas reads "NaN" (and "nan") as missing.
            let f = text.cast(DataType::Float64);
            when(f.clone().is_nan())
                .then(lit(NULL).cast(DataType::Float64))
                .otherwise(f)
        }
        CastType::String => text,
        CastType::Bool => {
            let lower = text.str().to_lowercase();
            when(lower.clone().is_in(
                lit(Series::new("t".into(), ["true", "t", "yes", "y", "1"])).implode(false),
                false,
            ))
            .then(lit(true))
            .when(lower.is_in(
                lit(Series::new("f".into(), ["false", "f", "no", "n", "0"])).implode(false),
                false,
            ))
            .then(lit(false))
            .otherwise(lit(NULL).cast(DataType::Boolean))
        }
        CastType::Date => text.str().to_date(StrptimeOptions {
            format: Some("%Y-%m-%d".into()),
            strict: false,
            exact: true,
            cache: true,
        }),
    }
}

type CastOutcome = (DataFrame, serde_json::Map<String, Json>, usize);

/// `"7"`, `" 7 "`, `"7.0"` → 7; anything else → `None`.
fn lenient_int(text: &str) -> Option<i64> {
    let t = text.trim();
    t.parse::<i64>().ok().or_else(|| {
        t.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15)
            .map(|f| f as i64)
    })
}

/// `" 1.5 "` → 1.5; NaN (which pandas reads as missing) and anything else → `None`.
fn lenient_float(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|f| !f.is_nan())
}

/// Casts a string column to int64 or float64: polars' parser for the common case, then a lenient
/// parse of just the values it rejected (surrounding spaces, `7.0` for an int, `NaN`).
fn cast_number(strings: &Series, to: CastType) -> PolarsResult<Series> {
    let text = strings.str()?;
    match to {
        CastType::Int64 => {
            let direct = strings.cast(&DataType::Int64)?;
            let retry = text.is_not_null() & direct.is_null();
            if !retry.any() {
                return Ok(direct);
            }
            let mut values: Vec<Option<i64>> = direct.i64()?.iter().collect();
            for (i, again) in retry.iter().enumerate() {
                if again == Some(true) {
                    values[i] = text.get(i).and_then(lenient_int);
                }
            }
            Ok(
                Int64Chunked::from_iter_options(strings.name().clone(), values.into_iter())
                    .into_series(),
            )
        }
        _ => {
            let direct = strings.cast(&DataType::Float64)?;
            let floats = direct.f64()?;
            let retry = (text.is_not_null() & floats.is_null()) | floats.is_nan();
            if !retry.any() {
                return Ok(direct);
            }
            let mut values: Vec<Option<f64>> = floats.iter().collect();
            for (i, again) in retry.iter().enumerate() {
                if again == Some(true) {
                    values[i] = text.get(i).and_then(lenient_float);
                }
            }
            Ok(
                Float64Chunked::from_iter_options(strings.name().clone(), values.into_iter())
                    .into_series(),
            )
        }
    }
}

fn cast(
    df: DataFrame,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<CastOutcome, StageError> {
    let mut nulls = serde_json::Map::new();
    if params.cast.is_empty() {
        return Ok((df, nulls, 0));
    }
    let mut df = df;
    // With `on_cast_error: fail`: the earliest row, its value and column.
    let mut first_failure: Option<(usize, String, String)> = None;
    // Per column, the rows whose value was there and did not survive the cast.
    let mut failures: Vec<(String, BooleanChunked)> = Vec::new();
    for (column, to) in &params.cast {
        let before = df
            .column(column)
            .map_err(err)?
            .as_materialized_series()
            .clone();
        let is_text = matches!(before.dtype(), DataType::String);
        let after = match to {
            CastType::Int64 | CastType::Float64 if is_text => {
                cast_number(&before, *to).map_err(err)?
            }
            _ => {
                let expr = cast_expr(column, before.dtype(), *to).alias(column.as_str());
                let out = df.clone().lazy().select([expr]).collect().map_err(err)?;
                out.column(column)
                    .map_err(err)?
                    .as_materialized_series()
                    .clone()
            }
        };
        let present = if is_text {
            let text = before.str().map_err(err)?;
            text.is_not_null() & text.str_len_bytes().gt(0)
        } else {
            before.is_not_null()
        };
        let failed = present & after.is_null();
        if params.on_cast_error == OnCastError::Fail {
            if let Some(row) = failed.iter().position(|f| f == Some(true)) {
                let value = before.get(row).map(|v| v.to_string()).unwrap_or_default();
                if first_failure.as_ref().is_none_or(|(r, _, _)| row < *r) {
                    first_failure = Some((row, value, column.clone()));
                }
            }
        }
        nulls.insert(column.clone(), json!(failed.sum().unwrap_or(0)));
        df.with_column(after.into_column()).map_err(err)?;
        failures.push((column.clone(), failed));
    }
    match params.on_cast_error {
        OnCastError::Null => Ok((df, nulls, 0)),
        OnCastError::Drop => {
            let mut keep = BooleanChunked::full("keep".into(), true, df.height());
            for (_, failed) in &failures {
                keep = keep & !failed.clone();
            }
            let before = df.height();
            let out = df.filter(&keep).map_err(err)?;
            let removed = before - out.height();
            Ok((out, nulls, removed))
        }
        OnCastError::Fail => match first_failure {
            None => Ok((df, nulls, 0)),
            Some((row, value, column)) => {
                let to = params
                    .cast
                    .get(&column)
                    .map(|t| format!("{t:?}").to_lowercase())
                    .unwrap_or_default();
                let place = if crate::table::is_csv(source) {
                    format!("line {}", row + 2)
                } else {
                    format!("row {}", row + 1)
                };
                Err(StageError::new(format!(
                    "`{}` {place}: cannot cast {value} in column `{column}` to {to} (on_cast_error: fail)",
                    source.display()
                )))
            }
        },
    }
}

fn is_float(df: &DataFrame, column: &str) -> bool {
    df.schema().get(column).is_some_and(|d| d.is_float())
}

/// Missing: null, or NaN in a float column (pandas' notion).
fn missing_expr(df: &DataFrame, column: &str) -> Expr {
    if is_float(df, column) {
        col(column).is_null().or(col(column).is_nan())
    } else {
        col(column).is_null()
    }
}

fn domain_expr(df: &DataFrame, column: &str, rule: &Domain) -> Result<Expr, StageError> {
    let dtype = df.schema().get(column).cloned().unwrap_or(DataType::String);
    match rule {
        Domain::In { values } => {
            let series = if matches!(dtype, DataType::String) {
                let strings: Vec<String> = values
                    .iter()
                    .map(|v| match v {
                        Scalar::String(s) => s.clone(),
                        Scalar::Int(i) => i.to_string(),
                        Scalar::Float(f) => f.to_string(),
                        Scalar::Bool(b) => b.to_string(),
                    })
                    .collect();
                Series::new("allowed".into(), strings)
            } else if dtype.is_numeric() {
                let numbers: Vec<f64> = values
                    .iter()
                    .filter_map(|v| match v {
                        Scalar::Int(i) => Some(*i as f64),
                        Scalar::Float(f) => Some(*f),
                        Scalar::String(s) => s.parse().ok(),
                        Scalar::Bool(_) => None,
                    })
                    .collect();
                let allowed = Series::new("allowed".into(), numbers);
                return Ok(col(column)
                    .cast(DataType::Float64)
                    .is_in(lit(allowed).implode(false), false)
                    .fill_null(lit(false)));
            } else {
                return Err(StageError::new(format!("domain `in` on column `{column}` of type {dtype}: cast it to a string or number first")));
            };
            Ok(col(column)
                .is_in(lit(series).implode(false), false)
                .fill_null(lit(false)))
        }
        Domain::Between { between: [lo, hi] } => {
            if !dtype.is_numeric() {
                return Err(StageError::new(format!(
                    "domain `between` on column `{column}`, which is {dtype}: cast it to int64 or float64 first (param `cast.{column}`)"
                )));
            }
            let value = col(column).cast(DataType::Float64);
            Ok(value
                .clone()
                .gt_eq(lit(*lo))
                .and(value.lt_eq(lit(*hi)))
                .fill_null(lit(false)))
        }
    }
}

/// The non-missing values of a numeric column, as f64.
fn numeric_values(df: &DataFrame, column: &str) -> Result<Vec<f64>, StageError> {
    let series = df.column(column).map_err(err)?;
    if !series.dtype().is_numeric() {
        return Err(StageError::new(format!(
            "iqr on column `{column}`, which is {}: cast it to int64 or float64 first (param `cast.{column}`)",
            series.dtype()
        )));
    }
    let floats = series.cast(&DataType::Float64).map_err(err)?;
    let floats = floats.f64().map_err(err)?;
    Ok(floats.iter().flatten().filter(|v| !v.is_nan()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(csv: &str, params: serde_json::Value) -> Result<(DataFrame, Json), StageError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, csv).unwrap();
        let params: CleanParams = serde_json::from_value(params).unwrap();
        let tmp = |e: StageError| {
            StageError::new(
                e.message
                    .replace(&dir.path().display().to_string(), "[TMP]"),
            )
        };
        let df = read_table(&path).map_err(tmp)?;
        clean(df, &params, &path).map_err(tmp)
    }

    fn ints(df: &DataFrame, column: &str) -> Vec<Option<i64>> {
        df.column(column).unwrap().i64().unwrap().iter().collect()
    }

    fn floats(df: &DataFrame, column: &str) -> Vec<Option<f64>> {
        df.column(column).unwrap().f64().unwrap().iter().collect()
    }

    #[test]
    fn casts_keep_rows_with_nulls_and_count_failures() {
        let (df, summary) = run(
            "id,x,f,b,d\n1,7,1.5,true,2024-01-31\n2,7.0,NaN,no,2024-02-30\n3,abc,,x,\n4, 8 ,2,1,2024-03-01\n",
            json!({"cast": {"id": "int64", "x": "int64", "f": "float64", "b": "bool", "d": "date"}}),
        )
        .unwrap();
        assert_eq!(ints(&df, "x"), [Some(7), Some(7), None, Some(8)]);
        assert_eq!(floats(&df, "f"), [Some(1.5), None, None, Some(2.0)]);
        let b: Vec<Option<bool>> = df.column("b").unwrap().bool().unwrap().iter().collect();
        assert_eq!(b, [Some(true), Some(false), None, Some(true)]);
        assert_eq!(
            df.column("d").unwrap().null_count(),
            2,
            "2024-02-30 is not a date; empty is null"
        );
        // "abc" and "x" failed; the empty value and "NaN" are missing, not failures… except that
        // "NaN" is a value that the float cast turns into a null, as pandas reads it as missing.
        assert_eq!(
            summary["cast_nulls"],
            json!({"b": 1, "d": 1, "f": 1, "id": 0, "x": 1})
        );
        assert_eq!(
            (summary["initial"].as_u64(), summary["after_cast"].as_u64()),
            (Some(4), Some(4))
        );
    }

    #[test]
    fn on_cast_error_drop_and_fail() {
        let csv = "id,x\n1,5\n2,oops\n3,6\n";
        let (df, summary) = run(
            csv,
            json!({"cast": {"x": "int64"}, "on_cast_error": "drop"}),
        )
        .unwrap();
        assert_eq!(ints(&df, "x"), [Some(5), Some(6)]);
        assert_eq!(summary["after_cast"], 2);
        let error = run(
            csv,
            json!({"cast": {"x": "int64"}, "on_cast_error": "fail"}),
        )
        .unwrap_err();
        assert_eq!(error.message, "`[TMP]/in.csv` line 3: cannot cast \"oops\" in column `x` to int64 (on_cast_error: fail)");
    }

    #[test]
    fn domain_sets_are_case_sensitive_ranges_inclusive_and_nulls_fail() {
        let (df, summary) = run(
            "s,n\nprior,0\nPrior,3\ntrain,6\ntest,7\n,2\ntrain,\ntest,-1\n",
            json!({"cast": {"n": "int64"}, "domain": {"s": {"in": ["prior", "train", "test"]}, "n": {"between": [0, 6]}}}),
        )
        .unwrap();
        assert_eq!(ints(&df, "n"), [Some(0), Some(6)]);
        assert_eq!(summary["removed_domain"], 5);
        assert_eq!(summary["removed_domain_by_rule"], json!({"n": 3, "s": 2}));
    }

    #[test]
    fn iqr_uses_linear_quartiles_keeps_nulls_and_bounds_inclusive() {
        // Values 1..=8 and 100: sorted, n = 9; q1 at h = 2 → 3, q3 at h = 6 → 7; IQR 4;
        // fences −3 and 13: 100 goes, the null stays.
        let mut csv = String::from("v\n");
        for v in [1, 2, 3, 4, 5, 6, 7, 8, 100] {
            csv.push_str(&format!("{v}\n"));
        }
        csv.push_str("\n13\n");
        let (df, summary) = run(
            &csv,
            json!({"cast": {"v": "float64"}, "iqr": {"columns": ["v"]}}),
        )
        .unwrap();
        // With 13 among the values (n = 10): q1 at h = 2.25 → 3.25, q3 at h = 6.75 → 7.75,
        // IQR 4.5, fences −3.5 and 14.5: 13 stays, 100 goes.
        assert_eq!(
            summary["iqr_bounds"],
            json!({"q1": 3.25, "q3": 7.75, "lower": -3.5, "upper": 14.5})
        );
        assert_eq!(summary["removed_iqr"], 1);
        assert_eq!(floats(&df, "v").len(), 10, "the null row is kept");
    }

    #[test]
    fn several_iqr_columns_report_bounds_per_column() {
        let (_, summary) = run(
            "a,b\n1,10\n2,20\n3,30\n",
            json!({"cast": {"a": "int64", "b": "int64"}, "iqr": {"columns": ["a", "b"], "k": 0}}),
        )
        .unwrap();
        assert_eq!(
            summary["iqr_bounds"]["a"],
            json!({"q1": 1.5, "q3": 2.5, "lower": 1.5, "upper": 2.5})
        );
        assert_eq!(summary["after_iqr"], 1);
    }

    #[test]
    fn dropna_any_and_all() {
        let csv = "a,b,c\n1,,x\n,,y\n1,2,z\n";
        let (df, _) = run(csv, json!({"dropna": {"subset": ["a", "b"], "how": "all"}})).unwrap();
        assert_eq!(df.height(), 2);
        let (df, _) = run(csv, json!({"dropna": {"subset": ["a", "b"], "how": "any"}})).unwrap();
        assert_eq!(df.height(), 1);
        let (df, _) = run(csv, json!({"dropna": {}})).unwrap();
        assert_eq!(df.height(), 1, "default: any missing value in any column");
    }

    #[test]
    fn dedup_keeps_the_first_copy_in_order_with_nulls_equal() {
        let csv = "a,b\n2,\n1,x\n2,\n1,y\n1,x\n";
        let (df, summary) = run(csv, json!({"cast": {"a": "int64"}, "dedup": true})).unwrap();
        assert_eq!(ints(&df, "a"), [Some(2), Some(1), Some(1)]);
        assert_eq!(summary["removed_dedup"], 2);
        let (df, _) = run(
            csv,
            json!({"cast": {"a": "int64"}, "dedup": {"subset": ["a"]}}),
        )
        .unwrap();
        assert_eq!(ints(&df, "a"), [Some(2), Some(1)]);
    }

    #[test]
    fn a_header_only_file_gives_zeros_and_null_quartiles() {
        let (df, summary) = run(
            "v,w\n",
            json!({"cast": {"v": "float64"}, "iqr": {"columns": ["v"]}, "dedup": true}),
        )
        .unwrap();
        assert_eq!(df.height(), 0);
        assert_eq!(summary["initial"], 0);
        assert_eq!(
            summary["iqr_bounds"],
            json!({"q1": null, "q3": null, "lower": null, "upper": null})
        );
    }

    #[test]
    fn missing_columns_and_bad_files_are_named() {
        let error = run("a\n1\n", json!({"cast": {"b": "int64"}})).unwrap_err();
        assert_eq!(
            error.message,
            "column `b` (param `cast.b`) is not in `[TMP]/in.csv`; its columns are: a"
        );
        let error = run("a,b\n1,2\n3,4,5\n", json!({})).unwrap_err();
        assert_eq!(
            error.message,
            "`[TMP]/in.csv`: line 3: expected 2 fields (as in the header), found 3"
        );
        let error = run("", json!({})).unwrap_err();
        assert_eq!(
            error.message,
            "`[TMP]/in.csv` is empty: a CSV file needs at least a header line"
        );
        let error = run("a\n1\n", json!({"domain": {"a": {"between": [0, 1]}}})).unwrap_err();
        assert!(
            error.message.contains("cast it to int64 or float64 first"),
            "{}",
            error.message
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn params() -> CleanParams {
        serde_json::from_value(json!({
            "cast": {"a": "int64", "b": "float64", "c": "bool", "d": "date"},
            "domain": {"a": {"between": [0, 5]}, "e": {"in": ["x", "y"]}},
            "iqr": {"columns": ["b"]},
            "dropna": {"subset": ["a", "b"], "how": "all"},
            "dedup": true,
        }))
        .unwrap()
    }

    proptest! {
        /// Whatever bytes follow the header, `clean` returns a table or an error, never panics,
        /// and never returns more rows than it read.
        #[test]
        fn any_csv_body_is_handled(body in proptest::collection::vec(
            prop_oneof![Just(b','), Just(b'\n'), Just(b'"'), Just(b'1'), Just(b'7'), Just(b'.'), Just(b'-'), Just(b'x'), Just(b'y'), Just(b' '), Just(0xffu8), Just(b'e'), any::<u8>()],
            0..300,
        )) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("in.csv");
            let mut bytes = b"a,b,c,d,e\n".to_vec();
            bytes.extend_from_slice(&body);
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(df) = read_table(&path) {
                let rows = df.height();
                if let Ok((out, summary)) = clean(df, &params(), &path) {
                    prop_assert!(out.height() <= rows);
                    prop_assert_eq!(summary["initial"].as_u64(), Some(rows as u64));
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, b"a,b\n1,2\n3,\xff\xfe\n").unwrap();
        match read_table(&path) {
            Err(e) => assert!(e.message.contains("line 3: invalid UTF-8"), "{}", e.message),
            Ok(df) => panic!("invalid UTF-8 was read silently: {df:?}"),
        }
    }
}

#[cfg(test)]
mod fail_tests {
    use super::*;

    #[test]
    fn fail_names_the_earliest_offending_line_across_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, "a,b\n1,2\n2,x\ny,3\n").unwrap();
        let params: CleanParams = serde_json::from_value(
            json!({"cast": {"a": "int64", "b": "int64"}, "on_cast_error": "fail"}),
        )
        .unwrap();
        let error = clean(read_table(&path).unwrap(), &params, &path).unwrap_err();
        assert!(
            error.message.ends_with(
                "line 3: cannot cast \"x\" in column `b` to int64 (on_cast_error: fail)"
            ),
            "{}",
            error.message
        );
    }
}

#[cfg(test)]
mod typed_read {
    use super::*;

    /// The typed fast path and the text path agree exactly, NaN and empty values included.
    #[test]
    fn the_typed_fast_path_agrees_with_the_text_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(
            &path,
            "id,n,x,s\n1,5,1.5,a\n2,,NaN,b\n3,-2,,a\n3,-2,,a\n4,9,100.0,c\n5,3,2.25,\n6,4,-0.5,a\n7,2,3,b\n",
        )
        .unwrap();
        let params: CleanParams = serde_json::from_value(json!({
            "cast": {"id": "int64", "n": "int64", "x": "float64", "s": "string"},
            "domain": {"n": {"between": [-5, 8]}},
            "iqr": {"columns": ["x"]},
            "dropna": {"subset": ["n", "x"], "how": "all"},
            "dedup": true,
        }))
        .unwrap();
        let typed = read_typed(&path, &params).expect("every value parses");
        assert_eq!(typed.column("id").unwrap().dtype(), &DataType::Int64);
        let (a, sa) = clean(typed, &params, &path).unwrap();
        let (b, sb) = clean(read_table(&path).unwrap(), &params, &path).unwrap();
        assert_eq!(sa, sb);
        assert!(a.equals_missing(&b), "{a}\n{b}");
        assert_eq!(
            sa["cast_nulls"]["x"], 1,
            "NaN counts as a value that could not be cast"
        );
    }

    #[test]
    fn a_value_that_does_not_parse_takes_the_text_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, "n\n1\n7.0\n").unwrap();
        let params: CleanParams = serde_json::from_value(json!({"cast": {"n": "int64"}})).unwrap();
        assert!(read_typed(&path, &params).is_none());
    }
}
