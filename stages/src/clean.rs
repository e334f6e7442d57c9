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
        let summary = clean_file(params, input, table_path, CHUNKED_ABOVE, &io.cancel)?;
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

/// A CSV input larger than this many bytes is cleaned a chunk at a time, in two passes (see
/// [`clean_chunked`]); a smaller one (or a Parquet one) is read whole, which takes about 40% less
/// time and holds about four times the file's size: at most ≈ 500 MB below this threshold.
pub const CHUNKED_ABOVE: u64 = 120 << 20;

/// About how many bytes of CSV records a chunk holds.
const CHUNK_BYTES: usize = 32 << 20;

/// Cleans the table at `input` into `output` and returns the summary: whole, or, for a CSV file
/// of more than `chunked_above` bytes, a chunk at a time. Both ways write the same bytes and the
/// same summary.
pub fn clean_file(
    params: &CleanParams,
    input: &std::path::Path,
    output: &std::path::Path,
    chunked_above: u64,
    cancel: &crate::Cancel,
) -> Result<Json, StageError> {
    let size = std::fs::metadata(input)
        .map_err(|e| StageError::new(format!("cannot open `{}`: {e}", input.display())))?
        .len();
    if crate::table::is_csv(input) && size > chunked_above {
        let chunk_bytes = CHUNK_BYTES.min(chunked_above.max(1) as usize);
        return clean_chunked(params, input, output, chunk_bytes, cancel);
    }
    let table = read_input(input, params)?;
    let (mut table, keep, summary) = clean_marked(table, params, input)?;
    match keep {
        None => write_table(&mut table, output)?,
        // The survivors written straight from the table read, never copied whole.
        Some(keep) => crate::table::write_table_kept(&table, &keep, output)?,
    }
    Ok(summary)
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
    if !crate::table::is_csv(input) {
        return Ok(Input {
            df: read_table(input)?,
            text: BTreeMap::new(),
        });
    }
    let map = crate::table::map_file(input)?;
    let text = crate::table::CsvText {
        path: input,
        bytes: map.as_deref().unwrap_or_default(),
        first_line: 2,
    };
    read_csv_input(&text, params)
}

/// [`read_input`] of a CSV document: a whole file or a chunk of one.
fn read_csv_input(csv: &crate::table::CsvText, params: &CleanParams) -> Result<Input, StageError> {
    let text_path = || {
        Ok(Input {
            df: csv.read_strings()?,
            text: BTreeMap::new(),
        })
    };
    if params.cast.is_empty() {
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
    let (df, lenient) = match csv.read_typed(&types, false) {
        Ok(df) => (df, false),
        Err(_) => match csv.read_typed(&types, true) {
            Ok(df) => (df, true),
            Err(_) => return text_path(),
        },
    };
    // The columns must all be there (else the text path reports the missing one).
    if !types.iter().all(|(c, _)| df.column(c).is_ok()) {
        return text_path();
    }
    let plain = csv.check_shape(df.width(), df.height())?;
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
        let fields = csv.fields_at(&rows, &positions)?;
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
        let strings = csv.read_text_columns(&names)?;
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

/// The four steps on a whole table. Each one only marks rows dead in one mask (so that every
/// count is exact and nothing is copied): the table (cast), the rows to keep (`None`: all of
/// them) and the summary.
fn clean_marked(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
) -> Result<(DataFrame, Option<BooleanChunked>, Json), StageError> {
    let mut marked = mark(input, params, source, 0)?;
    let mut gathered = Gathered::for_params(params);
    gather(&marked, params, &mut gathered)?;
    let fences = fences(params, gathered);
    let subset = dedup_subset(params, &marked.df);
    let alive = survivors(
        &mut marked,
        &fences,
        subset.as_deref(),
        &mut |df, columns, alive| crate::rows::repeated_rows(df, columns, alive),
    )?;
    let keep = (marked.counts.kept != marked.df.height()).then_some(alive);
    let summary = summary(&marked.counts, params, &fences, &marked.df);
    Ok((marked.df, keep, summary))
}

/// Cleans a CSV file too large to hold a chunk at a time, in two passes over its chunks, for
/// what the steps need to know of the whole file before they can keep or drop a row:
///
/// 1. the values of the IQR columns (for their quartiles, exact; counted by value while there
///    are few distinct ones), and a 64-bit hash of each row that dedup may compare;
/// 2. every step again, chunk by chunk, with the fences known: a row whose hash came up once in
///    pass 1 repeats nothing; the rest are compared value by value with the first copies kept so
///    far, which are all that is remembered. The survivors go to the output as they come.
///
/// Memory holds a chunk, 8 bytes a row for the hashes (none without dedup) and the first copies
/// of repeated rows. Same bytes out, and the same summary, as [`clean_marked`] of the whole file.
fn clean_chunked(
    params: &CleanParams,
    input: &std::path::Path,
    output: &std::path::Path,
    chunk_bytes: usize,
    cancel: &crate::Cancel,
) -> Result<Json, StageError> {
    // Each chunk read and marked, with the file's row number of its first row.
    let chunks =
        |each: &mut dyn FnMut(Marked) -> Result<(), StageError>| -> Result<(), StageError> {
            let mut reader = crate::table::CsvChunks::open(input, chunk_bytes)?;
            let mut first_row = 0;
            while let Some(chunk) = reader.next_chunk()? {
                if cancel.is_cancelled() {
                    return Err(StageError::new(crate::CANCELLED));
                }
                let text = crate::table::CsvText {
                    path: input,
                    bytes: &chunk.bytes,
                    first_line: chunk.first_line,
                };
                let marked = mark(read_csv_input(&text, params)?, params, input, first_row)?;
                first_row += marked.counts.initial;
                each(marked)?;
            }
            Ok(())
        };
    let mut gathered = Gathered::for_params(params);
    let dedup = !matches!(params.dedup, None | Some(Dedup::All(false)));
    // A vector of hashes per chunk (one vector doubling its way to a hash a row of the file would
    // hold up to three times that while it grows).
    let mut hashes: Vec<Vec<u64>> = Vec::new();
    if params.iqr.is_some() || dedup {
        chunks(&mut |marked| {
            gather(&marked, params, &mut gathered)?;
            if let Some(subset) = dedup_subset(params, &marked.df) {
                let candidates = match &marked.dropna {
                    Some(keep) => &marked.domain & keep,
                    None => marked.domain.clone(),
                };
                let all = crate::rows::row_hashes(&marked.df, &subset).map_err(err)?;
                hashes.push(
                    all.iter()
                        .zip(candidates.iter())
                        .filter_map(|(h, c)| (c == Some(true)).then_some(*h))
                        .collect(),
                );
            }
            Ok(())
        })?;
    }
    let fences = fences(params, gathered);
    let mut deduper = crate::rows::Deduper::new(hashes);
    let mut counts = Counts::default();
    let mut writer: Option<crate::table::TableWriter> = None;
    let mut last: Option<DataFrame> = None;
    chunks(&mut |mut marked| {
        let subset = dedup_subset(params, &marked.df);
        let alive = survivors(
            &mut marked,
            &fences,
            subset.as_deref(),
            &mut |df, columns, alive| deduper.repeats(df, columns, alive),
        )?;
        let kept = marked.df.filter(&alive).map_err(err)?;
        let writer = match &mut writer {
            Some(writer) => writer,
            None => writer.insert(crate::table::TableWriter::create(output, kept.schema())?),
        };
        writer.write(&kept)?;
        counts.add(&marked.counts);
        last = Some(marked.df.clear());
        Ok(())
    })?;
    if let Some(writer) = writer {
        writer.finish()?;
    }
    let empty = last.unwrap_or_default();
    Ok(summary(&counts, params, &fences, &empty))
}

/// A table (a whole file, or a chunk of one) after the steps that look at one row at a time:
/// cast, the domain filter and dropna, each only marking rows.
struct Marked {
    /// The table, cast (without the rows `on_cast_error: drop` dropped).
    df: DataFrame,
    /// The rows that pass the domain filter.
    domain: BooleanChunked,
    /// The rows dropna keeps (`None`: no dropna).
    dropna: Option<BooleanChunked>,
    counts: Counts,
}

/// Where the rows went, summed over chunks.
#[derive(Debug, Default)]
struct Counts {
    initial: usize,
    after_cast: usize,
    removed_cast: usize,
    cast_nulls: BTreeMap<String, usize>,
    removed_domain_by_rule: BTreeMap<String, usize>,
    after_domain: usize,
    after_iqr: usize,
    after_dropna: usize,
    kept: usize,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.initial += other.initial;
        self.after_cast += other.after_cast;
        self.removed_cast += other.removed_cast;
        for (column, n) in &other.cast_nulls {
            *self.cast_nulls.entry(column.clone()).or_default() += n;
        }
        for (column, n) in &other.removed_domain_by_rule {
            *self
                .removed_domain_by_rule
                .entry(column.clone())
                .or_default() += n;
        }
        self.after_domain += other.after_domain;
        self.after_iqr += other.after_iqr;
        self.after_dropna += other.after_dropna;
        self.kept += other.kept;
    }
}

fn live(mask: &BooleanChunked) -> usize {
    mask.sum().unwrap_or(0) as usize
}

/// The row-local steps of `input` (read from `source`; its first row is row `first_row` of the
/// file, for errors): cast, then the domain filter and dropna as masks.
fn mark(
    input: Input,
    params: &CleanParams,
    source: &std::path::Path,
    first_row: usize,
) -> Result<Marked, StageError> {
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

    let mut counts = Counts {
        initial: df.height(),
        ..Default::default()
    };

    // 1. Cast.
    let (df, cast_nulls, removed_cast) = cast(df, text, params, source, first_row)?;
    counts.after_cast = df.height();
    counts.removed_cast = removed_cast;
    counts.cast_nulls = cast_nulls;
    let mut alive = BooleanChunked::full("alive".into(), true, df.height());

    // 2. Domain: one pass evaluates every rule.
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
            counts
                .removed_domain_by_rule
                .insert((*column).clone(), ok.len() - live(&ok));
            alive = alive & ok;
        }
    }
    counts.after_domain = live(&alive);

    // 4a. Missing values (applied after the IQR step, which does not depend on it).
    let mut dropna_keep = None;
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
            dropna_keep = Some(keep);
        }
    }
    Ok(Marked {
        df,
        domain: alive,
        dropna: dropna_keep,
        counts,
    })
}

/// The IQR columns' values in the rows that passed the domain filter, added to `gathered`.
fn gather(
    marked: &Marked,
    params: &CleanParams,
    gathered: &mut [Gathered],
) -> Result<(), StageError> {
    if let Some(iqr) = &params.iqr {
        for (column, values) in iqr.columns.iter().zip(gathered.iter_mut()) {
            values.extend(numeric_values(&marked.df, column, &marked.domain)?);
        }
    }
    Ok(())
}

/// Tukey's fences of one column: its quartiles, and the bounds `k` IQRs beyond them (all `None`
/// when the column has no values).
#[derive(Debug, Clone, Copy)]
struct Fence {
    q1: Option<f64>,
    q3: Option<f64>,
    lower: Option<f64>,
    upper: Option<f64>,
}

/// The fences of every IQR column, from all the values gathered.
fn fences(params: &CleanParams, gathered: Vec<Gathered>) -> Vec<(String, Fence)> {
    let Some(iqr) = &params.iqr else {
        return Vec::new();
    };
    iqr.columns
        .iter()
        .zip(gathered)
        .map(|(column, mut values)| {
            let q1 = values.quantile(0.25);
            let q3 = values.quantile(0.75);
            let (lower, upper) = match (q1, q3) {
                (Some(q1), Some(q3)) => {
                    (Some(q1 - iqr.k * (q3 - q1)), Some(q3 + iqr.k * (q3 - q1)))
                }
                _ => (None, None),
            };
            (
                column.clone(),
                Fence {
                    q1,
                    q3,
                    lower,
                    upper,
                },
            )
        })
        .collect()
}

/// The columns dedup compares (`None`: no dedup).
fn dedup_subset(params: &CleanParams, df: &DataFrame) -> Option<Vec<PlSmallStr>> {
    match &params.dedup {
        None | Some(Dedup::All(false)) => None,
        Some(Dedup::All(true)) => Some(df.get_column_names_owned()),
        Some(Dedup::Subset { subset }) => Some(subset.iter().map(|c| c.as_str().into()).collect()),
    }
}

/// What finds the rows, among those alive, that repeat an earlier row on the given columns.
type Repeats<'a> =
    dyn FnMut(&DataFrame, &[PlSmallStr], &BooleanChunked) -> PolarsResult<Vec<IdxSize>> + 'a;

/// The rows of `marked` that survive the IQR fences, dropna and dedup, counted in its counts.
fn survivors(
    marked: &mut Marked,
    fences: &[(String, Fence)],
    subset: Option<&[PlSmallStr]>,
    repeats: &mut Repeats,
) -> Result<BooleanChunked, StageError> {
    let df = &marked.df;
    // 3. IQR: kept within the fences, or missing (null or NaN, as pandas' `isna`).
    let mut alive = marked.domain.clone();
    for (column, fence) in fences {
        if let (Some(lower), Some(upper)) = (fence.lower, fence.upper) {
            let values = df
                .column(column)
                .and_then(|c| c.cast(&DataType::Float64))
                .map_err(err)?;
            let values = values.f64().map_err(err)?;
            let ok: BooleanChunked = values
                .iter()
                .map(|v| v.is_none_or(|v| v.is_nan() || (v >= lower && v <= upper)))
                .collect();
            alive = alive & ok;
        }
    }
    marked.counts.after_iqr = live(&alive);
    // 4. Missing values, then duplicates.
    if let Some(keep) = &marked.dropna {
        alive = alive & keep.clone();
    }
    marked.counts.after_dropna = live(&alive);
    if let Some(subset) = subset {
        let repeated = repeats(df, subset, &alive).map_err(err)?;
        if !repeated.is_empty() {
            let mut mask: Vec<bool> = alive.iter().map(|a| a == Some(true)).collect();
            for row in repeated {
                mask[row as usize] = false;
            }
            alive = BooleanChunked::new("alive".into(), mask);
        }
    }
    marked.counts.kept = live(&alive);
    Ok(alive)
}

/// The summary: the seed's keys (`initial`, `after_*`, `removed_*`, `iqr_bounds`), then where
/// each row went. `df` has the output's columns.
fn summary(
    counts: &Counts,
    params: &CleanParams,
    fences: &[(String, Fence)],
    df: &DataFrame,
) -> Json {
    let mut summary = serde_json::Map::new();
    summary.insert("initial".into(), json!(counts.initial));
    summary.insert("after_cast".into(), json!(counts.after_cast));
    summary.insert("after_domain".into(), json!(counts.after_domain));
    summary.insert(
        "removed_domain".into(),
        json!(counts.after_cast - counts.after_domain),
    );
    summary.insert("after_iqr".into(), json!(counts.after_iqr));
    summary.insert(
        "removed_iqr".into(),
        json!(counts.after_domain - counts.after_iqr),
    );
    if params.iqr.is_some() {
        let bounds: serde_json::Map<String, Json> = fences
            .iter()
            .map(|(column, f)| {
                (
                    column.clone(),
                    json!({"q1": f.q1, "q3": f.q3, "lower": f.lower, "upper": f.upper}),
                )
            })
            .collect();
        let value = if fences.len() == 1 {
            bounds.values().next().cloned().unwrap_or(Json::Null)
        } else {
            Json::Object(bounds)
        };
        summary.insert("iqr_bounds".into(), value);
    }
    summary.insert("after_dropna_dedup".into(), json!(counts.kept));
    summary.insert(
        "removed_dropna_dedup".into(),
        json!(counts.after_iqr - counts.kept),
    );
    // More than the seed's keys: where each row went.
    summary.insert("removed_cast".into(), json!(counts.removed_cast));
    summary.insert(
        "cast_nulls".into(),
        Json::Object(
            counts
                .cast_nulls
                .iter()
                .map(|(c, n)| (c.clone(), json!(n)))
                .collect(),
        ),
    );
    summary.insert(
        "removed_domain_by_rule".into(),
        Json::Object(
            counts
                .removed_domain_by_rule
                .iter()
                .map(|(c, n)| (c.clone(), json!(n)))
                .collect(),
        ),
    );
    summary.insert(
        "removed_dropna".into(),
        json!(counts.after_iqr - counts.after_dropna),
    );
    summary.insert(
        "removed_dedup".into(),
        json!(counts.after_dropna - counts.kept),
    );
    summary.insert(
        "columns".into(),
        json!(df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()),
    );
    Json::Object(summary)
}

/// The values of a column, gathered a table (or a chunk) at a time, for its exact quantiles:
/// counted by value while there are few distinct ones (a gap in days has 31), listed once there
/// are many. Either way [`Gathered::quantile`] is [`quantile_linear`] of all the values, to the
/// bit.
enum Gathered {
    Counts(PlHashMap<u64, u64>),
    Values(Vec<f64>),
}

/// Distinct values counted before the values are listed instead.
const MAX_DISTINCT: usize = 1 << 16;

impl Gathered {
    /// One for each IQR column.
    fn for_params(params: &CleanParams) -> Vec<Gathered> {
        let columns = params.iqr.as_ref().map_or(0, |iqr| iqr.columns.len());
        (0..columns)
            .map(|_| Gathered::Counts(PlHashMap::default()))
            .collect()
    }

    fn extend(&mut self, values: Vec<f64>) {
        match self {
            Gathered::Values(all) => all.extend(values),
            Gathered::Counts(counts) => {
                for v in values {
                    *counts.entry(v.to_bits()).or_default() += 1;
                }
                if counts.len() > MAX_DISTINCT {
                    let all = counts
                        .iter()
                        .flat_map(|(v, n)| std::iter::repeat_n(f64::from_bits(*v), *n as usize))
                        .collect();
                    *self = Gathered::Values(all);
                }
            }
        }
    }

    /// The `q`-quantile, linearly interpolated between order statistics (pandas' default).
    fn quantile(&mut self, q: f64) -> Option<f64> {
        let counts = match self {
            Gathered::Values(all) => return quantile_linear(all, q),
            Gathered::Counts(counts) => counts,
        };
        let mut sorted: Vec<(f64, u64)> = counts
            .iter()
            .map(|(v, n)| (f64::from_bits(*v), *n))
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let n: u64 = sorted.iter().map(|(_, c)| c).sum();
        if n == 0 {
            return None;
        }
        // The value at 0-based position `at` of the sorted values.
        let nth = |at: u64| {
            let mut seen = 0;
            for (v, c) in &sorted {
                seen += c;
                if at < seen {
                    return *v;
                }
            }
            f64::NAN
        };
        let h = (n - 1) as f64 * q.clamp(0.0, 1.0);
        let lo = h.floor() as u64;
        let frac = h - lo as f64;
        let low = nth(lo);
        if frac == 0.0 || lo + 1 >= n {
            return Some(low);
        }
        Some(low + frac * (nth(lo + 1) - low))
    }
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

/// The cast table, per cast column the values that could not be cast, and the rows dropped.
type CastOutcome = (DataFrame, BTreeMap<String, usize>, usize);

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
            Some((row, value, column)) => {
                let to = params
                    .cast
                    .get(&column)
                    .map(|t| format!("{t:?}").to_lowercase())
                    .unwrap_or_default();
                let row = first_row + row;
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

#[cfg(test)]
mod chunked {
    use super::*;

    fn params(on_cast_error: &str, dedup: Json) -> CleanParams {
        serde_json::from_value(json!({
            "cast": {"id": "int64", "n": "int64", "x": "float64", "y": "float64", "d": "date"},
            "on_cast_error": on_cast_error,
            "domain": {"n": {"between": [-5, 8]}, "s": {"in": ["a", "b", "c"]}},
            "iqr": {"columns": ["x", "y"], "k": 1.0},
            "dropna": {"subset": ["n", "x"], "how": "all"},
            "dedup": dedup,
        }))
        .unwrap()
    }

    /// A file of `rows` rows from a fixed generator: bad numbers (`oops`, ` 4 `, `7.0`, `nan`,
    /// empty), values out of the domain, outliers, many repeated rows near and far apart (NaN
    /// and empty ones too), and, when `quoted`, quoted fields (some holding newlines).
    fn file(rows: usize, seed: u64, quoted: bool) -> String {
        let mut state = seed | 1;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let mut text = String::from("id,n,x,y,s,d\n");
        let mut lines: Vec<String> = Vec::new();
        for i in 0..rows {
            let line = if !lines.is_empty() && next(5) == 0 {
                // A repeat of an earlier row, near or far.
                lines[next(lines.len() as u64) as usize].clone()
            } else {
                let n = match next(12) {
                    0 => "oops".to_owned(),
                    1 => " 4 ".to_owned(),
                    2 => "7.0".to_owned(),
                    3 => String::new(),
                    _ => (next(16) as i64 - 6).to_string(),
                };
                let x = match next(15) {
                    0 => "nan".to_owned(),
                    1 => String::new(),
                    2 => "2.x".to_owned(),
                    3 => "500".to_owned(),
                    _ => format!("{}", next(40) as f64 / 4.0),
                };
                let y = match next(20) {
                    0 => "-0.0".to_owned(),
                    1 => "0".to_owned(),
                    _ => format!("{}", next(1000) as f64 / 10.0 - 30.0),
                };
                let s = match next(9) {
                    0 if quoted => "\"a,\nb\"".to_owned(),
                    1 if quoted => "\"c\"".to_owned(),
                    2 => "z".to_owned(),
                    _ => ["a", "b", "c"][next(3) as usize].to_owned(),
                };
                let d = match next(10) {
                    0 => "2024-02-30".to_owned(),
                    _ => format!("2024-03-{:02}", 1 + next(28)),
                };
                format!("{},{n},{x},{y},{s},{d}", i / 3)
            };
            lines.push(line.clone());
            text.push_str(&line);
            text.push_str(if next(7) == 0 { "\r\n" } else { "\n" });
        }
        text
    }

    fn run(csv: &str, params: &CleanParams, chunked_above: u64) -> Result<(Json, Vec<u8>), String> {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.csv");
        let output = dir.path().join("out.parquet");
        std::fs::write(&input, csv).unwrap();
        match clean_file(params, &input, &output, chunked_above, &Default::default()) {
            Ok(summary) => Ok((summary, std::fs::read(&output).unwrap())),
            Err(e) => Err(e
                .message
                .replace(&dir.path().display().to_string(), "[TMP]")),
        }
    }

    /// Chunks of a few hundred bytes to a few kilobytes give the very file and summary the
    /// whole table gives, whatever the params.
    #[test]
    fn chunks_give_the_whole_files_bytes_and_summary() {
        let dedups = [json!(true), json!({"subset": ["id", "s"]}), json!(false)];
        for (k, (seed, quoted)) in [(1u64, false), (2, true), (3, false)]
            .into_iter()
            .enumerate()
        {
            let csv = file(3_000, seed, quoted);
            for on_cast_error in ["null", "drop"] {
                let params = params(on_cast_error, dedups[k].clone());
                let whole = run(&csv, &params, u64::MAX).unwrap();
                assert!(
                    whole.0["removed_iqr"].as_u64() > Some(0)
                        && whole.0["removed_domain"].as_u64() > Some(0),
                    "{}",
                    whole.0
                );
                if k < 2 {
                    assert!(whole.0["removed_dedup"].as_u64() > Some(100), "{}", whole.0);
                }
                for chunk in [300, 1_000, 20_000] {
                    let parts = run(&csv, &params, chunk).unwrap();
                    assert_eq!(
                        parts.0, whole.0,
                        "seed {seed}, {on_cast_error}, chunk {chunk}"
                    );
                    assert!(
                        parts.1 == whole.1,
                        "seed {seed}, {on_cast_error}, chunk {chunk}: the files differ"
                    );
                }
            }
        }
    }

    /// Without IQR and dedup there is one pass; the results are still the whole table's.
    #[test]
    fn row_local_steps_take_one_pass() {
        let csv = file(2_000, 9, true);
        let mut params = params("null", json!(false));
        params.iqr = None;
        let whole = run(&csv, &params, u64::MAX).unwrap();
        let parts = run(&csv, &params, 500).unwrap();
        assert_eq!(parts.0, whole.0);
        assert!(parts.1 == whole.1);
    }

    /// Errors name the file's line, not the chunk's.
    #[test]
    fn errors_name_the_files_line() {
        let mut csv = file(2_000, 4, false);
        let failing = run(&csv, &params("fail", json!(true)), 1_000).unwrap_err();
        assert_eq!(
            failing,
            run(&csv, &params("fail", json!(true)), u64::MAX).unwrap_err()
        );
        assert!(failing.contains("(on_cast_error: fail)"), "{failing}");
        csv.push_str("1,2\n");
        let ragged = run(&csv, &params("null", json!(true)), 1_000).unwrap_err();
        assert_eq!(
            ragged,
            "`[TMP]/in.csv`: line 2002: expected 6 fields (as in the header), found 2"
        );
        assert_eq!(
            ragged,
            run(&csv, &params("null", json!(true)), u64::MAX).unwrap_err()
        );
        let missing = run("a,b\n1,2\n3,4\n", &params("null", json!(true)), 4).unwrap_err();
        assert_eq!(
            missing,
            run("a,b\n1,2\n3,4\n", &params("null", json!(true)), u64::MAX).unwrap_err()
        );
    }

    /// Quantiles from counted values are those of the listed values, to the bit (−0 and 0 apart).
    #[test]
    fn counted_quantiles_are_the_listed_ones() {
        use proptest::prelude::*;
        proptest!(|(values in proptest::collection::vec(prop_oneof![Just(-0.0f64), Just(0.0), (-5i32..40i32).prop_map(|v| v as f64 / 4.0)], 0..200), q in 0.0f64..1.0)| {
            let mut counted = Gathered::Counts(Default::default());
            counted.extend(values.clone());
            let mut listed = values.clone();
            let want = quantile_linear(&mut listed, q);
            let got = counted.quantile(q);
            prop_assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits));
        });
    }

    proptest::proptest! {
        /// Any well-formed file, in chunks of any size, cleans as the whole file does.
        #[test]
        fn any_file_cleans_the_same_in_chunks(
            rows in proptest::collection::vec((0u8..4, 0u8..6, 0u8..5, 0u8..3), 0..80),
            chunk in 1u64..200,
        ) {
            let mut csv = String::from("id,n,x,y,s,d\n");
            for (id, n, x, s) in &rows {
                let n = ["1", "x", "", "9", "-2", "3.0"][*n as usize];
                let x = ["1.5", "nan", "", "100", "2"][*x as usize];
                let s = ["a", "z", "\"b\""][*s as usize];
                csv.push_str(&format!("{id},{n},{x},1,{s},2024-01-01\n"));
            }
            let params = params("null", json!(true));
            let whole = run(&csv, &params, u64::MAX);
            let parts = run(&csv, &params, chunk);
            match (whole, parts) {
                (Ok(w), Ok(p)) => {
                    proptest::prop_assert_eq!(&p.0, &w.0);
                    proptest::prop_assert!(p.1 == w.1, "the files differ");
                }
                (w, p) => proptest::prop_assert_eq!(p.map(|p| p.0), w.map(|w| w.0)),
            }
        }
    }
}
