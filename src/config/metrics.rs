//! A stage's `metrics:`: named values measured on its outputs when they are committed, to follow
//! across partitions (`imba metrics`).
//!
//! ```yaml
//! metrics:
//!   rows: rows                                   # of the stage's only table
//!   mean_days: mean(days_since_prior_order)
//!   users: {sql: "SELECT count(DISTINCT user_id) FROM self", output: table}
//!   imputed_mean: {json: /days/mean, output: summary}
//! ```

use imba_stages::checks::{Measure, Metric};

use super::checks::{select_output_of, Reads};
use super::raw::{unknown_key, wrong_kind};
use super::yaml::{Key, Node, Value};
use crate::diagnostic::Diagnostic;
use crate::model::{Port, StageMetric};

/// Parses a rendered `metrics:` map against the stage's outputs, reporting every problem.
pub fn parse(
    stage: &str,
    node: &Node,
    outputs: &[Port],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<StageMetric> {
    let Value::Map(entries) = &node.value else {
        let key = Key {
            name: "metrics".into(),
            span: node.span,
        };
        diagnostics.push(wrong_kind(&key, node, "a map of metric names to values"));
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|(name, value)| one(stage, name, value, outputs, diagnostics))
        .collect()
}

fn one(
    stage: &str,
    name: &Key,
    value: &Node,
    outputs: &[Port],
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<StageMetric> {
    let before = diagnostics.len();
    let valid_name = !name.name.is_empty()
        && name
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid_name {
        diagnostics.push(
            Diagnostic::error(format!("invalid metric name `{}`", name.name))
                .at(name.span, "letters, digits, `_`, `-` and `.` only")
                .help("the name is a column of `imba metrics` and a CloudWatch metric name"),
        );
    }
    let table = |text: &str, node: &Node, diagnostics: &mut Vec<Diagnostic>| match text
        .parse::<Metric>()
    {
        Ok(metric) => Some(Measure::Table(metric)),
        Err(message) => {
            diagnostics.push(
                Diagnostic::error(message)
                    .at(node.span, "not a metric")
                    .help("or a map: `{sql: \"SELECT …\"}` over a table, `{json: /pointer}` into a JSON output"),
            );
            None
        }
    };
    let (measure, output) = match &value.value {
        Value::String(text) => (table(&text.text, value, diagnostics), None),
        Value::Map(fields) => {
            let mut measure = None;
            let mut output = None;
            let mut kinds = Vec::new();
            for (key, field) in fields {
                let text = field.as_str();
                match (key.name.as_str(), text) {
                    ("metric", Some(text)) => {
                        kinds.push(key);
                        measure = table(text, field, diagnostics);
                    }
                    ("sql", Some(text)) => {
                        kinds.push(key);
                        measure = Some(Measure::Sql(text.to_owned()));
                    }
                    ("json", Some(text)) => {
                        kinds.push(key);
                        if text.is_empty() || text.starts_with('/') {
                            measure = Some(Measure::Json(text.to_owned()));
                        } else {
                            diagnostics.push(
                                Diagnostic::error(format!(
                                    "`json` is a JSON pointer, starting with `/`: `/{text}`?"
                                ))
                                .at(field.span, "not a JSON pointer"),
                            );
                        }
                    }
                    ("output", Some(_)) => output = Some(field),
                    ("metric" | "sql" | "json" | "output", None) => {
                        diagnostics.push(wrong_kind(key, field, "a string"));
                    }
                    _ => diagnostics.push(unknown_key(
                        key,
                        &["json", "metric", "output", "sql"],
                        "in a metric",
                    )),
                }
            }
            match kinds.as_slice() {
                [_] => {}
                [] => diagnostics.push(
                    Diagnostic::error(format!("metric `{}` says nothing to measure", name.name))
                        .at(value.span, "add `metric`, `sql` or `json`"),
                ),
                [first, second, ..] => diagnostics.push(
                    Diagnostic::error(format!(
                        "metric `{}` has both `{}` and `{}`",
                        name.name, first.name, second.name
                    ))
                    .at(second.span, "one of them")
                    .also(first.span, "the other"),
                ),
            }
            (measure, output)
        }
        _ => {
            diagnostics.push(wrong_kind(
                name,
                value,
                "`rows`, `mean(COLUMN)`, `null_fraction(COLUMN)`, or a map with `sql` or `json`",
            ));
            (None, None)
        }
    };
    let measure = measure?;
    let reads = match measure {
        Measure::Json(_) => Reads::Json,
        _ => Reads::Table,
    };
    let target = select_output_of(stage, output, outputs, reads, diagnostics);
    if target.is_none() && output.is_none() {
        diagnostics.push(
            Diagnostic::error(format!("which output does metric `{}` read?", name.name))
                .at(name.span, "add `output:` to this metric")
                .help(match reads {
                    Reads::Table => {
                        "the stage has no single table output: e.g. `{metric: rows, output: table}`"
                    }
                    Reads::Json => {
                        "the stage has no single JSON output: e.g. `{json: /rows, output: summary}`"
                    }
                }),
        );
    }
    if diagnostics.len() > before {
        return None;
    }
    let (output, file) = target?;
    Some(StageMetric {
        name: name.name.clone(),
        measure,
        output,
        file,
        span: name.span,
    })
}
