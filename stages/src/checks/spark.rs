//! Checks of a table Spark wrote, on the cluster: each measure is a Spark SQL query over the
//! table where the cluster reads it, and only counts, extremes and one example row come back.
//! The verdicts are judged by the same code as locally, so they read the same.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value as Json;

use super::{judge_all, not_booleans, Baselines, Check, Measures, Repeats, Verdict};
use crate::spark_sql::{
    as_double, double_literal, first_repeat, ident, is_float, is_numeric, local_name, numbered,
    query, Session, ROW_ID,
};

/// Evaluates `checks` on the Parquet table at `table` (a path the cluster reads too) through
/// `session`; `change` checks measure their baselines there as well. Temporary views are named
/// from `scratch`. One verdict per check, in order.
pub fn evaluate<S: Session>(
    checks: &[Check],
    table: &Path,
    baselines: &Baselines,
    scratch: &str,
    session: &mut S,
) -> Vec<Verdict>
where
    S::Error: std::fmt::Display,
{
    let session = RefCell::new(session);
    let views = RefCell::new(Vec::new());
    let verdicts = match OnSpark::open(&session, &views, table, scratch) {
        Ok(mut on_spark) => judge_all(checks, &mut on_spark, baselines, &mut |baseline: &Path,
                                                                              _: &BTreeSet<
            String,
        >| {
            OnSpark::open(&session, &views, baseline, scratch)
                .map(|m| Box::new(m) as Box<dyn Measures + '_>)
        }),
        Err(message) => checks.iter().map(|_| Verdict::error(&message)).collect(),
    };
    for view in views.into_inner() {
        let _ = session
            .borrow_mut()
            .rows(&format!("DROP VIEW IF EXISTS {view}"));
    }
    verdicts
}

/// A table on the cluster, in a temporary view.
struct OnSpark<'a, 's, S: Session> {
    session: &'a RefCell<&'s mut S>,
    view: String,
    path: &'a Path,
    /// Its columns and their Spark SQL types.
    columns: Vec<(String, String)>,
    rows: Option<u64>,
}

impl<'a, 's, S: Session> OnSpark<'a, 's, S>
where
    S::Error: std::fmt::Display,
{
    fn open(
        session: &'a RefCell<&'s mut S>,
        views: &RefCell<Vec<String>>,
        path: &'a Path,
        scratch: &str,
    ) -> Result<Self, String> {
        let view = ident(&format!("{scratch}_checked{}", views.borrow().len()));
        let location = format!("file://{}", path.display()).replace('`', "``");
        session
            .borrow_mut()
            .rows(&format!(
                "CREATE OR REPLACE TEMPORARY VIEW {view} AS SELECT * FROM parquet.`{location}`"
            ))
            .map_err(|e| format!("Spark cannot read `{}`: {e}", path.display()))?;
        views.borrow_mut().push(view.clone());
        let columns = session
            .borrow_mut()
            .columns(&view)
            .map_err(|e| e.to_string())?;
        Ok(OnSpark {
            session,
            view,
            path,
            columns,
            rows: None,
        })
    }

    fn query(&self, sql: &str) -> Result<Vec<Vec<Json>>, String> {
        self.session
            .borrow_mut()
            .rows(sql)
            .map_err(|e| e.to_string())
    }

    /// The first row's values: a query that gives none is an error, never zeros.
    fn row(&self, sql: &str) -> Result<Vec<Json>, String> {
        self.query(sql)?
            .into_iter()
            .next()
            .ok_or_else(|| "Spark returned no row".to_owned())
    }

    /// A column's Spark SQL type, or the local engine's message for a column that is not there.
    fn column(&self, name: &str) -> Result<&str, String> {
        match self.columns.iter().find(|(c, _)| c == name) {
            Some((_, t)) => Ok(t),
            None => {
                let present: Vec<String> = self
                    .columns
                    .iter()
                    .map(|(c, _)| format!("`{}`", crate::safe::escape(c)))
                    .collect();
                Err(format!(
                    "column `{}` is not in `{}`; its columns are {}",
                    crate::safe::escape(name),
                    crate::safe::escape(&self.path.to_string_lossy()),
                    present.join(", ")
                ))
            }
        }
    }

    /// A numeric (or boolean) column as doubles, NaN and nulls left out: a subquery `x`.
    fn numbers(&self, name: &str, check: &str) -> Result<String, String> {
        let t = self.column(name)?;
        if !(is_numeric(t) || t == "boolean") {
            return Err(format!(
                "`{check}` needs a numeric column, but `{name}` is {}",
                local_name(t)
            ));
        }
        Ok(format!(
            "(SELECT CAST({} AS DOUBLE) AS x FROM {}) n WHERE x IS NOT NULL AND NOT isnan(x)",
            ident(name),
            self.view
        ))
    }
}

fn count(value: Option<&Json>) -> u64 {
    value.and_then(Json::as_u64).unwrap_or(0)
}

impl<S: Session> Measures for OnSpark<'_, '_, S>
where
    S::Error: std::fmt::Display,
{
    fn rows(&mut self) -> Result<u64, String> {
        if let Some(rows) = self.rows {
            return Ok(rows);
        }
        let rows = count(
            self.row(&format!("SELECT count(1) FROM {}", self.view))?
                .first(),
        );
        self.rows = Some(rows);
        Ok(rows)
    }

    fn missing(&mut self, column: &str) -> Result<u64, String> {
        let t = self.column(column)?;
        let c = ident(column);
        let missing = if is_float(t) {
            format!("{c} IS NULL OR isnan({c})")
        } else {
            format!("{c} IS NULL")
        };
        Ok(count(
            self.row(&format!("SELECT count_if({missing}) FROM {}", self.view))?
                .first(),
        ))
    }

    fn mean(&mut self, column: &str) -> Result<f64, String> {
        let numbers = self.numbers(column, "mean")?;
        let row = self.row(&format!("SELECT sum(x), count(x) FROM {numbers}"))?;
        let n = count(row.get(1));
        let sum = row.first().and_then(as_double).unwrap_or(0.0);
        Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
    }

    fn range(
        &mut self,
        column: &str,
        lo: Option<f64>,
        hi: Option<f64>,
    ) -> Result<(u64, f64, f64), String> {
        let numbers = self.numbers(column, "range")?;
        let mut outside: Vec<String> = Vec::new();
        if let Some(lo) = lo {
            outside.push(format!("x < {}", double_literal(lo)));
        }
        if let Some(hi) = hi {
            outside.push(format!("x > {}", double_literal(hi)));
        }
        let outside = if outside.is_empty() {
            "FALSE".to_owned()
        } else {
            outside.join(" OR ")
        };
        let row = self.row(&format!(
            "SELECT count_if({outside}), min(x), max(x) FROM {numbers}"
        ))?;
        Ok((
            count(row.first()),
            row.get(1).and_then(as_double).unwrap_or(f64::INFINITY),
            row.get(2).and_then(as_double).unwrap_or(f64::NEG_INFINITY),
        ))
    }

    fn repeats(&mut self, columns: &[String]) -> Result<Repeats, String> {
        for c in columns {
            self.column(c)?;
        }
        let keys: Vec<String> = columns.iter().map(|c| ident(c)).collect();
        let keys = keys.join(", ");
        // DISTINCT takes nulls as equal, and NaN as equal (Spark normalises NaN in keys).
        let distinct = count(
            self.row(&format!(
                "SELECT count(1) FROM (SELECT DISTINCT {keys} FROM {})",
                self.view
            ))?
            .first(),
        );
        let repeats = self.rows()?.saturating_sub(distinct);
        if repeats == 0 {
            return Ok((0, None));
        }
        // The first repeat in file order, and how many rows come before it.
        let first = self.row(&first_repeat(&keys, &self.view))?;
        let Some(id) = first.first().and_then(Json::as_u64) else {
            return Ok((repeats, None));
        };
        let position = count(
            self.row(&format!(
                "SELECT count(1) FROM {} WHERE {ROW_ID} < {id}",
                numbered(&self.view)
            ))?
            .first(),
        );
        // Shown as the local engine shows them: strings quoted, other values as they print.
        let example = columns
            .iter()
            .zip(&first[1..])
            .map(|(c, v)| {
                let text = self.column(c).map(|t| t == "string").unwrap_or(false);
                let shown = match v {
                    Json::Null => "null".to_owned(),
                    Json::String(s) if text => format!("{s:?}"),
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("{c}={shown}")
            })
            .collect();
        Ok((repeats, Some((position, example))))
    }

    fn booleans(&mut self, sql: &str) -> Result<(u64, u64, u64), String> {
        // The query must mean something to the local engine too (a restored output is checked
        // here): polars runs it first on the table's columns without rows.
        let empty = crate::io::table::empty_parquet(self.path).map_err(|e| e.message)?;
        super::Here {
            table: super::Loaded {
                rows: 0,
                df: Some(empty),
            },
            path: self.path,
        }
        .booleans(sql)?;
        let q = query(sql, &self.view).map_err(|e| format!("the query failed: {e}"))?;
        let described = self
            .session
            .borrow_mut()
            .columns(&format!("QUERY {q}"))
            .map_err(|e| format!("the query failed: {e}"))?;
        if described.is_empty() {
            return Ok((0, 0, 0));
        }
        let mut counts = Vec::new();
        for (name, t) in &described {
            if t != "boolean" {
                return Err(not_booleans(name, local_name(t)));
            }
            let c = ident(name);
            counts.push(format!(
                "count_if({c}), count_if(NOT {c}), count_if({c} IS NULL)"
            ));
        }
        let row = self
            .row(&format!("SELECT {} FROM ({q}) q", counts.join(", ")))
            .map_err(|e| format!("the query failed: {e}"))?;
        let (mut t, mut f, mut n) = (0, 0, 0);
        for triple in row.chunks(3) {
            t += count(triple.first());
            f += count(triple.get(1));
            n += count(triple.get(2));
        }
        Ok((t, f, n))
    }
}
