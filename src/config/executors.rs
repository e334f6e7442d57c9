//! The `executors:` section: where stages may run other than in imba's process, by name.

use std::collections::BTreeMap;

use crate::diagnostic::{did_you_mean, Diagnostic, Span};
use crate::model::{ExecutorSettings, SlurmSettings};

use super::yaml::{Node, Value};

/// The kinds of executor an entry of `executors:` may be.
pub const KINDS: &[&str] = &["slurm"];
/// Keys of `executors.NAME.slurm`.
pub const SLURM_KEYS: &[&str] = &["account", "extra", "partition"];

/// The executors by name; every problem at its span.
pub fn settings(
    node: &Node,
    diagnostics: &mut Vec<Diagnostic>,
) -> BTreeMap<String, ExecutorSettings> {
    let mut executors = BTreeMap::new();
    for (name, value) in node.as_map().unwrap_or_default() {
        if name.name == "local" {
            diagnostics.push(
                Diagnostic::error("`local` is not a name for an executor")
                    .at(name.span, "reserved")
                    .help("`executor: local` on a stage runs it in imba's process, as without one"),
            );
            continue;
        }
        // A flawed executor is still known by its name, so that the stages naming it get no
        // second error; its own errors fail the load.
        executors.insert(
            name.name.clone(),
            ExecutorSettings::Slurm(SlurmSettings::default()),
        );
        let kinds = value.as_map().unwrap_or_default();
        if kinds.len() != 1 {
            diagnostics.push(
                Diagnostic::error(format!(
                    "executor `{}` must name one kind of executor",
                    name.name
                ))
                .at(value.span, "expected `slurm: {…}`")
                .help("`hpc: {slurm: {partition: batch}}`"),
            );
            continue;
        }
        let (kind, body) = &kinds[0];
        match kind.name.as_str() {
            "slurm" => {
                if let Some(slurm) = slurm(&name.name, body, diagnostics) {
                    executors.insert(name.name.clone(), ExecutorSettings::Slurm(slurm));
                }
            }
            _ => diagnostics.push(super::raw::unknown_key(
                kind,
                KINDS,
                "as a kind of executor",
            )),
        }
    }
    executors
}

fn slurm(name: &str, node: &Node, diagnostics: &mut Vec<Diagnostic>) -> Option<SlurmSettings> {
    let before = diagnostics.len();
    let mut settings = SlurmSettings::default();
    if matches!(node.value, Value::Null) {
        return Some(settings);
    }
    let Some(entries) = node.as_map() else {
        diagnostics.push(
            Diagnostic::error(format!(
                "`executors.{name}.slurm` must be a map, found {}",
                node.kind()
            ))
            .at(node.span, "expected `partition`, `account`, `extra`"),
        );
        return None;
    };
    // An option's value goes to sbatch as one argument: no spaces or quotes to split.
    let word = |value: &Node, what: &str, diagnostics: &mut Vec<Diagnostic>| match value.as_str() {
        Some(text) if !text.trim().is_empty() && !text.trim().starts_with('-') => {
            Some(text.trim().to_owned())
        }
        _ => {
            diagnostics.push(
                Diagnostic::error(format!("`executors.{name}.slurm.{what}` must be a name"))
                    .at(value.span, "expected a name"),
            );
            None
        }
    };
    for (key, value) in entries {
        match key.name.as_str() {
            "partition" => settings.partition = word(value, "partition", diagnostics),
            "account" => settings.account = word(value, "account", diagnostics),
            "extra" => match &value.value {
                Value::Seq(items) => {
                    for item in items {
                        match item.as_str() {
                            Some(option) if option.starts_with('-') => {
                                settings.extra.push(option.to_owned())
                            }
                            _ => diagnostics.push(
                                Diagnostic::error(format!(
                                    "`executors.{name}.slurm.extra` holds sbatch options"
                                ))
                                .at(item.span, "not an option")
                                .help("each item one option: `--qos=high`, `--constraint=ssd`"),
                            ),
                        }
                    }
                }
                _ => diagnostics.push(super::raw::wrong_kind(
                    key,
                    value,
                    "a list of sbatch options (`[--qos=high]`)",
                )),
            },
            _ => diagnostics.push(super::raw::unknown_key(
                key,
                SLURM_KEYS,
                &format!("in `executors.{name}.slurm`"),
            )),
        }
    }
    (diagnostics.len() == before).then_some(settings)
}

/// "no executor `NAME`", with the declared ones.
pub fn unknown(
    name: &str,
    span: Span,
    executors: &BTreeMap<String, ExecutorSettings>,
) -> Diagnostic {
    let diagnostic = Diagnostic::error(format!("the pipeline declares no executor `{name}`"));
    let diagnostic = match did_you_mean(name, executors.keys().map(String::as_str)) {
        Some(close) => diagnostic.at(span, format!("did you mean `{close}`?")),
        None => diagnostic.at(span, "not in `executors:`"),
    };
    diagnostic.help(declared(executors))
}

/// `--executor NAME` must name a declared executor (or `local`).
pub fn check_flag(
    name: &str,
    executors: &BTreeMap<String, ExecutorSettings>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    if name != "local" && !executors.contains_key(name) {
        diagnostics.push(
            Diagnostic::error(format!(
                "`--executor {name}`: the pipeline declares no executor `{name}`"
            ))
            .help(declared(executors)),
        );
    }
}

fn declared(executors: &BTreeMap<String, ExecutorSettings>) -> String {
    if executors.is_empty() {
        "declare one: `executors: {hpc: {slurm: {partition: batch}}}` (docs/executors.md)"
            .to_owned()
    } else {
        format!(
            "declared: {}",
            executors
                .keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
