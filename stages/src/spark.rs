//! The built-in stages that can run on Spark (`engine: spark`), as Spark SQL: the same typed
//! params, a second implementation. A stage or param with no exact equivalent there says so
//! rather than give a different result.
//!
//! A stage talks to the cluster through a [`Session`] (the orchestrator's Spark Connect client):
//! small queries whose rows come back (counts, quartiles), and one query whose rows become the
//! stage's table output. No table is ever pulled to this machine.

use serde_json::Value as Json;

pub use crate::spark_sql::{as_double, double_value, Failure, Input, Session, Unsupported};
use crate::StageError;

/// The built-ins that have a Spark implementation.
pub const BUILTINS: &[&str] = &["aggregate", "clean", "feature"];

/// Whether built-in `name` reads a CSV input on Spark: `clean` reads every column as a string,
/// as it does locally; the others read Parquet (a CSV's inferred types differ between engines).
pub fn reads_csv(name: &str) -> bool {
    name == "clean"
}

/// The output built-in `name` writes its table to on Spark (its other outputs, a summary, are
/// written by the orchestrator from what [`run`] returns).
pub fn table_output(name: &str) -> &'static str {
    match name {
        "feature" => "features",
        _ => "table",
    }
}

/// The file the table of built-in `name` is written to, given its staged output: the output
/// itself, or `features.parquet` in a folder output (a versioned one).
pub fn table_file(name: &str, staged: &std::path::Path) -> std::path::PathBuf {
    if name == "feature" && staged.is_dir() {
        staged.join("features.parquet")
    } else {
        staged.to_path_buf()
    }
}

/// Whether built-in `name` with these params (as normalised) can run on Spark, exactly as it
/// runs locally.
pub fn supports(name: &str, params: &Json) -> Result<(), Unsupported> {
    match name {
        "aggregate" => crate::aggregate::spark_sql(&read_params(params)?, "input")
            .map(|_| ())
            .map_err(|(param, why)| Unsupported { param, why }),
        "clean" => crate::clean::spark::supports(&read_params(params)?),
        "feature" => crate::feature::spark::supports(&read_params(params)?),
        _ => Err(Unsupported {
            param: String::new(),
            why: format!(
                "`{name}` runs on the local engine only; on Spark: {}",
                BUILTINS
                    .iter()
                    .map(|b| format!("`{b}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Runs built-in `name` on Spark over its `inputs`, each in a view (a CSV read with every column
/// a string for `clean`, else a Parquet table); temporary views and cached tables it makes are
/// named from `scratch`. Returns the stage's summary (which the orchestrator also writes to a
/// `summary` output when the stage declares one).
pub fn run<S: Session>(
    name: &str,
    params: &Json,
    inputs: &[Input],
    scratch: &str,
    session: &mut S,
) -> Result<Json, Failure<S::Error>> {
    supports(name, params).map_err(|u| {
        let e = StageError::new(u.why);
        Failure::Stage(if u.param.is_empty() {
            e
        } else {
            e.at_param(u.param)
        })
    })?;
    let one = || match inputs {
        [input] => Ok(input),
        _ => Err(Failure::Stage(StageError::new(format!(
            "on Spark, `{name}` reads one input"
        )))),
    };
    match name {
        "aggregate" => {
            let input = &one()?.view;
            let params = read_params(params).map_err(|u| StageError::new(u.why))?;
            let sql = crate::aggregate::spark_sql(&params, input)
                .map_err(|(param, why)| StageError::new(why).at_param(param))?;
            let groups = session.write(&sql).map_err(Failure::Session)?;
            // The summary the local engine gives.
            let columns = session
                .columns(&format!("QUERY {sql}"))
                .map_err(Failure::Session)?;
            Ok(serde_json::json!({
                "groups": groups,
                "columns": columns.into_iter().map(|(c, _)| c).collect::<Vec<_>>(),
            }))
        }
        "clean" => {
            let params = read_params(params).map_err(|u| StageError::new(u.why))?;
            let input = one()?;
            crate::clean::spark::run(&params, &input.view, &input.source, scratch, session)
        }
        "feature" => {
            let params = read_params(params).map_err(|u| StageError::new(u.why))?;
            crate::feature::spark::run(&params, inputs, session)
        }
        _ => unreachable!("supports() refused it"),
    }
}

fn read_params<T: serde::de::DeserializeOwned>(params: &Json) -> Result<T, Unsupported> {
    serde_json::from_value(params.clone()).map_err(|e| Unsupported {
        param: String::new(),
        why: format!("its params do not read: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_without_a_spark_implementation_are_named() {
        let err = supports("impute", &serde_json::json!({})).unwrap_err();
        assert_eq!(
            err.why,
            "`impute` runs on the local engine only; on Spark: `aggregate`, `clean`, `feature`"
        );
    }
}
