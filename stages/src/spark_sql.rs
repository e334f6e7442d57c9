//! Spark SQL text (identifiers, literals, types) and the [`Session`] a built-in talks to the
//! cluster through: shared by the stages' Spark translations and their dispatcher in `spark`.

use serde_json::Value as Json;

use crate::StageError;

/// Why a stage cannot run on Spark: the param (a JSON pointer; empty for the stage as a whole)
/// and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub param: String,
    pub why: String,
}

/// What a built-in asks of a Spark session. Every call blocks until the cluster answers.
pub trait Session {
    type Error;
    /// The columns of a table or view (or of `QUERY <select>`), with their Spark SQL types
    /// (`string`, `bigint`, …), in order.
    fn columns(&mut self, table: &str) -> Result<Vec<(String, String)>, Self::Error>;
    /// Runs `sql` and returns its rows, for small results only (a count, quartiles) and for
    /// commands (`CACHE TABLE …`). Values are JSON: null, booleans, numbers, strings; a float
    /// that JSON cannot hold is the string `inf`, `-inf` or `NaN` (see [`as_double`]).
    fn rows(&mut self, sql: &str) -> Result<Vec<Vec<Json>>, Self::Error>;
    /// Writes the rows of `sql`, in their order, as the stage's table output.
    fn write(&mut self, sql: &str) -> Result<(), Self::Error>;
}

/// Why a stage failed on Spark: the session's error, or the stage's own (bad input, a param
/// that does not fit the data).
#[derive(Debug)]
pub enum Failure<E> {
    Session(E),
    Stage(StageError),
}

impl<E> From<StageError> for Failure<E> {
    fn from(e: StageError) -> Self {
        Failure::Stage(e)
    }
}

/// A double from a [`Session::rows`] value: a number, or `inf`, `-inf`, `NaN`.
pub fn as_double(value: &Json) -> Option<f64> {
    match value {
        Json::Number(n) => n.as_f64(),
        Json::String(s) if matches!(s.as_str(), "inf" | "-inf" | "NaN") => s.parse().ok(),
        _ => None,
    }
}

/// A double as a [`Session::rows`] value: a number, or `inf`, `-inf`, `NaN` ([`as_double`]).
pub fn double_value(v: f64) -> Json {
    serde_json::Number::from_f64(v).map_or_else(|| Json::String(v.to_string()), Json::Number)
}

/// A column name as a Spark SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string as a Spark SQL literal (Spark reads backslash escapes in string literals).
pub(crate) fn string_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A float as a Spark SQL double, to the bit (infinities and NaN through a cast).
pub(crate) fn double_literal(v: f64) -> String {
    if v.is_finite() {
        format!("{v:?}D")
    } else {
        format!("CAST({} AS DOUBLE)", string_literal(&format!("{v}")))
    }
}

/// Whether a Spark SQL type is a number.
pub(crate) fn is_numeric(spark_type: &str) -> bool {
    matches!(
        spark_type,
        "tinyint" | "smallint" | "int" | "bigint" | "float" | "double"
    ) || spark_type.starts_with("decimal")
}

/// Whether a Spark SQL type is a float (whose NaN counts as missing).
pub(crate) fn is_float(spark_type: &str) -> bool {
    matches!(spark_type, "float" | "double")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_and_keep_every_bit() {
        assert_eq!(ident("a`b"), "`a``b`");
        assert_eq!(string_literal(r"it's a \ "), r"'it\'s a \\ '");
        assert_eq!(double_literal(0.1), "0.1D");
        assert_eq!(double_literal(1e300), "1e300D");
        assert_eq!(double_literal(-7.0), "-7.0D");
        assert_eq!(double_literal(f64::INFINITY), "CAST('inf' AS DOUBLE)");
    }
}
