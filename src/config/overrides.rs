//! `--vars FILE` and `--set key=value`: Hydra-style overrides of vars and stage params.
//!
//! `--set out=DIR` sets the var `out`; `--set vars.out=DIR` says so explicitly;
//! `--set clean_orders.iqr.k=2.0` sets the param `iqr.k` of stage `clean_orders`. Values are
//! YAML (`2.0` is a number, `[a, b]` a list). A var must exist unless the key starts with `+`;
//! params may be created, since their defaults live in the stage's params type, which checks them.

use std::path::PathBuf;

use crate::diagnostic::{did_you_mean, Diagnostic, Sources, Span};

use super::yaml::{self, Key, Node, Value};

/// Overrides given on the command line, in the order given.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--vars FILE`, merged in order before any `--set`.
    pub vars_files: Vec<PathBuf>,
    /// `--set KEY=VALUE`, applied in order.
    pub sets: Vec<String>,
    /// For each partition set with `discover:`, the paths its pattern matched (as listed by the
    /// store, before the pipeline is loaded with them).
    pub discovered: std::collections::BTreeMap<String, Vec<String>>,
    /// `--engine`: the engine of every built-in stage that can run on it and names none itself.
    pub engine: Option<crate::model::Engine>,
    /// `--executor`: the executor of every stage that names none itself.
    pub executor: Option<String>,
}

impl Overrides {
    /// The arguments as a person gave them (`--vars FILE`, `--set KEY=VALUE`), the value of a
    /// key that looks like a secret masked: for run records.
    pub fn shown(&self) -> Vec<String> {
        let files = self
            .vars_files
            .iter()
            .map(|f| format!("--vars {}", f.display()));
        let sets = self.sets.iter().map(|set| match set.split_once('=') {
            Some((key, _)) if super::looks_secret(key) => format!("--set {key}=***"),
            _ => format!("--set {set}"),
        });
        let engine = self.engine.map(|e| format!("--engine {}", e.as_str()));
        let executor = self.executor.as_ref().map(|e| format!("--executor {e}"));
        files.chain(sets).chain(engine).chain(executor).collect()
    }
}

/// Applies the overrides to a parsed pipeline's `vars:` and stage `params:`.
pub fn apply(
    root: &mut Node,
    overrides: &Overrides,
    sources: &mut Sources,
    diagnostics: &mut Vec<Diagnostic>,
) {
    if !matches!(root.value, Value::Map(_)) {
        return;
    }
    for path in &overrides.vars_files {
        merge_vars_file(root, path, sources, diagnostics);
    }
    for set in &overrides.sets {
        let id = sources.add("--set", set.as_str());
        let whole = Span::new(id, 0..set.len());
        // `--set storage.secret_access_key=…`: whatever the error, the value is not shown.
        if let Some((key, _)) = set.split_once('=') {
            if key.split('.').any(super::looks_secret) {
                sources.mask(whole.sub(key.len() + 1..set.len()));
            }
        }
        if let Err(diagnostic) = apply_set(root, set, whole) {
            diagnostics.push(*diagnostic);
        }
    }
}

fn merge_vars_file(
    root: &mut Node,
    path: &std::path::Path,
    sources: &mut Sources,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let name = path.display().to_string();
    let text = match super::read_text(path, "vars file") {
        Ok(text) => text,
        Err(message) => {
            diagnostics.push(Diagnostic::error(message));
            return;
        }
    };
    let id = sources.add(name.clone(), text.as_str());
    let node = match yaml::parse(id, &text) {
        Ok(node) => node,
        Err(errors) => {
            diagnostics.extend(errors);
            return;
        }
    };
    match node.value {
        Value::Null => {}
        Value::Map(entries) => {
            let vars = vars_map(root, node.span);
            for (key, value) in entries {
                deep_merge(vars, key, value);
            }
        }
        _ => diagnostics.push(
            Diagnostic::error(format!(
                "vars file `{name}` must hold a map of names to values, found {}",
                node.kind()
            ))
            .at(node.span, "expected a map"),
        ),
    }
}

fn deep_merge(target: &mut Node, key: Key, value: Node) {
    let Value::Map(entries) = &mut target.value else {
        return;
    };
    match entries.iter_mut().find(|(k, _)| k.name == key.name) {
        Some((_, existing)) => {
            if let (Value::Map(_), Value::Map(incoming)) = (&existing.value, &value.value) {
                for (k, v) in incoming.clone() {
                    deep_merge(existing, k, v);
                }
            } else {
                *existing = value;
            }
        }
        None => entries.push((key, value)),
    }
}

/// The `vars:` map of the root, created when absent.
fn vars_map(root: &mut Node, span: Span) -> &mut Node {
    let Value::Map(entries) = &mut root.value else {
        unreachable!("apply() checks that the root is a map")
    };
    let index = match entries.iter().position(|(k, _)| k.name == "vars") {
        Some(index) => index,
        None => {
            entries.insert(
                0,
                (
                    Key {
                        name: "vars".into(),
                        span,
                    },
                    Node::new(span, Value::Map(Vec::new())),
                ),
            );
            0
        }
    };
    let vars = &mut entries[index].1;
    if matches!(vars.value, Value::Null) {
        vars.value = Value::Map(Vec::new());
    }
    vars
}

fn apply_set(root: &mut Node, set: &str, whole: Span) -> Result<(), Box<Diagnostic>> {
    let Some((key, value_text)) = set.split_once('=') else {
        return Err(Box::new(
            Diagnostic::error("`--set` takes KEY=VALUE")
                .at(whole, "no `=` here")
                .help("for example `--set out=out/test` or `--set clean_orders.iqr.k=2.0`"),
        ));
    };
    let (add, key_text, key_start) = match key.strip_prefix('+') {
        Some(rest) => (true, rest, 1),
        None => (false, key, 0),
    };
    let key_span = whole.sub(key_start..key.len());
    let segments: Vec<&str> = key_text.split('.').collect();
    if segments.iter().any(|s| s.trim().is_empty()) {
        return Err(Box::new(
            Diagnostic::error(format!("invalid key `{key_text}` in `--set`"))
                .at(key_span, "empty part in this dotted key"),
        ));
    }
    let value_offset = key.len() + 1;
    let mut value = match yaml::parse(whole.source, value_text) {
        Ok(node) => node,
        Err(mut errors) => {
            let mut diagnostic = errors.remove(0);
            for label in &mut diagnostic.labels {
                label.span =
                    whole.sub(value_offset + label.span.start..value_offset + label.span.end);
            }
            return Err(Box::new(diagnostic));
        }
    };
    shift(&mut value, value_offset);

    let stage_names: Vec<String> = root
        .get("stages")
        .and_then(Node::as_map)
        .map(|s| s.iter().map(|(k, _)| k.name.clone()).collect())
        .unwrap_or_default();
    let var_names: Vec<String> = root
        .get("vars")
        .and_then(Node::as_map)
        .map(|s| s.iter().map(|(k, _)| k.name.clone()).collect())
        .unwrap_or_default();

    let first = segments[0];
    let explicit_var = first == "vars" && segments.len() > 1;
    let is_var = explicit_var || var_names.iter().any(|v| v == first);
    let is_stage = !explicit_var && stage_names.iter().any(|s| s == first);
    if is_var && is_stage {
        return Err(Box::new(
            Diagnostic::error(format!("`{first}` is both a var and a stage"))
                .at(whole.sub(key_start..key_start + first.len()), "ambiguous")
                .help(format!("write `vars.{key_text}=…` to set the var")),
        ));
    }
    if is_stage {
        if segments.len() < 2 {
            return Err(Box::new(
                Diagnostic::error(format!("`--set {first}=…` names a stage, not a param"))
                    .at(key_span, "which param?")
                    .help(format!("write `--set {first}.PARAM=VALUE`")),
            ));
        }
        let params = stage_params(root, first, key_span);
        return set_path(params, &segments[1..], value, true, key_text, key_span);
    }
    let path = if explicit_var {
        &segments[1..]
    } else {
        &segments[..]
    };
    if !is_var && !add && !explicit_var {
        let candidates = var_names
            .iter()
            .chain(stage_names.iter())
            .map(String::as_str);
        let diagnostic = Diagnostic::error(format!(
            "`--set {key_text}`: no var or stage is called `{first}`"
        ));
        let diagnostic = match did_you_mean(first, candidates) {
            Some(s) => diagnostic.at(
                whole.sub(key_start..key_start + first.len()),
                format!("did you mean `{s}`?"),
            ),
            None => diagnostic.at(whole.sub(key_start..key_start + first.len()), "unknown"),
        };
        return Err(Box::new(
            diagnostic.help(format!("to add a new var, write `--set +{key_text}=…`")),
        ));
    }
    let vars = vars_map(root, key_span);
    set_path(vars, path, value, add, key_text, key_span)
}

/// The `params:` map of stage `name`, created when absent.
fn stage_params<'a>(root: &'a mut Node, name: &str, span: Span) -> &'a mut Node {
    let stage = root
        .pointer_mut(&["stages", name])
        .expect("the stage exists: apply_set checked its name");
    if !matches!(stage.value, Value::Map(_)) {
        // Leave shape errors to the raw check; give it a scratch map to write into.
        stage.value = Value::Map(Vec::new());
    }
    let Value::Map(entries) = &mut stage.value else {
        unreachable!()
    };
    let index = match entries.iter().position(|(k, _)| k.name == "params") {
        Some(index) => index,
        None => {
            entries.push((
                Key {
                    name: "params".into(),
                    span,
                },
                Node::new(span, Value::Map(Vec::new())),
            ));
            entries.len() - 1
        }
    };
    let params = &mut entries[index].1;
    if matches!(params.value, Value::Null) {
        params.value = Value::Map(Vec::new());
    }
    params
}

fn set_path(
    node: &mut Node,
    path: &[&str],
    value: Node,
    create: bool,
    key_text: &str,
    key_span: Span,
) -> Result<(), Box<Diagnostic>> {
    let Some((last, init)) = path.split_last() else {
        return Ok(());
    };
    let mut current = node;
    for (depth, segment) in init.iter().enumerate() {
        let kind = current.kind();
        let Value::Map(entries) = &mut current.value else {
            return Err(Box::new(not_a_map(
                key_text,
                &path[..depth],
                kind,
                key_span,
            )));
        };
        let index = match entries.iter().position(|(k, _)| k.name == *segment) {
            Some(index) => index,
            None if create => {
                entries.push((
                    Key {
                        name: (*segment).to_owned(),
                        span: key_span,
                    },
                    Node::new(key_span, Value::Map(Vec::new())),
                ));
                entries.len() - 1
            }
            None => return Err(Box::new(missing(key_text, segment, entries, key_span))),
        };
        current = &mut entries[index].1;
    }
    let kind = current.kind();
    let Value::Map(entries) = &mut current.value else {
        return Err(Box::new(not_a_map(key_text, init, kind, key_span)));
    };
    match entries.iter_mut().find(|(k, _)| k.name == *last) {
        Some((_, existing)) => *existing = value,
        None if create => entries.push((
            Key {
                name: (*last).to_owned(),
                span: key_span,
            },
            value,
        )),
        None => return Err(Box::new(missing(key_text, last, entries, key_span))),
    }
    Ok(())
}

fn not_a_map(key_text: &str, prefix: &[&str], kind: &str, span: Span) -> Diagnostic {
    Diagnostic::error(format!(
        "cannot set `{key_text}`: `{}` is {kind}, not a map",
        prefix.join(".")
    ))
    .at(span, "here")
}

fn missing(key_text: &str, segment: &str, entries: &[(Key, Node)], span: Span) -> Diagnostic {
    let names = entries.iter().map(|(k, _)| k.name.as_str());
    let diagnostic = Diagnostic::error(format!("cannot set `{key_text}`: there is no `{segment}`"));
    match did_you_mean(segment, names) {
        Some(s) => diagnostic.at(span, format!("did you mean `{s}`?")),
        None => diagnostic.at(span, "not found"),
    }
    .help(format!("to add it, write `--set +{key_text}=…`"))
}

fn shift(node: &mut Node, by: usize) {
    node.span.start += by;
    node.span.end += by;
    match &mut node.value {
        Value::String(s) => {
            if let Some(at) = &mut s.verbatim_at {
                *at += by;
            }
        }
        Value::Seq(items) => items.iter_mut().for_each(|n| shift(n, by)),
        Value::Map(entries) => {
            for (k, v) in entries {
                k.span.start += by;
                k.span.end += by;
                shift(v, by);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml_text: &str, sets: &[&str]) -> (Sources, Node, Vec<Diagnostic>) {
        let mut sources = Sources::default();
        let id = sources.add("p.yaml", yaml_text);
        let mut root = yaml::parse(id, yaml_text).expect("yaml");
        let mut diagnostics = Vec::new();
        let overrides = Overrides {
            vars_files: Vec::new(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            ..Overrides::default()
        };
        apply(&mut root, &overrides, &mut sources, &mut diagnostics);
        (sources, root, diagnostics)
    }

    const P: &str = "vars:\n  out: out/m\n  paths: {raw: r}\nstages:\n  clean:\n    uses: clean\n    params: {iqr: {k: 1.5}}\n";

    #[test]
    fn sets_vars_and_params_with_yaml_types() {
        let (_, root, diagnostics) = run(
            P,
            &[
                "out=x/y",
                "paths.raw=s3://b/raw",
                "clean.iqr.k=2.0",
                "clean.dedup=true",
                "+extra=[1, 2]",
            ],
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let json = root.to_json();
        assert_eq!(
            json["vars"],
            serde_json::json!({"out": "x/y", "paths": {"raw": "s3://b/raw"}, "extra": [1, 2]})
        );
        assert_eq!(
            json["stages"]["clean"]["params"],
            serde_json::json!({"iqr": {"k": 2.0}, "dedup": true})
        );
    }

    #[test]
    fn unknown_var_suggests_and_points_into_the_argument() {
        let (sources, _, diagnostics) = run(P, &["otu=x"]);
        assert_eq!(diagnostics.len(), 1);
        assert_eq!(diagnostics[0].labels[0].message, "did you mean `out`?");
        assert_eq!(sources.slice(diagnostics[0].labels[0].span), "otu");
        assert_eq!(sources.name(diagnostics[0].labels[0].span.source), "--set");
    }

    #[test]
    fn missing_equals_sign() {
        let (_, _, diagnostics) = run(P, &["out"]);
        assert_eq!(diagnostics[0].message, "`--set` takes KEY=VALUE");
    }

    #[test]
    fn explicit_vars_prefix() {
        let (_, root, diagnostics) = run(P, &["vars.out=z"]);
        assert!(diagnostics.is_empty());
        assert_eq!(root.to_json()["vars"]["out"], "z");
    }
}
