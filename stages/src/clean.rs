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

impl CastType {
    /// The polars type of an int64 or float64 cast (`None` for the others).
    fn number_dtype(self) -> Option<DataType> {
        match self {
            CastType::Int64 => Some(DataType::Int64),
            CastType::Float64 => Some(DataType::Float64),
            CastType::String | CastType::Bool | CastType::Date => None,
        }
    }
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
    const VERSION: u32 = 2;
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

    /// `clean` keeps every column of its input, in order.
    fn output_columns(
        _params: &CleanParams,
        inputs: &[Option<Vec<String>>],
    ) -> Vec<crate::OutputColumns> {
        match inputs.first() {
            Some(Some(columns)) => vec![crate::OutputColumns {
                output: "table",
                position: 0,
                file: None,
                columns: columns.clone(),
            }],
            _ => Vec::new(),
        }
    }

    fn run(params: &CleanParams, io: &StageIo) -> Result<StageReport, StageError> {
        let input = io.input(0)?;
        let table_path = io.output("table", 0)?;
        let summary_path = io.output_opt("summary", 1);
        let table = read_input(input, params)?;
        let (mut table, keep, summary) = clean_marked(table, params, input)?;
        match keep {
            None => write_table(&mut table, table_path)?,
            // The survivors written straight from the table read, never copied whole.
            Some(keep) => crate::table::write_table_kept(&table, &keep, table_path)?,
        }
        if let Some(path) = summary_path {
            let mut text = serde_json::to_string_pretty(&summary)
                .map_err(|e| StageError::new(e.to_string()))?;
            text.push('\n');
            std::fs::write(path, text)
                .map_err(|e| StageError::new(format!("cannot write `{}`: {e}", path.display())))?;
        }
        Ok(StageReport {
            summary,
            warnings: Vec::new(),
            checks: Vec::new(),
        })
    }
}

/// The table to clean, and for some of its int64/float64 cast columns (parsed while reading)
/// their text as read.
struct Input {
    df: DataFrame,
    text: BTreeMap<String, Text>,
}

/// The text of a column parsed while reading.
enum Text {
    /// All of it.
    Full(Series),
    /// Row → text of just the values that did not parse (empty fields left out).
    Unparsed(Vec<(IdxSize, String)>),
}

/// Reads the input. A CSV's int64/float64 cast columns are parsed while reading (the cast is then
/// a no-op) and nothing else is held twice: a strict typed read first; when some value does not
/// parse, a lenient one, plus the text of just the columns where values went missing, for `cast`
/// to retry leniently and count. Anything unusual (no cast, a bool or date cast, a missing column,
/// a broken file) takes the text path, whose errors say where the problem is.
fn read_input(input: &std::path::Path, params: &CleanParams) -> Result<Input, StageError> {
    let text_path = || {
        Ok(Input {
            df: read_table(input)?,
            text: BTreeMap::new(),
        })
    };
    if !crate::table::is_csv(input) || params.cast.is_empty() {
        return text_path();
    }
    let types: Vec<(String, DataType)> = params
        .cast
        .iter()
        .filter_map(|(column, to)| Some((column.clone(), to.number_dtype()?)))
        .collect();
    if types.is_empty() {
        return text_path();
    }
    let (df, lenient) = match crate::table::read_csv_typed(input, &types, false) {
        Ok(df) => (df, false),
        Err(_) => match crate::table::read_csv_typed(input, &types, true) {
            Ok(df) => (df, true),
            Err(_) => return text_path(),
        },
    };
    // The columns must all be there (else the text path reports the missing one).
    if !types.iter().all(|(c, _)| df.column(c).is_ok()) {
        return text_path();
    }
    let plain = crate::table::check_csv_shape(input, df.width(), df.height())?;
    let mut text = BTreeMap::new();
    if !lenient {
        return Ok(Input { df, text });
    }
    // Where a value is null it was empty or did not parse: its text is needed (and a NaN's).
    let mut missing = Vec::new();
    for (name, _) in &types {
        let column = df.column(name).map_err(err)?;
        let mut unread = column.is_null();
        if let Ok(floats) = column.f64() {
            // "nan" parses, but counts as a value that could not be cast, named in errors.
            unread = unread | floats.is_nan();
        }
        if unread.any() {
            let nulls: Vec<IdxSize> = unread
                .iter()
                .enumerate()
                .filter(|(_, n)| *n == Some(true))
                .map(|(row, _)| row as IdxSize)
                .collect();
            missing.push((name.clone(), nulls));
        }
    }
    if missing.is_empty() {
        return Ok(Input { df, text });
    }
    if plain {
        // Just the lines with a null, split by hand.
        let mut rows: Vec<IdxSize> = missing
            .iter()
            .flat_map(|(_, r)| r.iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let positions: Vec<usize> = missing
            .iter()
            .map(|(name, _)| df.get_column_index(name).unwrap_or(usize::MAX))
            .collect();
        let fields = crate::table::csv_fields_at(input, &rows, &positions)?;
        for (k, (name, nulls)) in missing.into_iter().enumerate() {
            let unparsed: Vec<(IdxSize, String)> = nulls
                .into_iter()
                .filter_map(|row| {
                    let at = rows.binary_search(&row).ok()?;
                    let value = &fields[at][k];
                    (!value.is_empty()).then(|| (row, value.clone()))
                })
                .collect();
            text.insert(name, Text::Unparsed(unparsed));
        }
    } else {
        let names: Vec<String> = missing.into_iter().map(|(name, _)| name).collect();
        let strings = crate::table::read_csv_text_columns(input, &names)?;
        if strings.height() != df.height() {
            return text_path();
        }
        for column in strings.into_columns() {
            text.insert(
                column.name().to_string(),
                Text::Full(column.take_materialized_series()),
            );
        }
    }
    Ok(Input { df, text })
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
    clean_input(
        Input {
            df,
            text: BTreeMap::new(),
        },
        params,
        source,
    )
}

/// The four steps, and the survivors taken from the table.
fn clean_input(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<(DataFrame, Json), StageError> {
    let (df, keep, summary) = clean_marked(input, params, source)?;
    let df = match keep {
        Some(keep) => df.filter(&keep).map_err(err)?,
        None => df,
    };
    Ok((df, summary))
}

/// The four steps. Each one only marks rows dead in one mask (so that every count is exact and
/// nothing is copied): the table (cast), the rows to keep (`None`: all of them) and the summary.
fn clean_marked(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<(DataFrame, Option<BooleanChunked>, Json), StageError> {
    let Input { df, text } = input;
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
    let (df, cast_nulls, removed_cast) = cast(df, text, params, source)?;
    summary.insert("after_cast".into(), json!(df.height()));
    let mut alive = BooleanChunked::full("alive".into(), true, df.height());
    let live = |mask: &BooleanChunked| mask.sum().unwrap_or(0) as usize;

    // 2. Domain: one pass evaluates every rule.
    let mut by_rule = serde_json::Map::new();
    let mut rules = Vec::new();
    for (column, rule) in &params.domain {
        rules.push((column, domain_expr(&df, column, rule)?));
    }
    if !rules.is_empty() {
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
        for (column, _) in &rules {
            let ok = masks
                .column(column)
                .and_then(|c| c.bool().cloned())
                .map_err(err)?;
            by_rule.insert((*column).clone(), json!(ok.len() - live(&ok)));
            alive = alive & ok;
        }
    }
    let after_domain = live(&alive);
    summary.insert("after_domain".into(), json!(after_domain));
    summary.insert("removed_domain".into(), json!(df.height() - after_domain));

    // 3. IQR, the bounds of every column from the rows that passed the domain filter.
    let mut bounds = serde_json::Map::new();
    if let Some(iqr) = &params.iqr {
        let mut keep = alive.clone();
        for column in &iqr.columns {
            let mut values = numeric_values(&df, column, &alive)?;
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
                let values = df
                    .column(column)
                    .and_then(|c| c.cast(&DataType::Float64))
                    .map_err(err)?;
                let values = values.f64().map_err(err)?;
                // Kept: within the fences, or missing (null or NaN, as pandas' `isna`).
                let ok: BooleanChunked = values
                    .iter()
                    .map(|v| v.is_none_or(|v| v.is_nan() || (v >= lower && v <= upper)))
                    .collect();
                keep = keep & ok;
            }
        }
        alive = keep;
    }
    let after_iqr = live(&alive);
    summary.insert("after_iqr".into(), json!(after_iqr));
    summary.insert("removed_iqr".into(), json!(after_domain - after_iqr));
    if let Some(iqr) = &params.iqr {
        let value = if iqr.columns.len() == 1 {
            bounds.values().next().cloned().unwrap_or(Json::Null)
        } else {
            Json::Object(bounds)
        };
        summary.insert("iqr_bounds".into(), value);
    }

    // 4. Missing values, then duplicates.
    if let Some(dropna) = &params.dropna {
        let columns: Vec<String> = dropna.subset.clone().unwrap_or_else(|| {
            df.get_column_names()
                .iter()
                .map(|c| c.to_string())
                .collect()
        });
        if !columns.is_empty() {
            let missing: Vec<Expr> = columns.iter().map(|c| missing_expr(&df, c)).collect();
            let drop = match dropna.how {
                How::Any => any_horizontal(missing).map_err(err)?,
                How::All => all_horizontal(missing).map_err(err)?,
            };
            let masks = df
                .clone()
                .lazy()
                .select([drop.not().alias("keep")])
                .collect()
                .map_err(err)?;
            let keep = masks
                .column("keep")
                .and_then(|c| c.bool().cloned())
                .map_err(err)?;
            alive = alive & keep;
        }
    }
    let after_dropna = live(&alive);
    let removed_dropna = after_iqr - after_dropna;
    let subset: Option<Vec<PlSmallStr>> = match &params.dedup {
        None | Some(Dedup::All(false)) => None,
        Some(Dedup::All(true)) => Some(df.get_column_names_owned()),
        Some(Dedup::Subset { subset }) => Some(subset.iter().map(|c| c.as_str().into()).collect()),
    };
    if let Some(subset) = subset {
        let repeats = crate::rows::repeated_rows(&df, &subset, &alive).map_err(err)?;
        if !repeats.is_empty() {
            let mut mask: Vec<bool> = alive.iter().map(|a| a == Some(true)).collect();
            for row in repeats {
                mask[row as usize] = false;
            }
            alive = BooleanChunked::new("alive".into(), mask);
        }
    }
    let kept = live(&alive);
    let keep = (kept != df.height()).then_some(alive);
    summary.insert("after_dropna_dedup".into(), json!(kept));
    summary.insert("removed_dropna_dedup".into(), json!(after_iqr - kept));

    // More than the seed's keys: where each row went.
    summary.insert("removed_cast".into(), json!(removed_cast));
    summary.insert("cast_nulls".into(), Json::Object(cast_nulls));
    summary.insert("removed_domain_by_rule".into(), Json::Object(by_rule));
    summary.insert("removed_dropna".into(), json!(removed_dropna));
    summary.insert("removed_dedup".into(), json!(after_dropna - kept));
    summary.insert(
        "columns".into(),
        json!(df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()),
    );
    Ok((df, keep, Json::Object(summary)))
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

/// Finishes an int64/float64 column parsed while reading, given the text of the values that did
/// not parse (row, text; empty fields left out): each is parsed again leniently, as
/// [`cast_number`] does, and a float NaN counts as missing. Returns the column and the rows whose
/// value could not be cast, with their text, in row order.
fn finish_parsed(
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

/// Finishes the cast of a text column to int64 or float64 from `direct`, polars' parse of it
/// (done by `cast` or while reading the CSV): the values polars rejected are parsed again
/// leniently (surrounding spaces, `7.0` for an int, `NaN` as missing).
fn cast_number(text: &Series, direct: Series, to: CastType) -> PolarsResult<Series> {
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

fn cast(
    df: DataFrame,
    mut texts: BTreeMap<String, Text>,
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

/// The non-missing values of a numeric column in the `alive` rows, as f64.
fn numeric_values(
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

    fn params(on_cast_error: &str) -> CleanParams {
        serde_json::from_value(json!({
            "cast": {"id": "int64", "n": "int64", "x": "float64", "s": "string"},
            "on_cast_error": on_cast_error,
            "domain": {"n": {"between": [-5, 8]}},
            "iqr": {"columns": ["x"]},
            "dropna": {"subset": ["n", "x"], "how": "all"},
            "dedup": true,
        }))
        .unwrap()
    }

    /// Reads `csv` the way the stage does (typed while reading, lenient, sparse text) and the
    /// text way, cleans both, and checks they agree exactly; returns how the stage read it.
    fn agree(csv: &str, on_cast_error: &str) -> (Json, bool, Option<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, csv).unwrap();
        let params = params(on_cast_error);
        let input = read_input(&path, &params).unwrap();
        let typed = input.df.column("id").unwrap().dtype() == &DataType::Int64;
        let sparse = input
            .text
            .values()
            .next()
            .map(|t| matches!(t, Text::Unparsed(_)));
        let a = clean_input(input, &params, &path);
        let b = clean(read_table(&path).unwrap(), &params, &path);
        match (a, b) {
            (Ok((a, sa)), Ok((b, sb))) => {
                assert_eq!(sa, sb);
                assert!(a.equals_missing(&b), "{a}\n{b}");
                (sa, typed, sparse)
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.message, b.message);
                (json!(a.message), typed, sparse)
            }
            (a, b) => panic!("{a:?}\n{b:?}"),
        }
    }

    const VALID: &str =
        "id,n,x,s\n1,5,1.5,a\n2,,NaN,b\n3,-2,,a\n3,-2,,a\n4,9,100.0,c\n5,3,2.25,\n6,4,-0.5,a\n7,2,3,b\n";
    const DIRTY: &str =
        "id,n,x,s\n1,5,1.5,a\n2,7.0,nan,b\n3, 4 ,,a\n3,x,,a\n,9,100.0,c\n5,3,2.x,\n6,4,-0.5,a\n7,2,3,b\n6,4,-0.5,a";

    /// Every value parses: one strict typed read, nothing read as text.
    #[test]
    fn a_clean_file_is_read_typed_once() {
        let (summary, typed, sparse) = agree(VALID, "null");
        assert!(typed);
        assert_eq!(sparse, None);
        assert_eq!(
            summary["cast_nulls"]["x"], 1,
            "NaN counts as a value that could not be cast"
        );
    }

    /// Values that do not parse: a lenient typed read plus the text of just those lines.
    #[test]
    fn unparsed_values_are_read_again_from_their_lines() {
        let (summary, typed, sparse) = agree(DIRTY, "null");
        assert!(typed);
        assert_eq!(sparse, Some(true));
        assert_eq!(
            summary["cast_nulls"],
            json!({"id": 0, "n": 1, "x": 2, "s": 0})
        );
        agree(DIRTY, "drop");
        let (message, _, _) = agree(DIRTY, "fail");
        assert!(
            message.as_str().unwrap().ends_with(
                "line 3: cannot cast \"nan\" in column `x` to float64 (on_cast_error: fail)"
            ),
            "{message}"
        );
        // CRLF line ends.
        agree(&DIRTY.replace('\n', "\r\n"), "null");
    }

    /// Quotes (or blank lines) make line numbers and rows part ways: the whole column is read
    /// as text instead.
    #[test]
    fn quoted_files_read_whole_columns_as_text() {
        let quoted = DIRTY.replace("6,4,-0.5,a\n", "6,4,-0.5,\"a,\nb\"\n");
        let (_, typed, sparse) = agree(&quoted, "null");
        assert!(typed);
        assert_eq!(sparse, Some(false));
        let (_, _, sparse) = agree(&DIRTY.replace("\n5,", "\n\n5,"), "null");
        assert_eq!(sparse, Some(false));
    }
}
