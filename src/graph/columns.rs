//! The columns of each stage's tables, where they are knowable before anything runs, so that a
//! check naming a column that will not be there is a config error at validate time.
//!
//! Knowable means: a source table on disk (its CSV header or Parquet schema), and what a built-in
//! stage says it writes given its params and the columns of its inputs
//! ([`imba_stages::BuiltinStage::output_columns`]). A shell stage's outputs are never knowable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use imba_stages::Registry;

use crate::diagnostic::{did_you_mean, Diagnostic};
use crate::graph::dag::Dag;
use crate::model::location::Location;
use crate::model::StageKind;

/// A table: a stage's output (by position), and the file in it when the output is a directory.
type Table = (usize, usize, Option<String>);

/// Every check of every stage that names a column its table will not have, after every source
/// table a built-in reads that is not a text CSV or lacks a column the built-in's params name.
/// A table read from one of `unknown` (the outputs of stages left out for their errors) has
/// unknown columns.
pub fn check(dag: &Dag, registry: &Registry, unknown: &[Location]) -> Vec<Diagnostic> {
    let pipeline = dag.pipeline();
    // Where each local output is written.
    let mut written: Vec<(PathBuf, bool, usize, usize)> = Vec::new();
    for (s, stage) in pipeline.stages.iter().enumerate() {
        for (p, port) in stage.outputs.iter().enumerate() {
            if let Some(path) = port.declared.location.local_path() {
                written.push((path.to_path_buf(), port.declared.dir, s, p));
            }
        }
    }
    let mut known: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    // Stages with an input that lacks columns: their own checks are still looked at, but what
    // reads their outputs is not (one missing column is one error, not one per stage after).
    let mut lacking: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    let mut diagnostics = Vec::new();
    for &s in dag.order() {
        let stage = dag.stage(s);
        if let StageKind::Builtin { name, params, .. } = &stage.kind {
            if let Some(builtin) = registry.get(name) {
                let inputs: Vec<Option<Vec<String>>> = stage
                    .inputs
                    .iter()
                    .map(|input| {
                        let location = &input.declared.location;
                        let left_out = unknown
                            .iter()
                            .any(|u| location.is_within(u) || u.is_within(location));
                        if left_out {
                            return None;
                        }
                        match columns_of_input(location, &written, &known, &lacking)? {
                            Ok(columns) => Some(columns),
                            Err(problem) => {
                                diagnostics.push(
                                    Diagnostic::error(problem)
                                        .at(input.span, format!("input of stage `{}`", stage.name)),
                                );
                                None
                            }
                        }
                    })
                    .collect();
                let lacks = lacking_columns(
                    stage,
                    &pipeline.workdir,
                    &builtin.input_columns(params),
                    &inputs,
                );
                if !lacks.is_empty() {
                    lacking.insert(s);
                }
                diagnostics.extend(lacks);
                for table in builtin.output_columns(params, &inputs) {
                    let named = stage.outputs.iter().any(|p| p.name.is_some());
                    let port = if named {
                        stage
                            .outputs
                            .iter()
                            .position(|p| p.name.as_deref() == Some(table.output.name))
                    } else {
                        (table.output.position < stage.outputs.len())
                            .then_some(table.output.position)
                    };
                    if let Some(port) = port {
                        known.insert((s, port, table.file), table.columns);
                    }
                }
            }
        }
        for check in &stage.checks {
            let Some(columns) = known.get(&(s, check.output, check.file.clone())) else {
                continue;
            };
            for (column, span) in &check.columns {
                if columns.contains(column) {
                    continue;
                }
                let port = &stage.outputs[check.output];
                let table = match (&port.name, &check.file) {
                    (Some(name), None) => format!("`{name}`"),
                    (Some(name), Some(file)) => format!("`{name}/{file}`"),
                    (None, None) => format!("`{}`", port.text),
                    (None, Some(file)) => format!("`{}/{file}`", port.text.trim_end_matches('/')),
                };
                let label = match did_you_mean(column, columns.iter().map(String::as_str)) {
                    Some(suggestion) => format!("did you mean `{suggestion}`?"),
                    None => "no such column".to_owned(),
                };
                diagnostics.push(
                    Diagnostic::error(format!(
                        "check `{}` of stage `{}` names column `{column}`, which the output {table} will not have",
                        check.name, stage.name
                    ))
                    .at(*span, label)
                    .note(format!("its columns will be: {}", shown_columns(columns))),
                );
            }
        }
    }
    diagnostics
}

/// One error per input of `stage` whose known columns lack some that its params name: the input,
/// every missing column at the param naming it, and the columns the table has.
fn lacking_columns(
    stage: &crate::model::Stage,
    workdir: &Path,
    wanted: &[imba_stages::InputColumn],
    inputs: &[Option<Vec<String>>],
) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    for (i, input) in stage.inputs.iter().enumerate() {
        let Some(Some(columns)) = inputs.get(i) else {
            continue;
        };
        let missing: Vec<&imba_stages::InputColumn> = wanted
            .iter()
            .filter(|w| match &w.input {
                None => stage.inputs.len() == 1,
                Some(name) => input.name.as_deref() == Some(name.as_str()),
            })
            .filter(|w| !columns.contains(&w.column))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let mut names: Vec<String> = Vec::new();
        for w in &missing {
            let name = format!("`{}`", imba_stages::safe::escape(&w.column));
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let file = input.declared.location.display(workdir);
        let mut diagnostic = Diagnostic::error(format!(
            "input `{}` of stage `{}` lacks {} its params name: {}",
            imba_stages::safe::escape(&file),
            stage.name,
            if names.len() == 1 {
                "a column"
            } else {
                "columns"
            },
            names.join(", ")
        ));
        let mut labelled = Vec::new();
        for w in &missing {
            let Some(span) = stage.param_spans.get(&w.pointer).copied() else {
                continue;
            };
            if labelled.contains(&span) {
                continue;
            }
            labelled.push(span);
            let label = match did_you_mean(&w.column, columns.iter().map(String::as_str)) {
                Some(close) => format!(
                    "not a column of the input: did you mean `{}`?",
                    imba_stages::safe::escape(close)
                ),
                None => "not a column of the input".to_owned(),
            };
            diagnostic = diagnostic.at(span, label);
        }
        diagnostic = diagnostic.also(input.span, "the input");
        diagnostics.push(diagnostic.note(format!("its columns are: {}", shown_columns(columns))));
    }
    diagnostics
}

/// Column names from a file, escaped so that a header cannot drive the terminal.
fn shown_columns(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| imba_stages::safe::escape(c).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of what an input reads: an upstream table already worked out, or a source table
/// on disk. `None` when unknown.
fn columns_of_input(
    location: &Location,
    written: &[(PathBuf, bool, usize, usize)],
    known: &BTreeMap<Table, Vec<String>>,
    lacking: &std::collections::BTreeSet<usize>,
) -> Option<Result<Vec<String>, String>> {
    let path = location.local_path()?;
    for (target, dir, s, p) in written {
        let file = if target == path {
            None
        } else {
            match path.strip_prefix(target) {
                Ok(inside) if *dir => Some(inside.to_string_lossy().into_owned()),
                _ => continue,
            }
        };
        // What a stage writes from an input that lacks columns is not known.
        if lacking.contains(s) {
            return None;
        }
        return known.get(&(*s, *p, file)).cloned().map(Ok);
    }
    source_columns(path)
}

/// The columns of a source table on disk; an error for a CSV that is not text. A Parquet file
/// that cannot be read is the stage's to report when it runs.
fn source_columns(path: &Path) -> Option<Result<Vec<String>, String>> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let csv = extension.eq_ignore_ascii_case("csv");
    if !(csv || extension.eq_ignore_ascii_case("parquet")) || !path.is_file() {
        return None;
    }
    match imba_stages::io::table::columns_of(path) {
        Ok(columns) => Some(Ok(columns)),
        Err(e) if csv => Some(Err(e.message)),
        Err(_) => None,
    }
}
