//! Checks a built-in stage's `params:` against its params type, reporting every problem at once.
//!
//! The JSON Schema of the params type (from schemars) finds all type, range, enum, missing and
//! unknown-key errors in one pass (jsonschema); serde then catches whatever the schema cannot say.
//! Each error points at the offending YAML node.

use std::collections::HashMap;

use imba_stages::Builtin;
use jsonschema::error::ValidationErrorKind;
use serde_json::Value as Json;

use crate::diagnostic::{did_you_mean, Diagnostic, Span};

use super::raw::list;
use super::yaml::{pointer_segments, Node};

/// Compiled params schemas, one per built-in used.
#[derive(Default)]
pub struct ParamsChecker {
    compiled: HashMap<&'static str, Option<(Json, jsonschema::Validator)>>,
}

impl ParamsChecker {
    /// Checks `params` (already rendered) for `builtin`; returns them normalised.
    /// `stage` names the stage in messages; `fallback` is where to point when a param is missing.
    pub fn check(
        &mut self,
        builtin: &Builtin,
        stage: &str,
        params: &Node,
        fallback: Span,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<Json> {
        let json = params.to_json();
        let entry = self.compiled.entry(builtin.name).or_insert_with(|| {
            let schema = serde_json::to_value(builtin.params_schema()).ok()?;
            let validator = jsonschema::validator_for(&schema).ok()?;
            Some((schema, validator))
        });
        if let Some((schema, validator)) = entry {
            let before = diagnostics.len();
            for error in validator.iter_errors(&json) {
                let pointer = error.instance_path().as_str().to_owned();
                let node = params.pointer(&pointer).unwrap_or(params);
                let place = if pointer.is_empty() {
                    String::new()
                } else {
                    format!(" `{}`", dotted(&pointer))
                };
                let diagnostic = match error.kind() {
                    ValidationErrorKind::AdditionalProperties { unexpected } => {
                        for name in unexpected {
                            let key_span = node.entry(name).map_or(node.span, |(k, _)| k.span);
                            let known = properties_at(schema, &pointer);
                            let known: Vec<&str> = known.iter().map(String::as_str).collect();
                            let d = Diagnostic::error(format!(
                                "unknown param `{}` for `{}` in stage `{stage}`",
                                join(&pointer, name),
                                builtin.name
                            ));
                            diagnostics.push(match did_you_mean(name, known.iter().copied()) {
                                Some(s) => d.at(key_span, format!("did you mean `{s}`?")),
                                None if known.is_empty() => d.at(key_span, "unknown param"),
                                None => d
                                    .at(key_span, "unknown param")
                                    .help(format!("expected one of {}", list(&known))),
                            });
                        }
                        continue;
                    }
                    ValidationErrorKind::Required { property } => {
                        let name = property.as_str().unwrap_or_default();
                        let at =
                            if pointer.is_empty() && params.as_map().is_none_or(|m| m.is_empty()) {
                                fallback
                            } else {
                                node.span
                            };
                        Diagnostic::error(format!(
                            "missing param `{}` for `{}` in stage `{stage}`",
                            join(&pointer, name),
                            builtin.name
                        ))
                        .at(at, format!("`{name}` is required"))
                    }
                    ValidationErrorKind::Enum { options } => {
                        let options: Vec<String> = options
                            .as_array()
                            .map(|o| o.iter().map(show).collect())
                            .unwrap_or_default();
                        let options: Vec<&str> = options.iter().map(String::as_str).collect();
                        let given = node.as_str().unwrap_or_default();
                        let d = Diagnostic::error(format!(
                            "param{place} of stage `{stage}` must be one of {}",
                            list(&options)
                        ));
                        match did_you_mean(given, options.iter().copied()) {
                            Some(s) => d.at(node.span, format!("did you mean `{s}`?")),
                            None => d.at(node.span, "not allowed"),
                        }
                    }
                    ValidationErrorKind::Type { kind } => {
                        let expected = type_words(&format!("{kind:?}"));
                        Diagnostic::error(format!(
                            "param{place} of stage `{stage}` must be {expected}, found {}",
                            node.kind()
                        ))
                        .at(node.span, format!("expected {expected}"))
                    }
                    ValidationErrorKind::Minimum { limit } => {
                        bound(stage, &place, node, "≥", limit)
                    }
                    ValidationErrorKind::ExclusiveMinimum { limit } => {
                        bound(stage, &place, node, ">", limit)
                    }
                    ValidationErrorKind::Maximum { limit } => {
                        bound(stage, &place, node, "≤", limit)
                    }
                    ValidationErrorKind::ExclusiveMaximum { limit } => {
                        bound(stage, &place, node, "<", limit)
                    }
                    ValidationErrorKind::OneOfNotValid { .. }
                    | ValidationErrorKind::AnyOf { .. } => {
                        one_of(schema, &pointer, node, &place, stage, builtin.name)
                    }
                    _ => Diagnostic::error(format!(
                        "param{place} of stage `{stage}` is invalid: {}",
                        error.masked()
                    ))
                    .at(node.span, "invalid value"),
                };
                diagnostics.push(diagnostic);
            }
            if diagnostics.len() > before {
                return None;
            }
        }
        match builtin.normalize_params(&json) {
            Ok(normal) => {
                let problems = builtin.check_params(&normal);
                for problem in &problems {
                    let node = params.pointer(&problem.pointer).unwrap_or(params);
                    diagnostics.push(
                        Diagnostic::error(format!("stage `{stage}`: {}", problem.message))
                            .at(node.span, "here"),
                    );
                }
                problems.is_empty().then_some(normal)
            }
            Err(error) => {
                let node = params.pointer(&error.pointer).unwrap_or(params);
                diagnostics.push(
                    Diagnostic::error(format!(
                        "params of stage `{stage}` do not fit `{}`: {}",
                        builtin.name, error.message
                    ))
                    .at(node.span, "here"),
                );
                None
            }
        }
    }
}

fn bound(stage: &str, place: &str, node: &Node, relation: &str, limit: &Json) -> Diagnostic {
    Diagnostic::error(format!(
        "param{place} of stage `{stage}` must be {relation} {limit}"
    ))
    .at(node.span, format!("must be {relation} {limit}"))
}

/// jsonschema's type names (`Single(Array)`, `Multiple([Number, Null])`) in words.
fn type_words(debug: &str) -> String {
    let words: Vec<&str> = [
        "Array", "Object", "String", "Integer", "Number", "Boolean", "Null",
    ]
    .into_iter()
    .filter(|t| debug.contains(t))
    .map(|t| match t {
        "Array" => "a list",
        "Object" => "a map",
        "String" => "a string",
        "Integer" => "an integer",
        "Number" => "a number",
        "Boolean" => "true or false",
        _ => "null",
    })
    .collect();
    match words.as_slice() {
        [] => "another type".to_owned(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn show(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn dotted(pointer: &str) -> String {
    pointer_segments(pointer).collect::<Vec<_>>().join(".")
}

fn join(pointer: &str, name: &str) -> String {
    if pointer.is_empty() {
        name.to_owned()
    } else {
        format!("{}.{name}", dotted(pointer))
    }
}

/// The property names the schema allows for the object at `pointer` (for suggestions).
/// A value that fits none of a param's forms (an aggregation, a method, a metric: a name, or a
/// map of one name to its argument): names the choices, and the nearest to what was written.
fn one_of(
    schema: &Json,
    pointer: &str,
    node: &Node,
    place: &str,
    stage: &str,
    builtin: &str,
) -> Diagnostic {
    let names = choices_at(schema, pointer);
    let given = match node.as_str() {
        Some(text) => Some(text.to_owned()),
        None => node
            .as_map()
            .filter(|m| m.len() == 1)
            .map(|m| m[0].0.name.clone()),
    };
    let known: Vec<&str> = names.iter().map(String::as_str).collect();
    match given {
        Some(given) if !known.is_empty() && !known.contains(&given.as_str()) => {
            let span = match node.as_map() {
                Some(m) if m.len() == 1 => m[0].0.span,
                _ => node.span,
            };
            let d = Diagnostic::error(format!(
                "param{place} of stage `{stage}`: unknown `{given}`; expected one of {}",
                list(&known)
            ));
            match did_you_mean(&given, known.iter().copied()) {
                Some(s) => d.at(span, format!("did you mean `{s}`?")),
                None => d.at(span, "unknown"),
            }
        }
        Some(given) => Diagnostic::error(format!(
            "param{place} of stage `{stage}`: the value of `{given}` has the wrong form"
        ))
        .at(node.span, "not a form this param takes")
        .help(format!(
            "`imba stages {builtin}` and docs/stages.md#{builtin} show its forms"
        )),
        None => Diagnostic::error(format!(
            "param{place} of stage `{stage}` fits none of its forms"
        ))
        .at(node.span, "invalid value")
        .help(format!(
            "`imba stages {builtin}` and docs/stages.md#{builtin} show its forms"
        )),
    }
}

/// The names a param's forms are known by: the strings of its enum forms, and the one key of
/// each of its map forms.
fn choices_at(schema: &Json, pointer: &str) -> Vec<String> {
    let current = schemas_at(schema, pointer);
    let mut names: Vec<String> = Vec::new();
    for s in current.into_iter().flat_map(|s| expand(schema, s)) {
        if let Some(values) = s.get("enum").and_then(Json::as_array) {
            names.extend(values.iter().filter_map(|v| v.as_str().map(str::to_owned)));
        }
        if let Some(value) = s.get("const").and_then(Json::as_str) {
            names.push(value.to_owned());
        }
        if let (Some(required), Some(properties)) = (
            s.get("required").and_then(Json::as_array),
            s.get("properties").and_then(Json::as_object),
        ) {
            if required.len() == 1 && properties.len() == 1 {
                names.extend(required[0].as_str().map(str::to_owned));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The schemas that describe the value at the instance `pointer`, their references followed.
fn schemas_at<'a>(schema: &'a Json, pointer: &str) -> Vec<&'a Json> {
    let mut current = vec![schema];
    for segment in pointer_segments(pointer) {
        let mut next = Vec::new();
        for s in current.into_iter().flat_map(|s| expand(schema, s)) {
            if let Some(p) = s.get("properties").and_then(|p| p.get(&segment)) {
                next.push(p);
            } else if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
                next.push(a);
            } else if let Some(i) = s.get("items").filter(|i| i.is_object()) {
                next.push(i);
            }
        }
        current = next;
    }
    current
}

fn properties_at(schema: &Json, pointer: &str) -> Vec<String> {
    let current = schemas_at(schema, pointer);
    let mut names: Vec<String> = current
        .into_iter()
        .flat_map(|s| expand(schema, s))
        .filter_map(|s| s.get("properties").and_then(Json::as_object))
        .flat_map(|p| p.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A schema with its `$ref` followed and its `anyOf`/`oneOf`/`allOf` branches listed.
fn expand<'a>(root: &'a Json, schema: &'a Json) -> Vec<&'a Json> {
    let mut out = Vec::new();
    let mut stack = vec![schema];
    let mut steps = 0;
    while let Some(s) = stack.pop() {
        steps += 1;
        if steps > 64 {
            break;
        }
        if let Some(target) = s
            .get("$ref")
            .and_then(Json::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|p| root.pointer(p))
        {
            stack.push(target);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(branches) = s.get(key).and_then(Json::as_array) {
                stack.extend(branches.iter());
            }
        }
        out.push(s);
    }
    out
}
