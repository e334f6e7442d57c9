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

use crate::table::{is_csv, require_columns, write_table};
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

impl BuiltinStage for Aggregate {
    const NAME: &'static str = "aggregate";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "group-by with declarative aggregations and derived SQL columns";
    type Params = AggregateParams;

    fn check_ports(
        inputs: &[Option<String>],
        outputs: &[Option<String>],
    ) -> Result<(), crate::ports::PortError> {
        crate::ports::exactly_one_input(inputs)?;
        crate::ports::named_outputs(outputs, &["table"], &[])
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
            output: "table",
            position: 0,
            file: None,
            columns,
        }]
    }

    fn run(params: &AggregateParams, io: &StageIo) -> Result<StageReport, StageError> {
        let input = io.input(0)?;
        let output = io.output("table", 0)?;
        let df = read_typed(input, params)?;
        let mut out = aggregate(df, params, input)?;
        write_table(&mut out, output)?;
        Ok(StageReport {
            summary: json!({"groups": out.height(), "columns": out.get_column_names().iter().map(|c| c.to_string()).collect::<Vec<_>>()}),
            warnings: Vec::new(),
            checks: Vec::new(),
        })
    }
}

/// Parquet as it is (just the columns the params name); CSV with types inferred (aggregating
/// strings would be meaningless).
fn read_typed(path: &std::path::Path, params: &AggregateParams) -> Result<DataFrame, StageError> {
    if !is_csv(path) {
        let mut columns: Vec<String> = params.by.clone();
        for agg in params.aggs.values() {
            let column = agg.column();
            if column != "*" && !columns.iter().any(|c| c == column) {
                columns.push(column.to_owned());
            }
        }
        return crate::table::read_parquet(path, Some(&columns));
    }
    crate::table::read_table_inferred(path)
}

/// Groups `df` (read from `source`, named in errors) as `params` says.
pub fn aggregate(
    df: DataFrame,
    params: &AggregateParams,
    source: &std::path::Path,
) -> Result<DataFrame, StageError> {
    let mut wanted: Vec<(&str, String)> = params
        .by
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), crate::table::pointer(&["by", &i.to_string()])))
        .collect();
    for (name, agg) in &params.aggs {
        if agg.column() != "*" {
            wanted.push((agg.column(), crate::table::pointer(&["aggs", name])));
        }
    }
    require_columns(&df, wanted, source)?;
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
                .at_param(crate::table::pointer(&["derive", name]))
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
