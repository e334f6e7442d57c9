//! A stage's `checks:` and the `on_failure:` hooks: from YAML nodes to typed checks with spans.
//!
//! Each item of `checks:` is a map with exactly one check (`rows`, `change`, `not_null`,
//! `unique`, `range`, `sql`) and optionally `severity`, `output` and `name`. Every problem in
//! every item is reported, each at its own key or value.

use imba_stages::checks::{Against, Check, Metric};

use crate::diagnostic::{Diagnostic, Span};
use crate::model::{Hook, Severity, StageCheck};

use super::raw::{list, unknown_key, wrong_kind};
use super::yaml::{Key, Node, Value};
use crate::model::Port;

/// The checks a stage can carry, in the order the docs list them.
pub const CHECK_KINDS: &[&str] = &["rows", "change", "not_null", "unique", "range", "sql"];
/// What else a check item may say.
pub const CHECK_OPTIONS: &[&str] = &["severity", "output", "name"];

/// Parses a rendered `checks:` list against the stage's outputs.
pub fn parse(
    stage: &str,
    node: &Node,
    outputs: &[Port],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<StageCheck> {
    let items = match &node.value {
        Value::Seq(items) => items.as_slice(),
        Value::Null => return Vec::new(),
        _ => {
            let key = Key {
                name: "checks".into(),
                span: node.span,
            };
            diagnostics.push(wrong_kind(&key, node, "a list of checks"));
            return Vec::new();
        }
    };
    let mut unplaced = Vec::new();
    let checks = items
        .iter()
        .filter_map(|item| parse_item(stage, item, outputs, &mut unplaced, diagnostics))
        .collect();
    if let Some((first, rest)) = unplaced.split_first() {
        diagnostics.push(unplaced_checks(stage, first, rest, outputs));
    }
    checks
}

/// One error for every check of a stage that does not say which of its tables it reads.
fn unplaced_checks(stage: &str, first: &Key, rest: &[Key], outputs: &[Port]) -> Diagnostic {
    let tables: Vec<String> = outputs
        .iter()
        .filter(|p| !p.declared.dir && is_table(&p.text))
        .map(shown)
        .collect();
    let why = if tables.is_empty() {
        format!("stage `{stage}` writes no table file (`.parquet` or `.csv`)")
    } else {
        format!(
            "stage `{stage}` writes {} tables: {}",
            tables.len(),
            tables.join(", ")
        )
    };
    let message = if rest.is_empty() {
        format!("which output does this `{}` check read?", first.name)
    } else {
        format!("which outputs do these {} checks read?", rest.len() + 1)
    };
    let mut diagnostic = Diagnostic::error(message).at(first.span, "add `output:` to this check");
    for key in rest {
        diagnostic = diagnostic.also(key.span, "and to this one");
    }
    diagnostic.note(why).help(
        "name the output, e.g. `output: table`, or a file in a directory output, e.g. `output: imputed/imputed_mean.parquet`",
    )
}

fn shown(port: &Port) -> String {
    match &port.name {
        Some(name) => format!("`{name}`"),
        None => format!("`{}`", port.text),
    }
}

fn parse_item(
    stage: &str,
    item: &Node,
    outputs: &[Port],
    unplaced: &mut Vec<Key>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<StageCheck> {
    let before = diagnostics.len();
    let Some(entries) = item.as_map() else {
        diagnostics.push(
            Diagnostic::error(format!("a check must be a map, found {}", item.kind()))
                .at(item.span, "expected e.g. `rows: {min: 1000}`"),
        );
        return None;
    };
    let mut kinds: Vec<(&Key, &Node)> = Vec::new();
    let mut severity = Severity::Fail;
    let mut output: Option<&Node> = None;
    let mut name: Option<String> = None;
    for (key, value) in entries {
        match key.name.as_str() {
            kind if CHECK_KINDS.contains(&kind) => kinds.push((key, value)),
            "severity" => match value.as_str() {
                Some("warn") => severity = Severity::Warn,
                Some("fail") => severity = Severity::Fail,
                _ => diagnostics.push(wrong_kind(key, value, "`warn` or `fail`")),
            },
            "output" => match value.as_str() {
                Some(_) => output = Some(value),
                None => diagnostics.push(wrong_kind(key, value, "the name or path of an output")),
            },
            "name" => match value.as_str() {
                Some(text) => name = Some(text.to_owned()),
                None => diagnostics.push(wrong_kind(key, value, "a string")),
            },
            _ => {
                let known: Vec<&str> = CHECK_KINDS.iter().chain(CHECK_OPTIONS).copied().collect();
                diagnostics.push(unknown_key(key, &known, "in a check"));
            }
        }
    }
    let (key, value) = match kinds.as_slice() {
        [one] => *one,
        [] => {
            if diagnostics.len() == before {
                diagnostics.push(
                    Diagnostic::error(
                        "this check says what to do on failure, but not what to check",
                    )
                    .at(item.span, "no check here")
                    .help(format!("add one of {}", list(CHECK_KINDS))),
                );
            }
            return None;
        }
        [first, second, ..] => {
            diagnostics.push(
                Diagnostic::error(format!(
                    "one check item holds both `{}` and `{}`",
                    first.0.name, second.0.name
                ))
                .at(second.0.span, "second check here")
                .also(first.0.span, "first check here")
                .help("write each check as its own list item (`- rows: …` then `- unique: …`)"),
            );
            return None;
        }
    };
    let mut columns = Vec::new();
    let check = parse_check(key, value, &mut columns, diagnostics);
    let target = select_output(stage, output, outputs, diagnostics);
    if target.is_none() && output.is_none() {
        unplaced.push(key.clone());
    }
    if diagnostics.len() > before {
        return None;
    }
    let (check, (output, file)) = (check?, target?);
    Some(StageCheck {
        name: name.unwrap_or_else(|| check.label()),
        check,
        severity,
        output,
        file,
        span: key.span,
        columns,
    })
}

fn parse_check(
    key: &Key,
    value: &Node,
    columns: &mut Vec<(String, Span)>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Check> {
    match key.name.as_str() {
        "rows" => {
            let fields = fields(key, value, &["min", "max"], &[], diagnostics)?;
            let min = count(fields.get("min").copied(), diagnostics);
            let max = count(fields.get("max").copied(), diagnostics);
            let (min, max) = (min?, max?);
            if min.is_none() && max.is_none() {
                diagnostics.push(
                    Diagnostic::error("`rows` needs `min`, `max` or both")
                        .at(value.span, "no bound here"),
                );
                return None;
            }
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo > hi {
                    diagnostics.push(
                        Diagnostic::error(format!("`rows` has `min` {lo} above `max` {hi}"))
                            .at(value.span, "no table can pass this"),
                    );
                    return None;
                }
            }
            Some(Check::Rows { min, max })
        }
        "change" => {
            let fields = fields(
                key,
                value,
                &["metric", "max_pct", "against"],
                &["max_pct"],
                diagnostics,
            )?;
            let metric = match fields.get("metric") {
                None => Some(Metric::Rows),
                Some(node) => match node.as_str().map(str::parse::<Metric>) {
                    Some(Ok(metric)) => {
                        if let Metric::Mean(c) | Metric::NullFraction(c) = &metric {
                            columns.push((c.clone(), node.span));
                        }
                        Some(metric)
                    }
                    Some(Err(message)) => {
                        diagnostics.push(Diagnostic::error(message).at(node.span, "not a metric"));
                        None
                    }
                    None => {
                        let key = Key {
                            name: "metric".into(),
                            span: node.span,
                        };
                        diagnostics.push(wrong_kind(
                            &key,
                            node,
                            "`rows`, `mean(COLUMN)` or `null_fraction(COLUMN)`",
                        ));
                        None
                    }
                },
            };
            let max_pct = fields.get("max_pct").and_then(|node| match number(node) {
                Some(pct) if pct >= 0.0 => Some(pct),
                _ => {
                    diagnostics.push(
                        Diagnostic::error("`max_pct` must be a number ≥ 0 (a percentage)")
                            .at(node.span, format!("found {}", describe(node))),
                    );
                    None
                }
            });
            let against = match fields.get("against") {
                None => Some(Against::Committed),
                Some(node) => match node.as_str() {
                    Some("committed") => Some(Against::Committed),
                    Some("previous") => Some(Against::Previous),
                    _ => {
                        diagnostics.push(
                            super::raw::not_one_of("against", node, &["committed", "previous"])
                                .help(
                                    "`committed` compares with the output committed at the same path; `previous` with the previous partition's",
                                ),
                        );
                        None
                    }
                },
            };
            Some(Check::Change {
                metric: metric?,
                max_pct: max_pct?,
                against: against?,
            })
        }
        "not_null" | "unique" => {
            let names = column_list(key, value, columns, diagnostics)?;
            Some(if key.name == "unique" {
                Check::Unique(names)
            } else {
                Check::NotNull(names)
            })
        }
        "range" => {
            let Some(entries) = value.as_map().filter(|e| !e.is_empty()) else {
                diagnostics.push(wrong_kind(key, value, "a map of columns to `[lo, hi]`"));
                return None;
            };
            let mut ranges = Vec::new();
            let mut ok = true;
            for (column, bounds) in entries {
                columns.push((column.name.clone(), column.span));
                let pair = match &bounds.value {
                    Value::Seq(items) if items.len() == 2 => {
                        let bound = |node: &Node| match node.value {
                            Value::Null => Some(None),
                            _ => number(node).map(Some),
                        };
                        bound(&items[0]).zip(bound(&items[1]))
                    }
                    _ => None,
                };
                match pair {
                    Some((Some(lo), Some(hi))) if lo > hi => {
                        diagnostics.push(
                            Diagnostic::error(format!(
                                "the range of `{}` has its low end above its high end",
                                column.name
                            ))
                            .at(bounds.span, "no value can pass this"),
                        );
                        ok = false;
                    }
                    Some((lo, hi)) => ranges.push((column.name.clone(), lo, hi)),
                    None => {
                        diagnostics.push(
                            Diagnostic::error(format!(
                                "the range of `{}` must be `[lo, hi]`: two numbers, or `null` for an open end",
                                column.name
                            ))
                            .at(bounds.span, match &bounds.value {
                                Value::Seq(items) if items.len() == 1 => "1 value here".to_owned(),
                                Value::Seq(items) if items.len() != 2 => {
                                    format!("{} values here", items.len())
                                }
                                Value::Seq(_) => "not two numbers".to_owned(),
                                _ => format!("found {}", bounds.kind()),
                            }),
                        );
                        ok = false;
                    }
                }
            }
            ok.then_some(Check::Range(ranges))
        }
        "sql" => match value.as_str() {
            Some(query) if !query.trim().is_empty() => Some(Check::Sql(query.to_owned())),
            Some(_) => {
                diagnostics.push(
                    Diagnostic::error("`sql` is empty")
                        .at(value.span, "no query here")
                        .help("e.g. `sql: SELECT count(*) > 0 FROM self`: every value it returns must be true"),
                );
                None
            }
            _ => {
                diagnostics.push(wrong_kind(
                    key,
                    value,
                    "a polars SQL query over the table `self` that returns booleans",
                ));
                None
            }
        },
        _ => None,
    }
}

/// The entries of a check's map, every unknown key and every missing `required` one reported.
fn fields<'a>(
    key: &Key,
    value: &'a Node,
    known: &[&str],
    required: &[&str],
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<std::collections::BTreeMap<&'a str, &'a Node>> {
    let Some(entries) = value.as_map() else {
        let expected = format!("a map with {}", list(known));
        diagnostics.push(wrong_kind(key, value, &expected));
        return None;
    };
    // What is there is still checked when something is missing or unknown: every problem at once.
    let mut found = std::collections::BTreeMap::new();
    for (k, v) in entries {
        if known.contains(&k.name.as_str()) {
            found.insert(k.name.as_str(), v);
        } else {
            diagnostics.push(unknown_key(k, known, &format!("in `{}`", key.name)));
        }
    }
    for name in required {
        if !found.contains_key(name) {
            diagnostics.push(
                Diagnostic::error(format!("`{}` needs `{name}`", key.name))
                    .at(value.span, format!("no `{name}` here")),
            );
        }
    }
    Some(found)
}

fn count(node: Option<&Node>, diagnostics: &mut Vec<Diagnostic>) -> Option<Option<u64>> {
    let Some(node) = node else {
        return Some(None);
    };
    match node.value {
        Value::Int(n) if n >= 0 => Some(Some(n as u64)),
        Value::Null => Some(None),
        _ => {
            diagnostics.push(
                Diagnostic::error("a row count must be a whole number ≥ 0")
                    .at(node.span, format!("found {}", describe(node))),
            );
            None
        }
    }
}

fn number(node: &Node) -> Option<f64> {
    match node.value {
        Value::Int(n) => Some(n as f64),
        Value::Float(x) if x.is_finite() => Some(x),
        _ => None,
    }
}

fn describe(node: &Node) -> String {
    match &node.value {
        Value::Int(n) => n.to_string(),
        Value::Float(x) => x.to_string(),
        _ => node.kind().to_owned(),
    }
}

/// `[a, b]` or a single `a`.
fn column_list(
    key: &Key,
    value: &Node,
    columns: &mut Vec<(String, Span)>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Vec<String>> {
    let items: Vec<&Node> = match &value.value {
        Value::Seq(items) if !items.is_empty() => items.iter().collect(),
        Value::String(_) => vec![value],
        Value::Seq(_) => {
            diagnostics.push(
                Diagnostic::error(format!("`{}` names no columns", key.name))
                    .at(value.span, "an empty list"),
            );
            return None;
        }
        _ => {
            diagnostics.push(wrong_kind(key, value, "a list of column names"));
            return None;
        }
    };
    let mut names = Vec::new();
    for item in items {
        match item.as_str() {
            Some(name) => {
                names.push(name.to_owned());
                columns.push((name.to_owned(), item.span));
            }
            None => {
                diagnostics.push(wrong_kind(key, item, "a column name"));
                return None;
            }
        }
    }
    Some(names)
}

/// The output a check reads: the one `output:` names (a port name or path as written, optionally
/// followed by `/FILE` inside a directory output), or else the stage's only table file. `None`
/// with no diagnostic when there is no `output:` and no single table: the caller reports those
/// checks together.
/// What kind of file a check or metric reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// A table: `.parquet` or `.csv`.
    Table,
    /// A JSON file (a summary).
    Json,
}

impl Reads {
    fn accepts(self, path: &str) -> bool {
        match self {
            Reads::Table => is_table(path),
            Reads::Json => path.to_ascii_lowercase().ends_with(".json"),
        }
    }

    fn described(self) -> &'static str {
        match self {
            Reads::Table => "a table file (`.parquet` or `.csv`)",
            Reads::Json => "a JSON file (`.json`)",
        }
    }
}

fn select_output(
    stage: &str,
    output: Option<&Node>,
    outputs: &[Port],
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<(usize, Option<String>)> {
    select_output_of(stage, output, outputs, Reads::Table, diagnostics)
}

/// The output (and file in a directory output) that `output:` names, or without it the
/// stage's only output of the kind read. `None` (with a diagnostic when `output:` is wrong).
pub fn select_output_of(
    stage: &str,
    output: Option<&Node>,
    outputs: &[Port],
    reads: Reads,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<(usize, Option<String>)> {
    let Some(node) = output else {
        let mut tables = outputs
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.declared.dir && reads.accepts(&p.text))
            .map(|(i, _)| i);
        return match (tables.next(), tables.next()) {
            (Some(one), None) => Some((one, None)),
            _ => None,
        };
    };
    let text = node.as_str().unwrap_or_default().trim_end_matches('/');
    let matches = |port: &Port, text: &str| {
        port.name.as_deref() == Some(text) || port.text.trim_end_matches('/') == text
    };
    if let Some(i) = outputs.iter().position(|p| matches(p, text)) {
        if outputs[i].declared.dir {
            diagnostics.push(
                Diagnostic::error(format!(
                    "output {} is a directory: name a table file in it",
                    shown(&outputs[i])
                ))
                .at(node.span, "a directory")
                .help(format!("e.g. `output: {text}/FILE.parquet`")),
            );
            return None;
        }
        return Some((i, None));
    }
    // `NAME/FILE` inside a directory output: the longest output that is a prefix.
    let inside = outputs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.declared.dir)
        .filter_map(|(i, p)| {
            [p.name.as_deref(), Some(p.text.trim_end_matches('/'))]
                .into_iter()
                .flatten()
                .filter_map(|prefix| {
                    text.strip_prefix(prefix)
                        .and_then(|rest| rest.strip_prefix('/'))
                        .filter(|rest| !rest.is_empty())
                        .map(|rest| (prefix.len(), i, rest.to_owned()))
                })
                .max()
        })
        .max();
    match inside {
        Some((_, i, file)) if reads.accepts(&file) && !file.split('/').any(|s| s == "..") => {
            Some((i, Some(file)))
        }
        Some((_, _, file)) => {
            diagnostics.push(
                Diagnostic::error(format!("`{file}` is not {}", reads.described()))
                    .at(node.span, format!("this reads {}", reads.described())),
            );
            None
        }
        None => {
            let names: Vec<String> = outputs.iter().map(shown).collect();
            let diagnostic = Diagnostic::error(format!("stage `{stage}` has no output `{text}`"))
                .at(node.span, "no such output");
            diagnostics.push(if names.is_empty() {
                diagnostic.note("the stage declares no outputs")
            } else {
                diagnostic.note(format!("its outputs are {}", names.join(", ")))
            });
            None
        }
    }
}

fn is_table(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".parquet") || lower.ends_with(".csv")
}

/// Parses a rendered `on_failure:` command.
pub fn hook(node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Option<Hook> {
    match node.as_str() {
        Some(command) if !command.trim().is_empty() => Some(Hook {
            command: command.to_owned(),
            span: node.span,
        }),
        _ => {
            let key = Key {
                name: "on_failure".into(),
                span: node.span,
            };
            diagnostics.push(wrong_kind(&key, node, "a shell command"));
            None
        }
    }
}
