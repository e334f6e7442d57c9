//! `{{ templates }}` in string values: minijinja, strict about undefined names, with spans.
//!
//! A string that is exactly one `{{ expression }}` keeps the type of what it evaluates to (a
//! number stays a number, a list a list), as in DVC; any other string renders to a string.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use minijinja::value::{Value as JinjaValue, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};

use crate::diagnostic::{did_you_mean, Diagnostic, Span};

use super::shell;
use super::yaml::{Key, Node, Value, YamlString};

/// Steps one template may take (minijinja's fuel): far above what a pipeline needs, far below
/// what takes a second.
const FUEL_PER_RENDER: u64 = 500_000;
/// Steps all the templates of one pipeline load may take together.
const FUEL_PER_LOAD: u64 = 5_000_000;
/// What a whole `{{ expression }}` is charged, since its steps cannot be counted.
const FUEL_PER_EXPRESSION: u64 = 50;
/// The most one rendered string may hold.
pub const MAX_RENDERED: usize = 1 << 20;
/// The most items `range()` gives (minijinja's own limit is 100,000).
const MAX_RANGE: usize = 10_000;
/// The statements a template may use: conditions and loops. `set`, `macro`, `call`, `include`
/// and the like are left out, since a pipeline names its values under `vars:`, and they are
/// what lets a short template build a value of any size.
const STATEMENTS: &[&str] = &[
    "if",
    "elif",
    "else",
    "endif",
    "for",
    "endfor",
    "raw",
    "endraw",
    "filter",
    "endfilter",
];

thread_local! {
    /// Bytes of values written by the render running on this thread.
    static WRITTEN: Cell<usize> = const { Cell::new(0) };
}

/// Renders templates; one per pipeline load.
pub struct Templates {
    env: Environment<'static>,
    /// For shell commands: every inserted value is escaped ([`shell`]).
    shell: Environment<'static>,
    fuel: AtomicU64,
    /// The pipeline file, for messages.
    file: Option<String>,
}

impl Default for Templates {
    fn default() -> Self {
        let env = environment(None);
        let shell = environment(Some(AutoEscape::Custom("sh")));
        Templates {
            env,
            shell,
            fuel: AtomicU64::new(FUEL_PER_LOAD),
            file: None,
        }
    }
}

impl Templates {
    /// Templates of the pipeline file `file` (named in messages).
    pub fn for_file(file: &std::path::Path) -> Self {
        Templates {
            file: Some(file.display().to_string()),
            ..Templates::default()
        }
    }
}

/// Fails when a whole expression's value is larger than a rendered string may be.
fn check_size(value: &JinjaValue) -> Result<(), Error> {
    let size = match value.as_str() {
        Some(text) => text.len(),
        None => value.to_string().len(),
    };
    if size > MAX_RENDERED {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("the value is over {} MiB", MAX_RENDERED >> 20),
        ));
    }
    Ok(())
}

fn environment(escape: Option<AutoEscape>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL_PER_RENDER));
    env.add_function("range", range);
    env.add_function("expand", expand);
    match escape {
        Some(escape) => {
            env.set_auto_escape_callback(move |_| escape);
            env.set_formatter(format_for_shell);
        }
        None => {
            env.set_auto_escape_callback(|_| AutoEscape::None);
            env.set_formatter(format_plain);
        }
    }
    env
}

/// `range()` with a smaller limit than minijinja's.
fn range(lower: isize, upper: Option<isize>, step: Option<isize>) -> Result<JinjaValue, Error> {
    let (start, end) = match upper {
        Some(upper) => (lower, upper),
        None => (0, lower),
    };
    let step = step.unwrap_or(1);
    if step == 0 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "cannot create a range with a step of 0",
        ));
    }
    let span = (end as i128 - start as i128) / step as i128;
    if span > MAX_RANGE as i128 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("range has too many elements (at most {MAX_RANGE})"),
        ));
    }
    let mut items = Vec::new();
    let mut at = start;
    while (step > 0 && at < end) || (step < 0 && at > end) {
        items.push(JinjaValue::from(at as i64));
        at += step;
    }
    Ok(JinjaValue::from(items))
}

/// `expand('out/{month}/x.parquet', month=partitions.month.all)`: the pattern with each
/// `{name}` replaced by each value of the keyword `name` (a list, or one value), for every
/// combination, the first keyword varying slowest (as Snakemake's `expand`). A list of paths,
/// for the inputs of a stage that reads every partition's output.
fn expand(pattern: String, kwargs: minijinja::value::Kwargs) -> Result<JinjaValue, Error> {
    use minijinja::value::ValueKind;
    let mut names: Vec<&str> = kwargs.args().collect();
    // Kwargs come in no guaranteed order: the pattern's order is the combination order.
    names.sort_by_key(|name| pattern.find(&format!("{{{name}}}")).unwrap_or(usize::MAX));
    let mut combos: Vec<String> = vec![pattern.clone()];
    for name in names {
        let value: JinjaValue = kwargs.get(name)?;
        let values: Vec<JinjaValue> = match value.kind() {
            ValueKind::Seq | ValueKind::Iterable => value.try_iter()?.collect(),
            _ => vec![value],
        };
        let placeholder = format!("{{{name}}}");
        if !pattern.contains(&placeholder) {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("expand: the pattern has no `{placeholder}`"),
            ));
        }
        if combos.len().saturating_mul(values.len()) > MAX_RANGE {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("expand gives too many paths (at most {MAX_RANGE})"),
            ));
        }
        combos = combos
            .iter()
            .flat_map(|combo| {
                values
                    .iter()
                    .map(|v| combo.replace(&placeholder, &v.to_string()))
            })
            .collect();
    }
    if let Some(missing) = combos.first().and_then(|c| {
        let start = c.find('{')?;
        let end = c[start..].find('}')?;
        Some(c[start..=start + end].to_owned())
    }) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("expand: nothing given for `{missing}`"),
        ));
    }
    kwargs.assert_all_used()?;
    Ok(JinjaValue::from(combos))
}

/// Counts what a render writes, failing past [`MAX_RENDERED`].
fn count(len: usize) -> Result<(), Error> {
    let total = WRITTEN.with(|w| {
        let total = w.get().saturating_add(len);
        w.set(total);
        total
    });
    if total > MAX_RENDERED {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("the rendered text is over {} MiB", MAX_RENDERED >> 20),
        ));
    }
    Ok(())
}

fn format_plain(out: &mut Output, state: &State, value: &JinjaValue) -> Result<(), Error> {
    let text = value.to_string();
    count(text.len())?;
    minijinja::escape_formatter(out, state, &JinjaValue::from_safe_string(text))
}

/// Writes a value marked for [`shell::finish`]; a list writes each item as a word of its own.
fn format_for_shell(out: &mut Output, state: &State, value: &JinjaValue) -> Result<(), Error> {
    let reserved = |e: shell::ShellError| Error::new(ErrorKind::InvalidOperation, e.to_string());
    if value.is_safe() || state.auto_escape() == AutoEscape::None {
        let text = value.to_string();
        count(text.len())?;
        if shell::has_reserved(&text) {
            return Err(reserved(shell::ShellError::Reserved));
        }
        return out.write_str(&text).map_err(Error::from);
    }
    let mut marked = String::new();
    let scalar = |v: &JinjaValue| {
        !matches!(
            v.kind(),
            ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
        )
    };
    match value.kind() {
        ValueKind::Seq | ValueKind::Iterable
            if value
                .try_iter()
                .is_ok_and(|mut items| items.all(|i| scalar(&i))) =>
        {
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    marked.push(' ');
                }
                shell::mark(&mut marked, &item.to_string()).map_err(reserved)?;
            }
        }
        _ => shell::mark(&mut marked, &value.to_string()).map_err(reserved)?,
    }
    count(marked.len())?;
    out.write_str(&marked).map_err(Error::from)
}

fn statement_error(keyword: &str) -> String {
    if keyword.is_empty() {
        "a `{%` statement needs a keyword".to_owned()
    } else {
        format!(
            "`{{% {keyword} %}}` is not allowed in pipeline templates (only `if` and `for`); name values under `vars:`"
        )
    }
}

/// The first statement outside [`STATEMENTS`]: its range in `text` and its keyword.
fn forbidden_statement(text: &str) -> Option<(std::ops::Range<usize>, String)> {
    let mut at = 0;
    let mut raw = false;
    while let Some(found) = text[at..].find("{%") {
        let start = at + found;
        let body = &text[start + 2..];
        let body = body.strip_prefix(['-', '+']).unwrap_or(body);
        let trimmed = body.trim_start();
        let keyword: String = trimmed
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let offset = text.len() - trimmed.len();
        at = start + 2;
        if raw {
            raw = keyword != "endraw";
            continue;
        }
        if keyword == "raw" {
            raw = true;
        }
        if !STATEMENTS.contains(&keyword.as_str()) {
            return Some((offset..offset + keyword.len().max(1), keyword));
        }
    }
    None
}

/// The names a template may use, for rendering and for "did you mean".
pub struct Context {
    pub value: minijinja::Value,
    pub names: Vec<String>,
    /// Names whose own definition failed (and was reported): an undefined error about one of
    /// them is left out.
    pub failed: Vec<String>,
}

impl Context {
    pub fn new(map: &serde_json::Map<String, serde_json::Value>) -> Self {
        Context {
            value: minijinja::Value::from_serialize(map),
            names: map.keys().cloned().collect(),
            failed: Vec::new(),
        }
    }

    /// The same context, leaving out errors about `failed` names.
    pub fn with_failed(mut self, failed: &[String]) -> Self {
        self.failed.extend(failed.iter().cloned());
        self
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
                Err(errors) => {
                    diagnostics.extend(errors);
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

    /// Renders one string scalar. An error that only follows from a var that failed to render
    /// before is left out (the error is empty), since that var's own error says it all.
    pub fn render_string(
        &self,
        s: &YamlString,
        span: Span,
        ctx: &Context,
    ) -> Result<Node, Vec<Diagnostic>> {
        if !is_template(&s.text) {
            return Ok(Node::new(span, Value::String(s.clone())));
        }
        if let Some(error) = self.forbidden(s, span, ctx) {
            return Err(vec![error]);
        }
        if let Some((offset, expr)) = whole_expression(&s.text) {
            // Compiling folds constants (`'x' * 100000000`): it runs within the budget too.
            let result = self.spend(FUEL_PER_EXPRESSION).and_then(|()| {
                WRITTEN.with(|w| w.set(0));
                crate::budget::within(crate::budget::TEMPLATE_BYTES, &self.place(&s.text), || {
                    let value = self.env.compile_expression(expr)?.eval(&ctx.value)?;
                    check_size(&value)?;
                    Ok(value)
                })
            });
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
        match self.render_in(&self.env, &s.text, &ctx.value) {
            Ok(text) => Ok(Node::string(span, text)),
            Err(error) => Err(self.diagnose_whole(&error, s, span, ctx)),
        }
    }

    /// Renders a shell command from the pipeline file: every inserted value escaped for where
    /// it lands ([`shell`]).
    pub fn render_shell(
        &self,
        s: &YamlString,
        span: Span,
        ctx: &Context,
    ) -> Result<String, Vec<Diagnostic>> {
        if let Some(error) = self.forbidden(s, span, ctx) {
            return Err(vec![error]);
        }
        self.render_command(&s.text, &ctx.value)
            .map_err(|error| self.diagnose_whole(&error, s, span, ctx))
    }

    /// The variables `text` reads, attribute paths included (`outputs.model`, `outputs`): the
    /// outputs a command names decide which of them it writes in place. Empty when `text` does
    /// not parse (that is reported where it is rendered).
    pub fn names(&self, text: &str) -> std::collections::BTreeSet<String> {
        if !is_template(text) {
            return Default::default();
        }
        match self.env.template_from_str(text) {
            Ok(template) => template.undeclared_variables(true).into_iter().collect(),
            Err(_) => Default::default(),
        }
    }

    /// Renders a string to a string, with nothing escaped (an `argv:` word at run time).
    pub fn render_text(&self, text: &str, ctx: &JinjaValue) -> Result<String, Error> {
        if !is_template(text) {
            return Ok(text.to_owned());
        }
        self.render_in(&self.env, text, ctx)
    }

    /// The words of an `argv:` item at run time: one, or each element of a list that a whole
    /// `{{ expression }}` gives.
    pub fn render_words(&self, text: &str, ctx: &JinjaValue) -> Result<Vec<String>, Error> {
        let Some((_, expr)) = whole_expression(text) else {
            return self.render_text(text, ctx).map(|word| vec![word]);
        };
        let value = self.env.compile_expression(expr)?.eval(ctx)?;
        let word = |v: &JinjaValue| match v.as_str() {
            Some(s) => s.to_owned(),
            None => v.to_string(),
        };
        Ok(match value.kind() {
            ValueKind::Seq => value.try_iter()?.map(|v| word(&v)).collect(),
            _ => vec![word(&value)],
        })
    }

    /// Renders a shell command at run time (with staging paths): every inserted value escaped.
    pub fn render_command(&self, text: &str, ctx: &JinjaValue) -> Result<String, Error> {
        if shell::has_reserved(text) {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                shell::ShellError::Reserved.to_string(),
            ));
        }
        let rendered = if is_template(text) {
            self.render_in(&self.shell, text, ctx)?
        } else {
            text.to_owned()
        };
        shell::finish(&rendered).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
    }

    /// Renders `text` in `env`, counting its steps against the load's fuel and its size.
    fn render_in(
        &self,
        env: &Environment<'static>,
        text: &str,
        ctx: &JinjaValue,
    ) -> Result<String, Error> {
        if let Some((range, keyword)) = forbidden_statement(text) {
            let _ = range;
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                statement_error(&keyword),
            ));
        }
        self.spend(0)?;
        WRITTEN.with(|w| w.set(0));
        // Compiling folds constants: it runs within the budget too.
        let rendered =
            crate::budget::within(crate::budget::TEMPLATE_BYTES, &self.place(text), || {
                env.template_from_str(text)?.render_captured(ctx)
            });
        match rendered {
            Ok(captured) => {
                let used = captured
                    .state()
                    .fuel_levels()
                    .map_or(0, |(consumed, _)| consumed);
                self.spend(used)?;
                let text = captured.into_output();
                if text.len() > MAX_RENDERED {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("the rendered text is over {} MiB", MAX_RENDERED >> 20),
                    ));
                }
                Ok(text)
            }
            Err(error) => {
                if error.kind() == ErrorKind::OutOfFuel {
                    self.spend(FUEL_PER_RENDER)?;
                    return Err(Error::new(
                        ErrorKind::OutOfFuel,
                        format!("this template takes too many steps (more than {FUEL_PER_RENDER})"),
                    ));
                }
                Err(error)
            }
        }
    }

    /// The template, as the message of a broken memory budget names it.
    fn place(&self, text: &str) -> String {
        let mut shown: String = text.chars().take(60).collect();
        if shown.len() < text.len() {
            shown.push('…');
        }
        match &self.file {
            Some(file) => format!("{file}: the template {shown:?}"),
            None => format!("the template {shown:?}"),
        }
    }

    /// Takes `amount` from the load's fuel; fails once it is spent.
    fn spend(&self, amount: u64) -> Result<(), Error> {
        let left = self.fuel.load(Ordering::Relaxed);
        if left == 0 {
            return Err(Error::new(
                ErrorKind::OutOfFuel,
                format!("the templates of this pipeline take too many steps together (more than {FUEL_PER_LOAD})"),
            ));
        }
        self.fuel
            .store(left.saturating_sub(amount), Ordering::Relaxed);
        Ok(())
    }

    /// A statement templates may not use, as a diagnostic at its keyword.
    fn forbidden(&self, s: &YamlString, span: Span, ctx: &Context) -> Option<Diagnostic> {
        let (range, keyword) = forbidden_statement(&s.text)?;
        self.diagnose(
            ErrorKind::InvalidOperation,
            Some(&statement_error(&keyword)),
            Some(range),
            s,
            span,
            0,
            &s.text,
            ctx,
        )
        .pop()
    }

    /// The diagnostics of an error in the whole string `s`.
    fn diagnose_whole(
        &self,
        error: &Error,
        s: &YamlString,
        span: Span,
        ctx: &Context,
    ) -> Vec<Diagnostic> {
        self.diagnose(
            error.kind(),
            error.detail(),
            error.range(),
            s,
            span,
            0,
            &s.text,
            ctx,
        )
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
    ) -> Vec<Diagnostic> {
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
                if root.is_some_and(|r| ctx.failed.iter().any(|f| f == r)) {
                    // Its definition failed, and said so: this error adds nothing.
                    return Vec::new();
                }
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
                let diagnostic =
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
                    };
                vec![diagnostic]
            }
            _ => {
                let detail = detail.unwrap_or("cannot render");
                vec![Diagnostic::error(format!("invalid template: {detail}"))
                    .at(at, detail.to_owned())]
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
