//! `aggregate`: group-by with declarative aggregations and derived columns in SQL.
//!
//! Aggregations skip nulls as pandas does (`count` counts non-null values, `first`/`last` take
//! the first/last non-null value, `n_unique` ignores nulls, `std` has ddof = 1). Rows with a null
//! key are dropped; the output is sorted by the keys. Derived columns are polars SQL expressions
//! over the keys and the aggregated columns.

use std::collections::BTreeMap;

use polars::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::io::table::{is_csv, require_columns, write_table, TableWriter};
use crate::ports::{Inputs, Port};
use crate::{BuiltinStage, StageError, StageIo, StageReport};

/// Params of `aggregate`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateParams {
    /// The group keys.
    pub by: Vec<String>,
    /// Output column → aggregation, e.g. `max_days: {max: days_since_prior_order}`.
    pub aggs: BTreeMap<String, Agg>,
    /// Output column → polars SQL expression over the keys and aggregated columns, e.g.
    /// `CASE WHEN max_days = 30 THEN NULL ELSE max_days END`.
    #[serde(default)]
    pub derive: BTreeMap<String, String>,
    /// The output columns, in order (default: keys, aggregations, derived columns).
    #[serde(default)]
    pub select: Option<Vec<String>>,
}

/// One aggregation of one column.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Agg {
    /// Non-null values; `"*"` counts the rows of the group.
    Count(String),
    Sum(String),
    Mean(String),
    Min(String),
    Max(String),
    NUnique(String),
    First(String),
    Last(String),
    /// Sample standard deviation (ddof = 1).
    Std(String),
    Median(String),
    /// Linear interpolation, as pandas.
    Quantile {
        column: String,
        q: f64,
    },
}

impl Agg {
    fn column(&self) -> &str {
        match self {
            Agg::Count(c)
            | Agg::Sum(c)
            | Agg::Mean(c)
            | Agg::Min(c)
            | Agg::Max(c)
            | Agg::NUnique(c)
            | Agg::First(c)
            | Agg::Last(c)
            | Agg::Std(c)
            | Agg::Median(c) => c,
            Agg::Quantile { column, .. } => column,
        }
    }

    fn expr(&self) -> Expr {
        match self {
            Agg::Count(c) if c == "*" => len(),
            Agg::Count(c) => col(c.as_str()).count(),
            Agg::Sum(c) => col(c.as_str()).sum(),
            Agg::Mean(c) => col(c.as_str()).mean(),
            Agg::Min(c) => col(c.as_str()).min(),
            Agg::Max(c) => col(c.as_str()).max(),
            Agg::NUnique(c) => col(c.as_str()).drop_nulls().n_unique(),
            Agg::First(c) => col(c.as_str()).drop_nulls().first(),
            Agg::Last(c) => col(c.as_str()).drop_nulls().last(),
            Agg::Std(c) => col(c.as_str()).std(1),
            Agg::Median(c) => col(c.as_str()).median(),
            Agg::Quantile { column, q } => {
                col(column.as_str()).quantile(lit(*q), QuantileMethod::Linear)
            }
        }
    }
}

/// The built-in `aggregate` stage.
pub struct Aggregate;

/// The aggregated table.
const TABLE: Port = Port::required("table", 0);

impl BuiltinStage for Aggregate {
    const NAME: &'static str = "aggregate";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "group-by with declarative aggregations and derived SQL columns";
    type Params = AggregateParams;

    const INPUTS: Inputs = Inputs::One;
    const OUTPUTS: &'static [Port] = &[TABLE];

    /// Ranges of about 2²⁰ rows at a time: about its input's size beside a fixed part.
    fn memory(_: &AggregateParams, inputs: &[std::path::PathBuf]) -> Option<u64> {
        Some(crate::memory::linear(
            80.0,
            1.0,
            crate::memory::total(inputs),
        ))
    }

    fn input_columns(params: &AggregateParams) -> Vec<crate::InputColumn> {
        crate::InputColumn::of_the_input(wanted_columns(params))
    }

    fn output_columns(
        params: &AggregateParams,
        _inputs: &[Option<Vec<String>>],
    ) -> Vec<crate::OutputColumns> {
        let columns = match &params.select {
            Some(select) => select.clone(),
            None => {
                let mut columns: Vec<String> = params.by.clone();
                for name in params.aggs.keys().chain(params.derive.keys()) {
                    if !columns.contains(name) {
                        columns.push(name.clone());
                    }
                }
                columns
            }
        };
        vec![crate::OutputColumns {
            output: TABLE,
            file: None,
            columns,
        }]
    }

    fn run(params: &AggregateParams, io: &StageIo) -> Result<StageReport, StageError> {
        let input = io.input(0)?;
        let output = io.output(TABLE)?;
        let (groups, columns) = aggregate_file(
            params,
            input,
            output,
            crate::io::partition::PASS_ROWS,
            &io.cancel,
        )?;
        Ok(StageReport {
            summary: json!({"groups": groups, "columns": columns}),
            warnings: Vec::new(),
            checks: Vec::new(),
        })
    }
}

/// Aggregates the table at `input` into `output`, a range of the first key at a time when it
/// is a Parquet table of more than `pass_rows` rows (the file is the same either way: each group
/// lies in one range and meets its rows in file order). Returns the number of groups and the
/// output's columns.
fn aggregate_file(
    params: &AggregateParams,
    input: &std::path::Path,
    output: &std::path::Path,
    pass_rows: usize,
    cancel: &crate::Cancel,
) -> Result<(usize, Vec<String>), StageError> {
    let names = |df: &DataFrame| -> Vec<String> {
        df.get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect()
    };
    let columns = read_columns(params);
    let ranges = match params.by.first() {
        Some(key)
            if !is_csv(input)
                && crate::io::table::columns_of(input)
                    .is_ok_and(|present| columns.iter().all(|c| present.contains(c))) =>
        {
            crate::io::partition::KeyRanges::plan(input, key, pass_rows)?
        }
        _ => crate::io::partition::KeyRanges::whole(""),
    };
    if ranges.is_whole() {
        let mut out = aggregate(read_typed(input, params)?, params, input)?;
        write_table(&mut out, output)?;
        return Ok((out.height(), names(&out)));
    }
    let sorted = match params.by.as_slice() {
        [_] => ranges.sorted(),
        _ => false,
    };
    let mut writer: Option<TableWriter> = None;
    let (mut groups, mut columns_out) = (0, Vec::new());
    for range in 0..ranges.count() {
        if cancel.is_cancelled() {
            return Err(StageError::new(crate::CANCELLED));
        }
        let part = crate::io::partition::read_range(input, &columns, ranges.predicate(range))?;
        let out = match aggregate_in_order(part, params, input, sorted) {
            Ok(out) => out,
            // The whole table's error, word for word.
            Err(error) => {
                return Err(aggregate(read_typed(input, params)?, params, input)
                    .err()
                    .unwrap_or(error))
            }
        };
        let writer = match &mut writer {
            Some(writer) => writer,
            None => {
                columns_out = names(&out);
                writer.insert(TableWriter::create(output, out.schema())?)
            }
        };
        writer.write(&out)?;
        groups += out.height();
    }
    if let Some(writer) = writer {
        writer.finish()?;
    }
    Ok((groups, columns_out))
}

/// The columns the params read: the keys, then each aggregated column once.
fn read_columns(params: &AggregateParams) -> Vec<String> {
    let mut columns: Vec<String> = params.by.clone();
    for agg in params.aggs.values() {
        let column = agg.column();
        if column != "*" && !columns.iter().any(|c| c == column) {
            columns.push(column.to_owned());
        }
    }
    columns
}

/// Parquet as it is (just the columns the params name); CSV with types inferred (aggregating
/// strings would be meaningless).
fn read_typed(path: &std::path::Path, params: &AggregateParams) -> Result<DataFrame, StageError> {
    if !is_csv(path) {
        return crate::io::table::read_parquet(path, Some(&read_columns(params)));
    }
    crate::io::table::read_table_inferred(path)
}

/// Groups `df` (read from `source`, named in errors) as `params` says.
pub fn aggregate(
    df: DataFrame,
    params: &AggregateParams,
    source: &std::path::Path,
) -> Result<DataFrame, StageError> {
    let sorted = match params.by.as_slice() {
        [key] => crate::io::partition::rows_sorted(&df, key),
        _ => false,
    };
    aggregate_in_order(df, params, source, sorted)
}

/// [`aggregate`], given whether the whole table's rows with a key are in key order (with one
/// key; `df` may be one range of that table). polars then groups by slices instead of by
/// hashing, faster; its float sums differ from the hashed grouping's in the last bits, so the
/// choice is the whole table's, and a range is grouped as the whole table would be.
fn aggregate_in_order(
    df: DataFrame,
    params: &AggregateParams,
    source: &std::path::Path,
    sorted: bool,
) -> Result<DataFrame, StageError> {
    require_columns(&df, wanted_columns(params), source)?;
    let keys: Vec<Expr> = params.by.iter().map(|k| col(k.as_str())).collect();
    let not_null = params
        .by
        .iter()
        .map(|k| col(k.as_str()).is_not_null())
        .reduce(|a, b| a.and(b))
        .unwrap_or(lit(true));
    let aggs: Vec<Expr> = params
        .aggs
        .iter()
        .map(|(name, agg)| agg.expr().alias(name.as_str()))
        .collect();
    let df = match params.by.as_slice() {
        [key] if sorted && df.column(key).is_ok() => {
            crate::io::partition::in_key_order(&df, key)
                .map_err(|e| StageError::new(format!("aggregating `{}`: {e}", source.display())))?
        }
        _ => df,
    };
    let grouped = df
        .lazy()
        .filter(not_null)
        .group_by(keys)
        .agg(aggs)
        .sort(
            params.by.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            SortMultipleOptions::default(),
        )
        .collect()
        .map_err(|e| StageError::new(format!("aggregating `{}`: {e}", source.display())))?;
    // Each derived column on its own, over the grouped table, so that an error names it.
    let mut derived = Vec::new();
    for (name, sql) in &params.derive {
        let column = polars::sql::sql_expr(sql)
            .and_then(|expr| {
                grouped
                    .clone()
                    .lazy()
                    .select([expr.alias(name.as_str())])
                    .collect()
            })
            .map_err(|e| {
                StageError::new(format!(
                    "derived column `{name}` (param `derive.{name}`): {e}"
                ))
                .at_param(crate::pointer::of(&["derive", name]))
            })?;
        derived.extend(column.columns().iter().cloned());
    }
    let mut out = grouped;
    for column in derived {
        out.with_column(column)
            .map_err(|e| StageError::new(e.to_string()))?;
    }
    match &params.select {
        Some(select) => out
            .lazy()
            .select(select.iter().map(|c| col(c.as_str())).collect::<Vec<_>>())
            .collect()
            .map_err(|e| StageError::new(format!("param `select`: {e}"))),
        None => Ok(out),
    }
}

/// A name in Spark SQL: backquoted, backquotes doubled.
/// The same aggregation as one Spark SQL query over `source` (a table expression: a view's
/// name, or `` parquet.`file:///…` ``), for `engine: spark`: rows with a null key dropped,
/// pandas' null-skipping aggregations, groups sorted by the keys, the derived columns (Spark SQL
/// expressions there), the selected columns in order. `Err((param, why))` names a param with
/// no exact equivalent on Spark: `first`/`last` (Spark has no file order to take them in) and
/// `n_unique` (an unsigned 32-bit count locally, a 64-bit one there).
pub fn spark_sql(params: &AggregateParams, source: &str) -> Result<String, (String, String)> {
    let mut aggs = Vec::new();
    for (name, agg) in &params.aggs {
        let c = crate::spark_sql::ident(agg.column());
        let expr = match agg {
            Agg::Count(column) if column == "*" => "count(1)".to_owned(),
            Agg::Count(_) => format!("count({c})"),
            // polars sums an empty or all-null group to 0; Spark to NULL.
            Agg::Sum(_) => format!("coalesce(sum({c}), 0)"),
            Agg::Mean(_) => format!("avg({c})"),
            Agg::Min(_) => format!("min({c})"),
            Agg::Max(_) => format!("max({c})"),
            Agg::Std(_) => format!("stddev_samp({c})"),
            Agg::Median(_) => format!("percentile({c}, 0.5)"),
            Agg::Quantile { q, .. } => format!("percentile({c}, {q:?})"),
            Agg::First(_) | Agg::Last(_) | Agg::NUnique(_) => {
                let why = match agg {
                    Agg::NUnique(_) => "`n_unique` counts in an unsigned 32-bit column locally and in a 64-bit one on Spark",
                    _ => "`first` and `last` take values in file order, which Spark does not keep",
                };
                return Err((crate::pointer::of(&["aggs", name]), why.to_owned()));
            }
        };
        aggs.push(format!("{expr} AS {}", crate::spark_sql::ident(name)));
    }
    let keys: Vec<String> = params
        .by
        .iter()
        .map(|k| crate::spark_sql::ident(k))
        .collect();
    let not_null = if keys.is_empty() {
        "TRUE".to_owned()
    } else {
        keys.iter()
            .map(|k| format!("{k} IS NOT NULL"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let grouped_columns: Vec<String> = keys.iter().cloned().chain(aggs).collect();
    let group_by = if keys.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", keys.join(", "))
    };
    let grouped = format!(
        "SELECT {} FROM {source} WHERE {not_null}{group_by}",
        grouped_columns.join(", ")
    );
    let derived: Vec<String> = params
        .derive
        .iter()
        .map(|(name, sql)| format!("({sql}) AS {}", crate::spark_sql::ident(name)))
        .collect();
    let with_derived = if derived.is_empty() {
        grouped
    } else {
        format!("SELECT g.*, {} FROM ({grouped}) g", derived.join(", "))
    };
    let selected = match &params.select {
        Some(select) => select
            .iter()
            .map(|c| crate::spark_sql::ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        None => "*".to_owned(),
    };
    let order = if keys.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", keys.join(", "))
    };
    Ok(format!("SELECT {selected} FROM ({with_derived}) d{order}"))
}

/// The columns the params name in the input, each with its param: the keys, then each
/// aggregation's column.
fn wanted_columns(params: &AggregateParams) -> Vec<(&str, String)> {
    let mut wanted: Vec<(&str, String)> = params
        .by
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), crate::pointer::of(&["by", &i.to_string()])))
        .collect();
    for (name, agg) in &params.aggs {
        if agg.column() != "*" {
            wanted.push((agg.column(), crate::pointer::of(&["aggs", name])));
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> DataFrame {
        df!(
            "user" => [Some(1i64), Some(1), Some(1), Some(2), Some(2), None],
            "days" => [None, Some(30.0), Some(10.0), None, Some(7.0), Some(3.0)],
            "n" => [1i64, 2, 3, 1, 2, 9],
        )
        .unwrap()
    }

    fn params(value: serde_json::Value) -> AggregateParams {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_seed_user_aggregation() {
        let p = params(json!({
            "by": ["user"],
            "aggs": {"max_days": {"max": "days"}, "frequency": {"max": "n"}},
            "derive": {"days_imp": "CASE WHEN max_days = 30 THEN NULL ELSE max_days END"},
            "select": ["user", "days_imp", "frequency"],
        }));
        let out = aggregate(frame(), &p, std::path::Path::new("t")).unwrap();
        assert_eq!(out.get_column_names(), ["user", "days_imp", "frequency"]);
        let users: Vec<Option<i64>> = out.column("user").unwrap().i64().unwrap().iter().collect();
        assert_eq!(
            users,
            [Some(1), Some(2)],
            "the null key is dropped, keys sorted"
        );
        let imp: Vec<Option<f64>> = out
            .column("days_imp")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(imp, [None, Some(7.0)]);
        let freq: Vec<Option<i64>> = out
            .column("frequency")
            .unwrap()
            .i64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(freq, [Some(3), Some(2)]);
    }

    #[test]
    fn aggregations_skip_nulls_as_pandas() {
        let p = params(json!({
            "by": ["user"],
            "aggs": {
                "count": {"count": "days"}, "rows": {"count": "*"}, "sum": {"sum": "days"},
                "mean": {"mean": "days"}, "first": {"first": "days"}, "last": {"last": "days"},
                "std": {"std": "days"}, "median": {"median": "days"}, "uniq": {"n_unique": "days"},
                "q": {"quantile": {"column": "days", "q": 0.25}},
            },
        }));
        let out = aggregate(frame(), &p, std::path::Path::new("t")).unwrap();
        let get = |c: &str| {
            out.column(c)
                .unwrap()
                .cast(&DataType::Float64)
                .unwrap()
                .f64()
                .unwrap()
                .get(0)
        };
        assert_eq!(get("count"), Some(2.0));
        assert_eq!(get("rows"), Some(3.0));
        assert_eq!(get("sum"), Some(40.0));
        assert_eq!(get("mean"), Some(20.0));
        assert_eq!(get("first"), Some(30.0), "first non-null, as pandas");
        assert_eq!(get("last"), Some(10.0));
        // Sample std of {30, 10}: sqrt(200) ≈ 14.142.
        assert!((get("std").unwrap() - 200f64.sqrt()).abs() < 1e-9);
        assert_eq!(get("median"), Some(20.0));
        assert_eq!(get("uniq"), Some(2.0));
        // Linear quantile of {10, 30} at 0.25: 15.
        assert_eq!(get("q"), Some(15.0));
    }

    #[test]
    fn errors_name_the_column_and_the_param() {
        let p = params(json!({"by": ["usr"], "aggs": {"m": {"max": "days"}}}));
        let error = aggregate(frame(), &p, std::path::Path::new("in.parquet")).unwrap_err();
        assert_eq!(
            error.message,
            "column `usr` (param `by[0]`) is not in `in.parquet`; its columns are: user, days, n"
        );
        let p = params(
            json!({"by": ["user"], "aggs": {"m": {"max": "days"}}, "derive": {"x": "CASE WHEN"}}),
        );
        let error = aggregate(frame(), &p, std::path::Path::new("in.parquet")).unwrap_err();
        assert!(
            error
                .message
                .starts_with("derived column `x` (param `derive.x`)"),
            "{}",
            error.message
        );
    }
}

#[cfg(test)]
mod ranges_tests {
    use super::*;

    /// Every aggregation over one key or two, in ranges of the first key of ~3,000, ~400 or ~25
    /// rows, writes the whole table's file, byte for byte, whether the rows are in key order
    /// (grouped by slices), in none, or in order but for one row; so does an error.
    #[test]
    fn aggregating_in_ranges_writes_the_whole_tables_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let n = 30_000u64;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut users, mut shops, mut days) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let r = next();
            users.push((i % 53 != 0).then_some((r % 900) as i64));
            shops.push(format!("s{}", (r >> 16) % 3));
            days.push((i % 11 != 0).then_some(((r >> 24) % 4001) as f64 / 131.0));
        }
        let random = df!("user" => users, "shop" => shops, "days" => days).unwrap();
        let sorted = random
            .sort(
                ["user"],
                SortMultipleOptions::default().with_maintain_order(true),
            )
            .unwrap();
        // In user order but for the first row, moved to the end: every range but one is in order.
        let mut all_but_one = sorted.slice(1, usize::MAX);
        all_but_one.vstack_mut(&sorted.slice(0, 1)).unwrap();
        all_but_one.rechunk_mut();
        let aggs = json!({
            "count": {"count": "days"}, "rows": {"count": "*"}, "sum": {"sum": "days"},
            "mean": {"mean": "days"}, "first": {"first": "days"}, "last": {"last": "days"},
            "std": {"std": "days"}, "median": {"median": "days"}, "uniq": {"n_unique": "days"},
            "q": {"quantile": {"column": "days", "q": 0.3}}, "max": {"max": "days"},
        });
        let input = dir.path().join("in.parquet");
        let cases = [
            (&random, json!(["user", "shop"])),
            (&random, json!(["user"])),
            (&sorted, json!(["user"])),
            (&all_but_one, json!(["user"])),
            (&sorted, json!(["user", "shop"])),
        ];
        for (k, (table, by)) in cases.into_iter().enumerate() {
            write_table(&mut table.clone(), &input).unwrap();
            let p = params(json!({"by": by, "aggs": aggs, "derive": {"spread": "max - mean"}}));
            let run = |pass_rows: usize, name: &str| {
                let output = dir.path().join(name);
                let out = aggregate_file(&p, &input, &output, pass_rows, &Default::default());
                out.map(|(groups, columns)| (groups, columns, std::fs::read(&output).unwrap()))
            };
            let whole = run(usize::MAX, "whole.parquet").unwrap();
            assert!(whole.0 > 800, "{} groups", whole.0);
            for pass_rows in [3_000, 400, 25] {
                let ranges =
                    crate::io::partition::KeyRanges::plan(&input, "user", pass_rows).unwrap();
                assert!(ranges.count() > 5, "{pass_rows}: {} ranges", ranges.count());
                let parts = run(pass_rows, &format!("parts{pass_rows}.parquet")).unwrap();
                assert_eq!((parts.0, &parts.1), (whole.0, &whole.1));
                assert!(
                    parts.2 == whole.2,
                    "case {k}, {pass_rows}: the files differ"
                );
            }
        }
        let bad = params(
            json!({"by": ["user"], "aggs": {"m": {"max": "days"}}, "derive": {"x": "nosuch + 1"}}),
        );
        let whole = aggregate_file(
            &bad,
            &input,
            &dir.path().join("e1.parquet"),
            usize::MAX,
            &Default::default(),
        )
        .unwrap_err();
        let parts = aggregate_file(
            &bad,
            &input,
            &dir.path().join("e2.parquet"),
            400,
            &Default::default(),
        )
        .unwrap_err();
        assert_eq!(parts.message, whole.message);
    }

    fn params(value: serde_json::Value) -> AggregateParams {
        serde_json::from_value(value).unwrap()
    }
}
