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

/// Every check of every stage that names a column its table will not have. A table read from
/// one of `unknown` (the outputs of stages left out for their errors) has unknown columns.
pub fn check(dag: &Dag, registry: &Registry, unknown: &[Location]) -> Vec<Diagnostic> {
    let pipeline = dag.pipeline();
    if pipeline.stages.iter().all(|s| s.checks.is_empty()) {
        return Vec::new();
    }
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
                        columns_of_input(location, &written, &known)
                    })
                    .collect();
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
                    .note(format!("its columns will be: {}", columns.join(", "))),
                );
            }
        }
    }
    diagnostics
}

/// The columns of what an input reads: an upstream table already worked out, or a source table
/// on disk. `None` when unknown.
fn columns_of_input(
    location: &Location,
    written: &[(PathBuf, bool, usize, usize)],
    known: &BTreeMap<Table, Vec<String>>,
) -> Option<Vec<String>> {
    let path = location.local_path()?;
    for (target, dir, s, p) in written {
        if target == path {
            return known.get(&(*s, *p, None)).cloned();
        }
        if *dir {
            if let Ok(inside) = path.strip_prefix(target) {
                let file = inside.to_string_lossy().into_owned();
                return known.get(&(*s, *p, Some(file))).cloned();
            }
        }
    }
    source_columns(path)
}

fn source_columns(path: &Path) -> Option<Vec<String>> {
    let table = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv") || e.eq_ignore_ascii_case("parquet"));
    if !table || !path.is_file() {
        return None;
    }
    imba_stages::io::table::columns_of(path).ok()
}
