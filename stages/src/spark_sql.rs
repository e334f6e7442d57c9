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
    /// Writes the rows of `sql`, in their order, as the stage's table output; returns how many.
    fn write(&mut self, sql: &str) -> Result<usize, Self::Error>;
}

/// One input of a stage on Spark.
#[derive(Debug, Clone)]
pub struct Input {
    /// Its name under `inputs:` (empty in a list of inputs).
    pub name: String,
    /// The temporary view it is read into.
    pub view: String,
    /// How messages name it (its path, as the local engine names it).
    pub source: String,
    /// Where this machine reads its schema (the footer of a local Parquet file).
    pub path: std::path::PathBuf,
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

/// The one number a `SELECT count(1) …` gives; no row at all is an error, never a 0.
pub(crate) fn count<S: Session>(session: &mut S, sql: &str) -> Result<usize, Failure<S::Error>> {
    let row = one_row(session.rows(sql).map_err(Failure::Session)?)?;
    Ok(row.first().and_then(Json::as_u64).unwrap_or(0) as usize)
}

/// The first row of a query that gives one.
pub(crate) fn one_row<E>(rows: Vec<Vec<Json>>) -> Result<Vec<Json>, Failure<E>> {
    rows.into_iter()
        .next()
        .ok_or_else(|| StageError::new("Spark returned no row for a count").into())
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

/// An expression written for polars SQL (a feature, a condition, a derived column) as the Spark
/// SQL that means the same, or why it does not parse. Parsed as polars parses it (sqlparser's
/// generic dialect) and printed back with three differences of reading made explicit: a number
/// with a point or an exponent is a double (`1.0` is a decimal in Spark, and `avg` of a decimal
/// rounds to a few places), a `'string'` is escaped as Spark reads it (backslashes are escapes
/// there), and a `"quoted"` name is a backquoted one (a string in Spark).
pub(crate) fn expression(sql: &str) -> Result<String, String> {
    use sqlparser::dialect::GenericDialect;
    use sqlparser::parser::Parser;
    use sqlparser::tokenizer::Token;

    let mut parser = Parser::new(&GenericDialect)
        .try_with_sql(sql)
        .map_err(|e| e.to_string())?;
    let mut expr = parser.parse_expr().map_err(|e| e.to_string())?;
    let rest = parser.peek_token();
    if rest.token != Token::EOF {
        return Err(format!("unexpected `{}` after the expression", rest.token));
    }
    as_spark(&mut expr)?;
    Ok(expr.to_string())
}

/// A query written for polars SQL over the table `self` (a `sql` check) as the Spark SQL that
/// means the same over the view `view`: one `SELECT`, its expressions read as [`expression`]
/// reads them.
pub(crate) fn query(sql: &str, view: &str) -> Result<String, String> {
    use sqlparser::ast::{visit_relations_mut, Ident, ObjectName, Statement};
    use sqlparser::dialect::GenericDialect;
    use sqlparser::parser::Parser;
    use std::ops::ControlFlow;

    let mut statements = Parser::parse_sql(&GenericDialect, sql).map_err(|e| e.to_string())?;
    let mut statement = match (statements.pop(), statements.is_empty()) {
        (Some(statement @ Statement::Query(_)), true) => statement,
        _ => return Err("the query must be one SELECT".to_owned()),
    };
    as_spark(&mut statement)?;
    let is_self = |id: &Ident| id.value.eq_ignore_ascii_case("self");
    let _ = visit_relations_mut(&mut statement, |name| {
        if name.to_string().eq_ignore_ascii_case("self") {
            *name = ObjectName::from(vec![Ident::new(view)]);
        }
        ControlFlow::<()>::Continue(())
    });
    // `self.x`: the view's column.
    let _ = sqlparser::ast::visit_expressions_mut(&mut statement, |e| {
        if let sqlparser::ast::Expr::CompoundIdentifier(ids) = e {
            if ids.len() == 2 && is_self(&ids[0]) {
                ids[0] = Ident::new(view);
            }
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(statement.to_string())
}

/// The row id imba adds to a scan: `monotonically_increasing_id()`, which increases with file
/// order within one scan of a file.
pub(crate) const ROW_ID: &str = "`__imba_row`";

/// The rows of `from` (a view, and maybe a `WHERE`), each with its [`ROW_ID`].
pub(crate) fn numbered(from: &str) -> String {
    format!("(SELECT *, monotonically_increasing_id() AS {ROW_ID} FROM {from})")
}

/// The first row of `from` in file order that repeats an earlier one on `keys` (Spark SQL
/// names, joined by commas; nulls equal nulls): its [`ROW_ID`], then the keys.
pub(crate) fn first_repeat(keys: &str, from: &str) -> String {
    format!(
        "SELECT {ROW_ID}, {keys} FROM (SELECT *, row_number() OVER (PARTITION BY {keys} ORDER BY {ROW_ID}) AS `__imba_copy` FROM {}) WHERE `__imba_copy` = 2 ORDER BY {ROW_ID} LIMIT 1",
        numbered(from)
    )
}

/// Functions whose result differs between polars and Spark, and why.
const DIFFERENT: &[(&str, &str)] = &[
    (
        "first",
        "takes a value in file order, which Spark does not keep",
    ),
    (
        "last",
        "takes a value in file order, which Spark does not keep",
    ),
    (
        "first_value",
        "takes a value in file order, which Spark does not keep",
    ),
    (
        "last_value",
        "takes a value in file order, which Spark does not keep",
    ),
    (
        "nth_value",
        "takes a value in file order, which Spark does not keep",
    ),
    (
        "string_agg",
        "joins values in file order, which Spark does not keep",
    ),
    (
        "array_agg",
        "collects values in file order, which Spark does not keep",
    ),
    (
        "listagg",
        "joins values in file order, which Spark does not keep",
    ),
    (
        "group_concat",
        "joins values in file order, which Spark does not keep",
    ),
    (
        "any_value",
        "takes any value, not the same one on both engines",
    ),
    ("mode", "breaks ties differently on Spark"),
    (
        "concat",
        "skips nulls in polars and gives null on Spark (use `coalesce` on its arguments)",
    ),
];

/// Makes polars SQL's readings explicit for Spark (see [`expression`]), or says what has no
/// exact equivalent there: a function of [`DIFFERENT`], `%` (the divisor's sign in polars, the
/// dividend's in Spark), a `LIKE` pattern with a backslash (an escape in Spark, a character in
/// polars).
fn as_spark<V: sqlparser::ast::VisitMut>(node: &mut V) -> Result<(), String> {
    use sqlparser::ast::{visit_expressions_mut, BinaryOperator, Expr, Value};
    use std::ops::ControlFlow;

    let requote = |id: &mut sqlparser::ast::Ident| {
        if id.quote_style == Some('"') {
            id.quote_style = Some('`');
        }
    };
    let found = visit_expressions_mut(node, |e| {
        match e {
            Expr::Value(v) => {
                let text = match &v.value {
                    Value::Number(n, _) if n.contains(['.', 'e', 'E']) => Some(format!("{n}D")),
                    Value::SingleQuotedString(s) => Some(string_literal(s)),
                    _ => None,
                };
                if let Some(text) = text {
                    // Printed as it is.
                    v.value = Value::Placeholder(text);
                }
            }
            Expr::Identifier(id) => requote(id),
            Expr::CompoundIdentifier(ids) => ids.iter_mut().for_each(requote),
            Expr::Function(f) => {
                let name = f.name.to_string().to_lowercase();
                if let Some((_, why)) = DIFFERENT.iter().find(|(n, _)| *n == name) {
                    return ControlFlow::Break(format!("`{name}` {why}"));
                }
            }
            Expr::BinaryOp {
                op: BinaryOperator::Modulo,
                ..
            } => {
                return ControlFlow::Break(
                    "`%` takes the sign of the divisor in polars and of the dividend in Spark"
                        .to_owned(),
                )
            }
            Expr::Like {
                pattern,
                escape_char: None,
                ..
            }
            | Expr::ILike {
                pattern,
                escape_char: None,
                ..
            } if pattern.to_string().contains('\\') => return ControlFlow::Break(
                "a backslash in a `LIKE` pattern is a character in polars and an escape in Spark"
                    .to_owned(),
            ),
            _ => {}
        }
        ControlFlow::Continue(())
    });
    match found {
        ControlFlow::Break(why) => Err(format!("no exact equivalent on Spark: {why}")),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The local engine's name of a Spark SQL type, for messages (`bigint` is `i64`).
pub(crate) fn local_name(spark_type: &str) -> String {
    match spark_type {
        "string" => "str",
        "bigint" => "i64",
        "int" => "i32",
        "smallint" => "i16",
        "tinyint" => "i8",
        "double" => "f64",
        "float" => "f32",
        "boolean" => "bool",
        other => other,
    }
    .to_owned()
}

/// The Spark SQL type a column of local type `local` is written as, when a Spark column of
/// `spark` type holds the same values: the same kind (integer, float, string, boolean, date),
/// written at the local width (an unsigned count as `bigint`: Spark has no unsigned types).
/// `None` when the kinds differ: the engines would give different values.
pub(crate) fn conformed(local: &polars::prelude::DataType, spark: &str) -> Option<&'static str> {
    use polars::prelude::DataType as D;
    let integer = matches!(spark, "tinyint" | "smallint" | "int" | "bigint");
    match local {
        D::Int8 if integer => Some("tinyint"),
        D::Int16 | D::UInt8 if integer => Some("smallint"),
        D::Int32 | D::UInt16 if integer => Some("int"),
        D::Int64 | D::UInt32 | D::UInt64 if integer => Some("bigint"),
        D::Float32 if spark == "float" => Some("float"),
        D::Float64 if spark == "double" => Some("double"),
        D::String if spark == "string" => Some("string"),
        D::Boolean if spark == "boolean" => Some("boolean"),
        D::Date if spark == "date" => Some("date"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polars_sql_is_printed_as_the_spark_sql_that_means_the_same() {
        let spark = |sql: &str| expression(sql).unwrap();
        assert_eq!(
            spark("avg(CASE WHEN days = 30 THEN 1.0 ELSE 0.0 END)"),
            "avg(CASE WHEN days = 30 THEN 1.0D ELSE 0.0D END)"
        );
        assert_eq!(spark("x * 1e-3 + .5"), "x * 1e-3D + .5D");
        assert_eq!(spark(r#""odd name" > 2"#), "`odd name` > 2");
        assert_eq!(spark(r"m >= 'it''s \n'"), r"m >= 'it\'s \\n'");
        assert_eq!(spark("count(*)"), "count(*)");
        assert!(expression("avg(x) avg(y)").is_err());
        assert_eq!(
            query(r#"SELECT count(*) > 0.5 FROM self WHERE "a b" = 'x'"#, "v1").unwrap(),
            "SELECT count(*) > 0.5D FROM v1 WHERE `a b` = 'x'"
        );
        assert_eq!(
            query("SELECT max(self.x) < 3 FROM self", "v1").unwrap(),
            "SELECT max(v1.x) < 3 FROM v1"
        );
        assert!(query("DROP TABLE self", "v1").is_err());
        for refused in [
            "first(order_id)",
            "max(x) % 7",
            "concat(a, b)",
            r"name LIKE 'C:\%'",
        ] {
            let why = expression(refused).unwrap_err();
            assert!(why.starts_with("no exact equivalent on Spark: "), "{why}");
        }
        assert_eq!(spark("name LIKE 'C:%'"), "name LIKE 'C:%'");
        assert!(expression("avg(").is_err());
    }

    #[test]
    fn a_column_keeps_its_local_type_where_the_kinds_agree() {
        use polars::prelude::DataType as D;
        assert_eq!(conformed(&D::UInt32, "bigint"), Some("bigint"));
        assert_eq!(conformed(&D::Int32, "bigint"), Some("int"));
        assert_eq!(conformed(&D::Float64, "double"), Some("double"));
        assert_eq!(conformed(&D::Float64, "decimal(6,5)"), None);
        // 32-bit floats on Spark are other values than polars' 64-bit ones.
        assert_eq!(conformed(&D::Float64, "float"), None);
        assert_eq!(conformed(&D::Int64, "double"), None);
    }

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
