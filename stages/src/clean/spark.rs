//! `clean` on Spark: the same four steps as Spark SQL over the input view, with the local
//! engine's semantics where Spark's differ.
//!
//! - Casts are lenient as here, not ANSI: a value's text must match the grammar Rust parses
//!   (checked by a regular expression, with Unicode whitespace trimmed as `str::trim` does)
//!   before `try_cast`; `"7.0"` is the int 7 through the float path; NaN counts as missing.
//! - File order is the row id `monotonically_increasing_id()` gives a file scan (increasing in
//!   file order), kept with the cast table, which is cached once so that every step and count
//!   sees the same ids. Dedup keeps the row with the lowest id; the output is sorted by it.
//! - The IQR fences come from the exact quartiles: with at most [`MAX_DISTINCT`] distinct values
//!   (a gap in days has 31) their counts come back and the quartiles are computed here by the
//!   local code, to the bit; with more, Spark's exact `percentile` (not `percentile_approx`),
//!   the same definition (linear between order statistics), which may differ in the last bits.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::params::Scalar;
use super::*;
use crate::spark_sql::{
    double_literal, ident, is_float, is_numeric, string_literal, Failure, Session, Unsupported,
};

/// What the local engine does that Spark cannot do the same way.
pub(crate) fn supports(params: &CleanParams) -> Result<(), Unsupported> {
    for (column, to) in &params.cast {
        if *to == CastType::Date {
            return Err(Unsupported {
                param: crate::pointer::of(&["cast", column]),
                why: "a `date` cast reads other forms of dates on Spark than here (`2024-1-5`, for one): cast dates on the local engine".to_owned(),
            });
        }
    }
    Ok(())
}

/// Names of the columns imba adds; an input column must not start with it.
const OURS: &str = "__imba_";
use crate::spark_sql::ROW_ID as ROW;

/// Whitespace as Rust's `str::trim` (and polars' `strip_chars`) see it, in Java's regex syntax.
const WS: &str = r"\p{IsWhite_Space}*";
/// An integer as Rust's `i64::from_str` reads it.
const INT: &str = "[+-]?[0-9]+";
/// A float as Rust's `f64::from_str` reads it (Java's parser also takes `1d`, `0x1p3`, …).
const FLOAT: &str =
    r"(?i)[+-]?(?:inf|infinity|nan|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?)";

/// The text of `s` without surrounding whitespace when it matches `grammar`, else `''`.
fn trimmed_if(s: &str, grammar: &str) -> String {
    // `(?i)` must lead the whole pattern.
    let (flags, grammar) = match grammar.strip_prefix("(?i)") {
        Some(rest) => ("(?is)", rest),
        None => ("(?s)", grammar),
    };
    let pattern = format!("{flags}^{WS}({grammar}){WS}$");
    format!("regexp_extract({s}, {}, 1)", string_literal(&pattern))
}

/// A double with NaN as null.
fn no_nan(d: &str) -> String {
    format!("CASE WHEN isnan({d}) THEN NULL ELSE {d} END")
}

/// The cast of column `c` (of Spark type `from`) to `to`, as the local engine casts it.
fn cast_sql(c: &str, from: &str, to: CastType, column: &str) -> Result<String, StageError> {
    let text = from == "string";
    Ok(match (to, text) {
        (CastType::Float64, true) => no_nan(&format!("try_cast({} AS DOUBLE)", trimmed_if(c, FLOAT))),
        (CastType::Float64, false) if is_numeric(from) || from == "boolean" => {
            no_nan(&format!("try_cast({c} AS DOUBLE)"))
        }
        (CastType::Int64, true) => {
            // "7" directly; "7.0" (as pandas writes an int column that held NaN) through a float.
            let f = no_nan(&format!("try_cast({} AS DOUBLE)", trimmed_if(c, FLOAT)));
            format!(
                "coalesce(try_cast({} AS BIGINT), CASE WHEN abs({f}) < 9007199254740992D AND {f} = rint({f}) THEN CAST({f} AS BIGINT) END)",
                trimmed_if(c, INT)
            )
        }
        (CastType::Int64, false) if is_numeric(from) || from == "boolean" => {
            format!("try_cast({c} AS BIGINT)")
        }
        (CastType::String, true) => trimmed_if(c, ".*?"),
        (CastType::Bool, true) => {
            let lower = format!("lower({})", trimmed_if(c, ".*?"));
            format!(
                "CASE WHEN {lower} IN ('true', 't', 'yes', 'y', '1') THEN TRUE WHEN {lower} IN ('false', 'f', 'no', 'n', '0') THEN FALSE END"
            )
        }
        (CastType::Bool, false) if is_numeric(from) || from == "boolean" => {
            format!("try_cast({c} AS BOOLEAN)")
        }
        _ => {
            return Err(StageError::new(format!(
                "on Spark, column `{}` of type {from} cannot be cast to {}: the engines write such values differently; cast it on the local engine",
                crate::safe::escape(column),
                format!("{to:?}").to_lowercase()
            ))
            .at_param(crate::pointer::of(&["cast", column])))
        }
    })
}

/// The Spark SQL type a cast gives.
fn cast_type(to: CastType) -> &'static str {
    match to {
        CastType::Int64 => "bigint",
        CastType::Float64 => "double",
        CastType::String => "string",
        CastType::Bool => "boolean",
        CastType::Date => "date",
    }
}

/// The domain rule on column `c` (of Spark type `t`): true where the row passes.
fn domain_sql(c: &str, t: &str, column: &str, rule: &Domain) -> Result<String, StageError> {
    // An empty list lets nothing through, as locally.
    let among = |value: String, items: Vec<String>| {
        if items.is_empty() {
            "FALSE".to_owned()
        } else {
            format!("coalesce({value} IN ({}), FALSE)", items.join(", "))
        }
    };
    match rule {
        Domain::In { values } if t == "string" => Ok(among(
            c.to_owned(),
            values.iter().map(|v| string_literal(&v.text())).collect(),
        )),
        Domain::In { values } if is_numeric(t) => Ok(among(
            format!("CAST({c} AS DOUBLE)"),
            values
                .iter()
                .filter_map(Scalar::number)
                .map(double_literal)
                .collect(),
        )),
        Domain::In { .. } => Err(StageError::new(format!(
            "domain `in` on column `{}` of type {}: cast it to a string or number first",
            crate::safe::escape(column),
            crate::spark_sql::local_name(t)
        ))),
        Domain::Between { between: [lo, hi] } if is_numeric(t) => Ok(format!(
            "coalesce(CAST({c} AS DOUBLE) BETWEEN {} AND {}, FALSE)",
            double_literal(*lo),
            double_literal(*hi)
        )),
        Domain::Between { .. } => Err(StageError::new(format!(
            "domain `between` on column `{}`, which is {}: cast it to int64 or float64 first (param `cast.{}`)",
            crate::safe::escape(column),
            crate::spark_sql::local_name(t),
            crate::safe::escape(column)
        ))),
    }
}

/// `clean` on Spark. See the module doc.
pub(crate) fn run<S: Session>(
    params: &CleanParams,
    input: &str,
    source: &str,
    scratch: &str,
    session: &mut S,
) -> Result<Json, Failure<S::Error>> {
    let cached = ident(&format!("{scratch}_cast"));
    let result = steps(params, input, source, &cached, session);
    // The cached table goes whatever happened (a failed cleanup leaves only memory behind, which
    // the session's end frees).
    let _ = session.rows(&format!("UNCACHE TABLE IF EXISTS {cached}"));
    let _ = session.rows(&format!("DROP VIEW IF EXISTS {cached}"));
    result
}

fn steps<S: Session>(
    params: &CleanParams,
    input: &str,
    source: &str,
    cached: &str,
    session: &mut S,
) -> Result<Json, Failure<S::Error>> {
    let columns = session.columns(input).map_err(Failure::Session)?;
    let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
    if let Some(ours) = names.iter().find(|c| c.starts_with(OURS)) {
        return Err(StageError::new(format!(
            "on Spark, `{source}` has a column `{}`: names starting with `{OURS}` are imba's",
            crate::safe::escape(ours)
        ))
        .into());
    }
    require(params, &names, source)?;

    // 1. Cast, with a flag per cast column where a value was there and did not cast.
    let mut select = Vec::new();
    let mut failed = Vec::new();
    let mut types: BTreeMap<&str, String> = BTreeMap::new();
    for (column, from) in &columns {
        let c = ident(column);
        match params.cast.get(column) {
            Some(to) => {
                select.push(format!("{} AS {c}", cast_sql(&c, from, *to, column)?));
                types.insert(column, cast_type(*to).to_owned());
            }
            None => {
                select.push(c);
                types.insert(column, from.clone());
            }
        }
    }
    for (i, (column, to)) in params.cast.iter().enumerate() {
        let c = ident(column);
        let from = &columns
            .iter()
            .find(|(n, _)| n == column)
            .expect("required")
            .1;
        let present = if from == "string" {
            format!("{c} IS NOT NULL AND length({c}) > 0")
        } else {
            format!("{c} IS NOT NULL")
        };
        let bad = format!("`__imba_bad_{i}`");
        select.push(format!(
            "({present}) AND {} IS NULL AS {bad}",
            cast_sql(&c, from, *to, column)?
        ));
        failed.push((column, bad));
    }
    if params.on_cast_error == OnCastError::Fail {
        first_failure(params, input, source, &select, &failed, session)?;
    }
    select.push(format!("monotonically_increasing_id() AS {ROW}"));
    session
        .rows(&format!(
            "CACHE TABLE {cached} AS SELECT {} FROM {input}",
            select.join(", ")
        ))
        .map_err(Failure::Session)?;

    // 2. Domain, and the rows a cast failure drops.
    let live = match params.on_cast_error {
        OnCastError::Drop if !failed.is_empty() => format!(
            "NOT ({})",
            failed
                .iter()
                .map(|(_, b)| b.as_str())
                .collect::<Vec<_>>()
                .join(" OR ")
        ),
        _ => "TRUE".to_owned(),
    };
    let mut rules = Vec::new();
    for (column, rule) in &params.domain {
        let t = &types[column.as_str()];
        let ok = domain_sql(&ident(column), t, column, rule)
            .map_err(|e| e.at_param(crate::pointer::of(&["domain", column])))?;
        rules.push((column, ok));
    }
    let domain = if rules.is_empty() {
        "TRUE".to_owned()
    } else {
        rules
            .iter()
            .map(|(_, ok)| format!("({ok})"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let passed = format!("({live}) AND ({domain})");

    // 3. IQR fences, from the values of the rows that passed.
    let mut fences = Vec::new();
    let mut iqr_ok = Vec::new();
    if let Some(iqr) = &params.iqr {
        for (i, column) in iqr.columns.iter().enumerate() {
            let t = &types[column.as_str()];
            if !is_numeric(t) {
                return Err(StageError::new(format!(
                    "iqr on column `{}`, which is {}: cast it to int64 or float64 first (param `cast.{}`)",
                    crate::safe::escape(column),
                    crate::spark_sql::local_name(t),
                    crate::safe::escape(column)
                ))
                .at_param(crate::pointer::of(&["iqr", "columns", &i.to_string()]))
                .into());
            }
            let v = format!("CAST({} AS DOUBLE)", ident(column));
            let values = format!(
                "SELECT {v} AS v FROM {cached} WHERE {passed} AND {v} IS NOT NULL AND NOT isnan({v})"
            );
            let (q1, q3) = quartiles(&values, session)?;
            let fence = Fence::new(q1, q3, iqr.k);
            if let (Some(lower), Some(upper)) = (fence.lower, fence.upper) {
                iqr_ok.push(format!(
                    "({v} IS NULL OR isnan({v}) OR {v} BETWEEN {} AND {})",
                    double_literal(lower),
                    double_literal(upper)
                ));
            }
            fences.push((column.clone(), fence));
        }
    }
    let iqr_ok = if iqr_ok.is_empty() {
        "TRUE".to_owned()
    } else {
        iqr_ok.join(" AND ")
    };

    // 4. Missing values, then duplicates.
    let kept_na = match &params.dropna {
        None => "TRUE".to_owned(),
        Some(dropna) => {
            let subset = dropna.subset.clone().unwrap_or_else(|| names.clone());
            if subset.is_empty() {
                "TRUE".to_owned()
            } else {
                let missing: Vec<String> = subset
                    .iter()
                    .map(|column| {
                        let c = ident(column);
                        if is_float(&types[column.as_str()]) {
                            format!("({c} IS NULL OR isnan({c}))")
                        } else {
                            format!("{c} IS NULL")
                        }
                    })
                    .collect();
                let joiner = match dropna.how {
                    How::Any => " OR ",
                    How::All => " AND ",
                };
                format!("NOT ({})", missing.join(joiner))
            }
        }
    };
    let output: Vec<String> = names.iter().map(|c| ident(c)).collect();
    let alive = format!("{passed} AND {iqr_ok} AND {kept_na}");
    let survivors = match &params.dedup {
        // An empty subset compares nothing, and drops nothing, as locally.
        None | Some(Dedup::All(false)) => format!("SELECT * FROM {cached} WHERE {alive}"),
        Some(Dedup::Subset { subset }) if subset.is_empty() => {
            format!("SELECT * FROM {cached} WHERE {alive}")
        }
        Some(dedup) => {
            let subset: Vec<String> = match dedup {
                Dedup::Subset { subset } => subset.iter().map(|c| ident(c)).collect(),
                _ => output.clone(),
            };
            format!(
                "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY {} ORDER BY {ROW}) AS `__imba_copy` FROM {cached} WHERE {alive}) WHERE `__imba_copy` = 1",
                subset.join(", ")
            )
        }
    };

    // The counts, in one pass over the cached table (and one over the survivors).
    let mut counts_sql = vec![
        "count(1)".to_owned(),
        format!("count_if(NOT ({live}))"),
        format!("count_if({passed})"),
        format!("count_if({passed} AND {iqr_ok})"),
        format!("count_if({alive})"),
    ];
    counts_sql.extend(failed.iter().map(|(_, bad)| format!("count_if({bad})")));
    counts_sql.extend(
        rules
            .iter()
            .map(|(_, ok)| format!("count_if(({live}) AND NOT ({ok}))")),
    );
    let row = crate::spark_sql::one_row(
        session
            .rows(&format!("SELECT {} FROM {cached}", counts_sql.join(", ")))
            .map_err(Failure::Session)?,
    )?;
    let n = |i: usize| row.get(i).and_then(Json::as_u64).unwrap_or(0) as usize;
    let mut counts = Counts {
        initial: n(0),
        removed_cast: n(1),
        after_cast: n(0) - n(1),
        after_domain: n(2),
        after_iqr: n(3),
        after_dropna: n(4),
        ..Default::default()
    };
    for (j, (column, _)) in failed.iter().enumerate() {
        counts.cast_nulls.insert((*column).clone(), n(5 + j));
    }
    for (j, (column, _)) in rules.iter().enumerate() {
        counts
            .removed_domain_by_rule
            .insert((*column).clone(), n(5 + failed.len() + j));
    }
    counts.kept = crate::spark_sql::count(session, &format!("SELECT count(1) FROM ({survivors})"))?;

    session
        .write(&format!(
            "SELECT {} FROM ({survivors}) ORDER BY {ROW}",
            output.join(", ")
        ))
        .map_err(Failure::Session)?;
    Ok(summary(&counts, params, &fences, names))
}

/// Every column a param names is in the input.
fn require(params: &CleanParams, names: &[String], source: &str) -> Result<(), StageError> {
    crate::io::table::require_names(names, wanted_columns(params), std::path::Path::new(source))
}

/// With `on_cast_error: fail`: the stage fails at the earliest value that did not cast, naming
/// its line, as locally.
fn first_failure<S: Session>(
    params: &CleanParams,
    input: &str,
    source: &str,
    select: &[String],
    failed: &[(&String, String)],
    session: &mut S,
) -> Result<(), Failure<S::Error>> {
    if failed.is_empty() {
        return Ok(());
    }
    let which = failed
        .iter()
        .enumerate()
        .map(|(i, (_, bad))| format!("WHEN {bad} THEN {i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let raw = failed
        .iter()
        .map(|(column, bad)| {
            format!(
                "WHEN {bad} THEN CAST(`__imba_raw`.{} AS STRING)",
                ident(column)
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let flagged = format!(
        "SELECT monotonically_increasing_id() AS {ROW}, CASE {which} END AS `__imba_which`, CASE {raw} END AS `__imba_value` FROM (SELECT {}, struct(*) AS `__imba_raw` FROM {input})",
        select[select.len() - failed.len()..].join(", ")
    );
    let rows = session
        .rows(&format!(
            "SELECT {ROW}, `__imba_which`, `__imba_value` FROM ({flagged}) WHERE `__imba_which` IS NOT NULL ORDER BY {ROW} LIMIT 1"
        ))
        .map_err(Failure::Session)?;
    let Some(first) = rows.into_iter().next() else {
        return Ok(());
    };
    let id = first.first().and_then(Json::as_i64).unwrap_or(0);
    let which = first.get(1).and_then(Json::as_u64).unwrap_or(0) as usize;
    let value = first
        .get(2)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned();
    let row = crate::spark_sql::count(
        session,
        &format!(
            "SELECT count(1) FROM (SELECT monotonically_increasing_id() AS {ROW} FROM {input}) WHERE {ROW} < {id}"
        ),
    )?;
    let shown = format!("{value:?}");
    Err(cast_failure(
        params,
        std::path::Path::new(source),
        row,
        &shown,
        failed[which].0,
    )
    .into())
}

/// `q1` and `q3` (`None` without values).
type Quartiles = (Option<f64>, Option<f64>);

/// The quartiles of the values `values` selects (a column `v`): exact, as locally.
fn quartiles<S: Session>(values: &str, session: &mut S) -> Result<Quartiles, Failure<S::Error>> {
    let distinct = session
        .rows(&format!(
            "SELECT v, count(1) FROM ({values}) GROUP BY v LIMIT {}",
            MAX_DISTINCT + 1
        ))
        .map_err(Failure::Session)?;
    if distinct.len() <= MAX_DISTINCT {
        let mut counts = PlHashMap::default();
        for row in distinct {
            let (Some(v), Some(n)) = (
                row.first().and_then(crate::spark_sql::as_double),
                row.get(1).and_then(Json::as_u64),
            ) else {
                return Err(StageError::new(
                    "Spark returned a quartile count that is not a number",
                )
                .into());
            };
            counts.insert(v.to_bits(), n);
        }
        let mut gathered = Gathered::Counts(counts);
        return Ok((gathered.quantile(0.25), gathered.quantile(0.75)));
    }
    let row = crate::spark_sql::one_row(
        session
            .rows(&format!(
                "SELECT percentile(v, 0.25), percentile(v, 0.75) FROM ({values})"
            ))
            .map_err(Failure::Session)?,
    )?;
    Ok((
        row.first().and_then(crate::spark_sql::as_double),
        row.get(1).and_then(crate::spark_sql::as_double),
    ))
}
