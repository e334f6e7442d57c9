//! The built-in stages that can run on Spark (`engine: spark`), as Spark SQL: the same typed
//! params, a second implementation. A stage or param with no exact equivalent there says so
//! rather than give a different result.

use serde_json::Value as Json;

/// The built-ins that have a Spark implementation.
pub const BUILTINS: &[&str] = &["aggregate"];

/// Why a stage cannot run on Spark: the param (a JSON pointer; empty for the stage as a whole)
/// and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub param: String,
    pub why: String,
}

/// The Spark SQL query that computes built-in `name`'s one table output from `params` (as
/// normalised), reading its one input as the table expression `source`.
pub fn query(name: &str, params: &Json, source: &str) -> Result<String, Unsupported> {
    match name {
        "aggregate" => {
            let params: crate::aggregate::AggregateParams = serde_json::from_value(params.clone())
                .map_err(|e| Unsupported {
                    param: String::new(),
                    why: format!("its params do not read: {e}"),
                })?;
            crate::aggregate::spark_sql(&params, source)
                .map_err(|(param, why)| Unsupported { param, why })
        }
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
