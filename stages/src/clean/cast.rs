//! `cast`: text to the declared types, strictly or leniently, with what did not parse counted.

use std::collections::BTreeMap;

use polars::prelude::*;

use super::params::Scalar;
use super::*;

/// The cast of `column` to `to`, from whatever it is (a string when read from CSV).
pub(super) fn cast_expr(column: &str, from: &DataType, to: CastType) -> Expr {
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

/// Finishes an int64/float64 column parsed while reading, given the text of the values that did
/// not parse (row, text; empty fields left out): each is parsed again leniently, as
/// [`cast_number`] does, and a float NaN counts as missing. Returns the column and the rows whose
/// value could not be cast, with their text, in row order.
pub(super) fn finish_parsed(
    typed: &Series,
    unparsed: Vec<(IdxSize, String)>,
    to: CastType,
) -> PolarsResult<(Series, Vec<(IdxSize, String)>)> {
    let mut failures = Vec::new();
    match to {
        CastType::Int64 => {
            if unparsed.is_empty() {
                return Ok((typed.clone(), failures));
            }
            let mut values: Vec<Option<i64>> = typed.i64()?.iter().collect();
            for (row, text) in unparsed {
                match lenient_int(&text) {
                    Some(v) => values[row as usize] = Some(v),
                    None => failures.push((row, text)),
                }
            }
            let column = Int64Chunked::from_iter_options(typed.name().clone(), values.into_iter());
            Ok((column.into_series(), failures))
        }
        _ => {
            let floats = typed.f64()?;
            let nans = floats.is_nan().sum().unwrap_or(0);
            if unparsed.is_empty() && nans == 0 {
                return Ok((typed.clone(), failures));
            }
            let mut values: Vec<Option<f64>> = floats.iter().collect();
            for (row, text) in unparsed {
                values[row as usize] = lenient_float(&text);
                if values[row as usize].is_none() {
                    failures.push((row, text));
                }
            }
            // A NaN whose text the caller did not give.
            for (row, value) in values.iter_mut().enumerate() {
                if value.is_some_and(f64::is_nan) {
                    *value = None;
                    failures.push((row as IdxSize, "NaN".to_owned()));
                }
            }
            failures.sort_by_key(|(row, _)| *row);
            let column =
                Float64Chunked::from_iter_options(typed.name().clone(), values.into_iter());
            Ok((column.into_series(), failures))
        }
    }
}

/// The cast table, per cast column the values that could not be cast, and the rows dropped.
pub(super) type CastOutcome = (DataFrame, BTreeMap<String, usize>, usize);

/// `"7"`, `" 7 "`, `"7.0"` → 7; anything else → `None`.
pub(super) fn lenient_int(text: &str) -> Option<i64> {
    let t = text.trim();
    t.parse::<i64>().ok().or_else(|| {
        t.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15)
            .map(|f| f as i64)
    })
}

/// `" 1.5 "` → 1.5; NaN (which pandas reads as missing) and anything else → `None`.
pub(super) fn lenient_float(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|f| !f.is_nan())
}

/// Finishes the cast of a text column to int64 or float64 from `direct`, polars' parse of it
/// (done by `cast` or while reading the CSV): the values polars rejected are parsed again
/// leniently (surrounding spaces, `7.0` for an int, `NaN` as missing).
pub(super) fn cast_number(text: &Series, direct: Series, to: CastType) -> PolarsResult<Series> {
    let strings = text.str()?;
    match to {
        CastType::Int64 => {
            let retry = strings.is_not_null() & direct.is_null();
            if !retry.any() {
                return Ok(direct);
            }
            let mut values: Vec<Option<i64>> = direct.i64()?.iter().collect();
            for (i, again) in retry.iter().enumerate() {
                if again == Some(true) {
                    values[i] = strings.get(i).and_then(lenient_int);
                }
            }
            Ok(
                Int64Chunked::from_iter_options(direct.name().clone(), values.into_iter())
                    .into_series(),
            )
        }
        _ => {
            let floats = direct.f64()?;
            let retry = (strings.is_not_null() & floats.is_null()) | floats.is_nan();
            if !retry.any() {
                return Ok(direct);
            }
            let mut values: Vec<Option<f64>> = floats.iter().collect();
            for (i, again) in retry.iter().enumerate() {
                if again == Some(true) {
                    values[i] = strings.get(i).and_then(lenient_float);
                }
            }
            Ok(
                Float64Chunked::from_iter_options(direct.name().clone(), values.into_iter())
                    .into_series(),
            )
        }
    }
}

pub(super) fn cast_columns(
    df: DataFrame,
    mut texts: BTreeMap<String, Text>,
    params: &CleanParams,
    source: &std::path::Path,
    first_row: usize,
) -> Result<CastOutcome, StageError> {
    let mut nulls = BTreeMap::new();
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
        let numeric = to.number_dtype().is_some();
        let (after, failed, first) = match texts.remove(column) {
            // Parsed while reading; the text of just the values that did not parse.
            Some(Text::Unparsed(unparsed)) if numeric => {
                let (after, failures) = finish_parsed(&before, unparsed, *to).map_err(err)?;
                let mut mask = vec![false; before.len()];
                for (row, _) in &failures {
                    mask[*row as usize] = true;
                }
                let first = failures
                    .into_iter()
                    .next()
                    .map(|(row, text)| (row as usize, format!("{text:?}")));
                (after, BooleanChunked::new("failed".into(), mask), first)
            }
            other => {
                // The column's text: as it is, or read beside the typed column.
                let (before, parsed) = match other {
                    Some(Text::Full(text)) if numeric => (text, Some(before)),
                    _ => (before, None),
                };
                let is_text = matches!(before.dtype(), DataType::String);
                let after = match (parsed, to.number_dtype()) {
                    (Some(parsed), _) => cast_number(&before, parsed, *to).map_err(err)?,
                    (None, Some(dtype)) if is_text => {
                        let direct = before.cast(&dtype).map_err(err)?;
                        cast_number(&before, direct, *to).map_err(err)?
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
                let first = failed.iter().position(|f| f == Some(true)).map(|row| {
                    let value = before.get(row).map(|v| v.to_string()).unwrap_or_default();
                    (row, value)
                });
                (after, failed, first)
            }
        };
        if let Some((row, value)) = first {
            if first_failure.as_ref().is_none_or(|(r, _, _)| row < *r) {
                first_failure = Some((row, value, column.clone()));
            }
        }
        nulls.insert(column.clone(), failed.sum().unwrap_or(0) as usize);
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
            Some((row, value, column)) => Err(cast_failure(
                params,
                source,
                first_row + row,
                &value,
                &column,
            )),
        },
    }
}

/// With `on_cast_error: fail`: the error for the value `shown` of `column`, at 0-based `row` of
/// the table read from `source` (a CSV's line, counting the header; else a 1-based row).
pub(super) fn cast_failure(
    params: &CleanParams,
    source: &std::path::Path,
    row: usize,
    shown: &str,
    column: &str,
) -> StageError {
    let to = params
        .cast
        .get(column)
        .map(|t| format!("{t:?}").to_lowercase())
        .unwrap_or_default();
    let place = if crate::io::table::is_csv(source) {
        format!("line {}", row + 2)
    } else {
        format!("row {}", row + 1)
    };
    StageError::new(format!(
        "`{}` {place}: cannot cast {shown} in column `{column}` to {to} (on_cast_error: fail)",
        source.display()
    ))
}

pub(super) fn is_float(df: &DataFrame, column: &str) -> bool {
    df.schema().get(column).is_some_and(|d| d.is_float())
}

/// Missing: null, or NaN in a float column (pandas' notion).
pub(super) fn missing_expr(df: &DataFrame, column: &str) -> Expr {
    if is_float(df, column) {
        col(column).is_null().or(col(column).is_nan())
    } else {
        col(column).is_null()
    }
}

pub(super) fn domain_expr(df: &DataFrame, column: &str, rule: &Domain) -> Result<Expr, StageError> {
    let dtype = df.schema().get(column).cloned().unwrap_or(DataType::String);
    match rule {
        Domain::In { values } => {
            let series = if matches!(dtype, DataType::String) {
                let strings: Vec<String> = values.iter().map(Scalar::text).collect();
                Series::new("allowed".into(), strings)
            } else if dtype.is_numeric() {
                let numbers: Vec<f64> = values.iter().filter_map(Scalar::number).collect();
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

/// The non-missing values of a numeric column in the `alive` rows, as f64.
pub(super) fn numeric_values(
    df: &DataFrame,
    column: &str,
    alive: &BooleanChunked,
) -> Result<Vec<f64>, StageError> {
    let series = df.column(column).map_err(err)?;
    if !series.dtype().is_numeric() {
        return Err(StageError::new(format!(
            "iqr on column `{column}`, which is {}: cast it to int64 or float64 first (param `cast.{column}`)",
            series.dtype()
        )));
    }
    let floats = series.cast(&DataType::Float64).map_err(err)?;
    let floats = floats.f64().map_err(err)?;
    Ok(floats
        .iter()
        .zip(alive.iter())
        .filter_map(|(v, a)| v.filter(|v| a == Some(true) && !v.is_nan()))
        .collect())
}
