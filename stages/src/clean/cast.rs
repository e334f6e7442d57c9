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
/// not parse (row, text, in row order; empty fields left out): each is parsed again leniently, as
/// [`cast_number`] does, and a float NaN counts as missing. Returns the column and the rows whose
/// value could not be cast, with their text, in row order. The column is patched with vectorised
/// operations, never rebuilt value by value: a few bad values in millions cost next to nothing.
pub(super) fn finish_parsed(
    typed: &Series,
    unparsed: Vec<(IdxSize, String)>,
    to: CastType,
) -> PolarsResult<(Series, Vec<(IdxSize, String)>)> {
    let mut failures = Vec::new();
    match to {
        CastType::Int64 => {
            let mut parsed = Vec::new();
            for (row, text) in unparsed {
                match lenient_int(&text) {
                    Some(v) => parsed.push((row, v)),
                    None => failures.push((row, text)),
                }
            }
            let ints = typed.i64()?;
            Ok((patched(ints, &parsed)?.into_series(), failures))
        }
        _ => {
            let floats = typed.f64()?;
            let nan = floats.is_nan().fill_null_with_values(false)?;
            let nans = crate::io::rows::true_rows(&nan);
            if unparsed.is_empty() && nans.is_empty() {
                return Ok((typed.clone(), failures));
            }
            let floats = if nans.is_empty() {
                floats.clone()
            } else {
                floats.set(&nan, None)?
            };
            // A NaN whose text the caller did not give counts as a value that could not be cast.
            for row in nans {
                if unparsed.binary_search_by_key(&row, |(r, _)| *r).is_err() {
                    failures.push((row, "NaN".to_owned()));
                }
            }
            let mut parsed = Vec::new();
            for (row, text) in unparsed {
                match lenient_float(&text) {
                    Some(v) => parsed.push((row, v)),
                    None => failures.push((row, text)),
                }
            }
            failures.sort_by_key(|(row, _)| *row);
            Ok((patched(&floats, &parsed)?.into_series(), failures))
        }
    }
}

/// `column` with the values at the given rows replaced.
fn patched<T>(
    column: &ChunkedArray<T>,
    values: &[(IdxSize, T::Native)],
) -> PolarsResult<ChunkedArray<T>>
where
    T: PolarsNumericType,
    ChunkedArray<T>: ChunkZip<T>,
{
    if values.is_empty() {
        return Ok(column.clone());
    }
    let mut patch = vec![T::Native::default(); column.len()];
    let mut at = vec![false; column.len()];
    for (row, value) in values {
        patch[*row as usize] = *value;
        at[*row as usize] = true;
    }
    let patch = ChunkedArray::<T>::from_vec(column.name().clone(), patch);
    patch.zip_with(&BooleanChunked::new("at".into(), at), column)
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
    // The rows whose value was there and did not survive the cast, in any column.
    let mut failures: Vec<IdxSize> = Vec::new();
    for (column, to) in &params.cast {
        let before = df
            .column(column)
            .map_err(err)?
            .as_materialized_series()
            .clone();
        let numeric = to.number_dtype().is_some();
        let text = texts.remove(column);
        // Already of its type with nothing to retry (a CSV column parsed while reading, without
        // a null or NaN, or a typed Parquet column without NaN): nothing to cast or count.
        if text.is_none() && already_cast(&before, *to) {
            nulls.insert(column.clone(), 0);
            continue;
        }
        let (after, failed, first) = match text {
            // Parsed while reading; the text of just the values that did not parse.
            Some(Text::Unparsed(unparsed)) if numeric => {
                let (after, failed) = finish_parsed(&before, unparsed, *to).map_err(err)?;
                let first = failed
                    .first()
                    .map(|(row, text)| (*row as usize, format!("{text:?}")));
                let rows = failed.into_iter().map(|(row, _)| row).collect();
                (after, rows, first)
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
                let failed = crate::io::rows::true_rows(&(present & after.is_null()));
                let first = failed.first().map(|&row| {
                    let value = before
                        .get(row as usize)
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    (row as usize, value)
                });
                (after, failed, first)
            }
        };
        if let Some((row, value)) = first {
            if first_failure.as_ref().is_none_or(|(r, _, _)| row < *r) {
                first_failure = Some((row, value, column.clone()));
            }
        }
        nulls.insert(column.clone(), failed.len());
        df.with_column(after.into_column()).map_err(err)?;
        failures.extend(failed);
    }
    match params.on_cast_error {
        OnCastError::Null => Ok((df, nulls, 0)),
        OnCastError::Drop => {
            if failures.is_empty() {
                return Ok((df, nulls, 0));
            }
            let mut keep = vec![true; df.height()];
            for row in failures {
                keep[row as usize] = false;
            }
            let before = df.height();
            let out = df
                .filter(&BooleanChunked::new("keep".into(), keep))
                .map_err(err)?;
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

/// Whether `column` is already what casting it to `to` makes, so that the cast would change
/// nothing and count nothing: int64 as it is, float64 without a NaN (which the cast makes null).
fn already_cast(column: &Series, to: CastType) -> bool {
    match (to, column.dtype()) {
        (CastType::Int64, DataType::Int64) => true,
        (CastType::Float64, DataType::Float64) => {
            column.f64().is_ok_and(|floats| !floats.is_nan().any())
        }
        _ => false,
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
