//! `{{ templates }}` in string values: minijinja, strict about undefined names, with spans.
//!
//! A string that is exactly one `{{ expression }}` keeps the type of what it evaluates to (a
//! number stays a number, a list a list), as in DVC; any other string renders to a string.

use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use crate::diagnostic::{did_you_mean, Diagnostic, Span};

use super::yaml::{Key, Node, Value, YamlString};

/// Renders templates; one per pipeline load.
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        Templates { env }
    }
}

/// The names a template may use, for rendering and for "did you mean".
pub struct Context {
    pub value: minijinja::Value,
    pub names: Vec<String>,
}

impl Context {
    pub fn new(map: &serde_json::Map<String, serde_json::Value>) -> Self {
        Context {
            value: minijinja::Value::from_serialize(map),
            names: map.keys().cloned().collect(),
        }
    }

    /// The keys of the map at `name`, when it is one (for "`item` has: …").
    fn keys_of(&self, name: &str) -> Option<Vec<String>> {
        let value = self.value.get_attr(name).ok()?;
        if value.kind() != minijinja::value::ValueKind::Map {
            return None;
        }
        let mut keys: Vec<String> = value.try_iter().ok()?.map(|k| k.to_string()).collect();
        keys.sort();
        Some(keys)
    }
}

/// Whether a string holds template syntax at all.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

impl Templates {
    /// Renders every string inside `node`; `None` when any failed (each failure is reported).
    pub fn render_node(
        &self,
        node: &Node,
        ctx: &Context,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<Node> {
        match &node.value {
            Value::String(s) => match self.render_string(s, node.span, ctx) {
                Ok(rendered) => Some(rendered),
                Err(diagnostic) => {
                    diagnostics.push(diagnostic);
                    None
                }
            },
            Value::Seq(items) => {
                let rendered: Vec<Option<Node>> = items
                    .iter()
                    .map(|item| self.render_node(item, ctx, diagnostics))
                    .collect();
                let items = rendered.into_iter().collect::<Option<Vec<_>>>()?;
                Some(Node::new(node.span, Value::Seq(items)))
            }
            Value::Map(entries) => {
                let rendered: Vec<Option<(Key, Node)>> = entries
                    .iter()
                    .map(|(k, v)| Some((k.clone(), self.render_node(v, ctx, diagnostics)?)))
                    .collect();
                let entries = rendered.into_iter().collect::<Option<Vec<_>>>()?;
                Some(Node::new(node.span, Value::Map(entries)))
            }
            _ => Some(node.clone()),
        }
    }

    /// Renders one string scalar.
    pub fn render_string(
        &self,
        s: &YamlString,
        span: Span,
        ctx: &Context,
    ) -> Result<Node, Diagnostic> {
        if !is_template(&s.text) {
            return Ok(Node::new(span, Value::String(s.clone())));
        }
        if let Some((offset, expr)) = whole_expression(&s.text) {
            let result = self
                .env
                .compile_expression(expr)
                .and_then(|compiled| compiled.eval(&ctx.value));
            return match result {
                Ok(value) if value.is_undefined() => {
                    let trimmed = expr.trim();
                    let start = expr.find(trimmed).unwrap_or(0);
                    Err(self.diagnose(
                        ErrorKind::UndefinedError,
                        None,
                        Some(start..start + trimmed.len()),
                        s,
                        span,
                        offset,
                        expr,
                        ctx,
                    ))
                }
                Ok(value) => Ok(to_node(&value, span)),
                Err(error) => Err(self.diagnose(
                    error.kind(),
                    error.detail(),
                    error.range(),
                    s,
                    span,
                    offset,
                    expr,
                    ctx,
                )),
            };
        }
        match self.env.render_str(&s.text, &ctx.value) {
            Ok(text) => Ok(Node::string(span, text)),
            Err(error) => Err(self.diagnose(
                error.kind(),
                error.detail(),
                error.range(),
                s,
                span,
                0,
                &s.text,
                ctx,
            )),
        }
    }

    /// Renders a string to a string (for commands).
    pub fn render_text(
        &self,
        text: &str,
        ctx: &minijinja::Value,
    ) -> Result<String, minijinja::Error> {
        if !is_template(text) {
            return Ok(text.to_owned());
        }
        self.env.render_str(text, ctx)
    }

    #[allow(clippy::too_many_arguments)]
    fn diagnose(
        &self,
        kind: ErrorKind,
        detail: Option<&str>,
        range: Option<std::ops::Range<usize>>,
        s: &YamlString,
        span: Span,
        offset: usize,
        template: &str,
        ctx: &Context,
    ) -> Diagnostic {
        let range = range.filter(|r| r.end <= template.len());
        let exact = match (s.verbatim_at, &range) {
            (Some(at), Some(range)) => Some(Span::new(
                span.source,
                at + offset + range.start..at + offset + range.end,
            )),
            _ => None,
        };
        let at = exact.unwrap_or(span);
        match kind {
            ErrorKind::UndefinedError => {
                let name = range
                    .as_ref()
                    .and_then(|r| template.get(r.clone()))
                    .map(str::trim)
                    .filter(|n| !n.is_empty());
                let message = match name {
                    Some(name) => format!("undefined template variable `{name}`"),
                    None => "undefined template variable".to_owned(),
                };
                let root = name.map(|n| n.split(['.', '[', '|', ' ']).next().unwrap_or(n));
                let suggestion = match root {
                    Some(r) if !ctx.names.iter().any(|n| n == r) => {
                        did_you_mean(r, ctx.names.iter().map(String::as_str)).map(str::to_owned)
                    }
                    // `item.mnth`: the root exists; suggest among its keys.
                    Some(r) => {
                        let attribute = name
                            .and_then(|n| n.strip_prefix(r))
                            .and_then(|rest| rest.strip_prefix('.'));
                        let keys = ctx.keys_of(r).unwrap_or_default();
                        attribute
                            .and_then(|a| did_you_mean(a, keys.iter().map(String::as_str)))
                            .map(|a| format!("{r}.{a}"))
                    }
                    None => None,
                };
                let diagnostic = Diagnostic::error(message);
                let diagnostic = match suggestion {
                    Some(suggestion) => diagnostic.at(at, format!("did you mean `{suggestion}`?")),
                    None => diagnostic.at(at, "not defined"),
                };
                let mut names: Vec<&str> = ctx.names.iter().map(String::as_str).collect();
                names.sort_unstable();
                let known_root =
                    root.filter(|r| name.is_some_and(|n| n != *r) && names.contains(r));
                if let Some(keys) = known_root.and_then(|r| ctx.keys_of(r).map(|k| (r, k))) {
                    let (root, keys) = keys;
                    if keys.is_empty() {
                        diagnostic.help(format!("`{root}` is empty here"))
                    } else {
                        diagnostic.help(format!("`{root}` has: {}", keys.join(", ")))
                    }
                } else if names.is_empty() {
                    diagnostic.help("define it under `vars:`, or pass `--set NAME=VALUE`")
                } else {
                    diagnostic.help(format!(
                        "defined here: {}; add it under `vars:` or pass `--set NAME=VALUE`",
                        names.join(", ")
                    ))
                }
            }
            _ => {
                let detail = detail.unwrap_or("cannot render");
                Diagnostic::error(format!("invalid template: {detail}")).at(at, detail.to_owned())
            }
        }
    }
}

/// `{{ expr }}` and nothing else: the offset of `expr` in the string, and `expr`.
fn whole_expression(text: &str) -> Option<(usize, &str)> {
    let trimmed = text.trim();
    let inner = trimmed.strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#")
    {
        return None;
    }
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    let start = text.find(inner)?;
    Some((start, inner))
}

fn to_node(value: &minijinja::Value, span: Span) -> Node {
    if value.is_undefined() || value.is_none() {
        return Node::new(span, Value::Null);
    }
    match serde_json::to_value(value) {
        Ok(json) => Node::from_json(&json, span),
        Err(_) => Node::string(span, value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml;
    use crate::diagnostic::Sources;

    fn render(
        text: &str,
        vars: serde_json::Value,
    ) -> (Sources, Result<serde_json::Value, Vec<Diagnostic>>) {
        let mut sources = Sources::default();
        let id = sources.add("t.yaml", text);
        let node = yaml::parse(id, text).expect("yaml");
        let ctx = Context::new(vars.as_object().expect("map"));
        let mut diagnostics = Vec::new();
        let out = Templates::default().render_node(&node, &ctx, &mut diagnostics);
        (sources, out.map(|n| n.to_json()).ok_or(diagnostics))
    }

    #[test]
    fn whole_expressions_keep_their_type() {
        let (_, out) = render(
            "a: '{{ k }}'\nb: x{{ k }}\nc: '{{ months }}'\n",
            serde_json::json!({"k": 1.5, "months": ["01", "02"]}),
        );
        assert_eq!(
            out.unwrap(),
            serde_json::json!({"a": 1.5, "b": "x1.5", "c": ["01", "02"]})
        );
    }

    #[test]
    fn undefined_names_point_inside_the_string() {
        let text = "a: \"{{ out }}/{{ ouput }}/x\"\n";
        let (sources, out) = render(text, serde_json::json!({"out": "o", "output": 1}));
        let errors = out.expect_err("undefined");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].message, "undefined template variable `ouput`");
        assert_eq!(sources.slice(errors[0].labels[0].span), "ouput");
        assert_eq!(errors[0].labels[0].message, "did you mean `output`?");
    }

    #[test]
    fn undefined_attributes_are_named() {
        let (sources, out) = render(
            "a: '{{ item.mnth }}'\n",
            serde_json::json!({"item": {"month": 1}}),
        );
        let errors = out.expect_err("undefined");
        assert_eq!(errors[0].message, "undefined template variable `item.mnth`");
        assert_eq!(sources.slice(errors[0].labels[0].span), "item.mnth");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let (_, out) = render("a: 'x {{ 1 + }}'\n", serde_json::json!({}));
        let errors = out.expect_err("syntax");
        assert!(
            errors[0].message.starts_with("invalid template"),
            "{}",
            errors[0].message
        );
    }
}
