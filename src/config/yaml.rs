//! A YAML loader that keeps the source span of every node, key and scalar.
//!
//! Built on saphyr's event parser. Unlike a serde deserializer it keeps everything a good error
//! message needs: where each value and each key is, whether a key was given twice, and where a
//! string's characters sit in the file (for carets inside `{{ templates }}`).

use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError};

use crate::diagnostic::{Diagnostic, SourceId, Span};

/// A YAML value with its span.
#[derive(Clone, Debug)]
pub struct Node {
    pub span: Span,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(YamlString),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A string scalar, and where its characters are in the source when they are there verbatim.
#[derive(Clone, Debug)]
pub struct YamlString {
    pub text: String,
    /// Byte offset of `text` in its source, when the source holds it unescaped on one line.
    pub verbatim_at: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

impl Node {
    pub fn new(span: Span, value: Value) -> Self {
        Node { span, value }
    }

    pub fn string(span: Span, text: impl Into<String>) -> Self {
        Node::new(
            span,
            Value::String(YamlString {
                text: text.into(),
                verbatim_at: None,
            }),
        )
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(&s.text),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under `key` in a map, with the key.
    pub fn entry(&self, key: &str) -> Option<(&Key, &Node)> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(k, v)| (k, v))
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// Follows a JSON pointer (`/stages/clean/params/k`).
    pub fn pointer(&self, pointer: &str) -> Option<&Node> {
        let mut node = self;
        for segment in pointer_segments(pointer) {
            node = match &node.value {
                Value::Map(_) => node.get(&segment)?,
                Value::Seq(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// Follows map keys, for editing.
    pub fn pointer_mut(&mut self, path: &[&str]) -> Option<&mut Node> {
        let mut node = self;
        for segment in path {
            let Value::Map(entries) = &mut node.value else {
                return None;
            };
            node = entries
                .iter_mut()
                .find(|(k, _)| k.name == *segment)
                .map(|(_, v)| v)?;
        }
        Some(node)
    }

    /// What kind of value this is, in words, for error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }

    /// The plain JSON value, for schemas, params and fingerprints.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or_else(|| J::String(f.to_string())),
            Value::String(s) => J::String(s.text.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// A node built from a JSON value, every part of it pointing at `span`.
    pub fn from_json(value: &serde_json::Value, span: Span) -> Node {
        use serde_json::Value as J;
        let value = match value {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => return Node::string(span, s.clone()),
            J::Array(items) => Value::Seq(items.iter().map(|v| Node::from_json(v, span)).collect()),
            J::Object(map) => Value::Map(
                map.iter()
                    .map(|(k, v)| {
                        (
                            Key {
                                name: k.clone(),
                                span,
                            },
                            Node::from_json(v, span),
                        )
                    })
                    .collect(),
            ),
        };
        Node::new(span, value)
    }
}

/// Splits a JSON pointer into unescaped segments.
pub fn pointer_segments(pointer: &str) -> impl Iterator<Item = String> + '_ {
    pointer
        .split('/')
        .skip(1)
        .map(imba_stages::pointer::unescape)
}

/// How deep collections may nest. Deeper YAML is refused while it is parsed: the code that walks
/// a [`Node`] (and drops it) recurses once per level, and a pipeline needs a handful of levels.
pub const MAX_DEPTH: usize = 128;

/// How many nodes aliases may create, at least: see [`alias_budget`].
pub const MIN_ALIAS_NODES: usize = 10_000;
/// How many nodes aliases may create, at most, however large the file.
pub const MAX_ALIAS_NODES: usize = 250_000;
/// How many nodes aliases may create for each node written in the file.
pub const ALIAS_NODES_PER_NODE: usize = 100;

/// How many nodes aliases (and the copies anchors keep) may create once `written` nodes have been
/// read: 100 per node written, at least 10,000 and at most 250,000.
///
/// An alias copies the node its anchor names, so nine levels of nine aliases (a 436-byte file)
/// ask for 9⁹ copies: the "billion laughs". Legitimate use (a map of defaults merged into each
/// stage) creates a few times the nodes written, far from 100 times. The ceiling bounds what any
/// file costs: a copied node costs some 300 bytes by the time the pipeline is resolved (its
/// params as JSON, its template context), so 250,000 stay near 100 MB. Nodes written before the
/// alias are what count, as an alias can only name what was written before it.
pub fn alias_budget(written: usize) -> usize {
    written
        .saturating_mul(ALIAS_NODES_PER_NODE)
        .clamp(MIN_ALIAS_NODES, MAX_ALIAS_NODES)
}

/// Parses one YAML document. An empty document is `Null`.
pub fn parse(source: SourceId, text: &str) -> Result<Node, Vec<Diagnostic>> {
    let offsets = CharOffsets::new(text);
    let mut builder = Builder {
        source,
        text,
        offsets: &offsets,
        stack: Vec::new(),
        anchors: HashMap::new(),
        documents: 0,
        root: None,
        diagnostics: Vec::new(),
        written: 0,
        copied: 0,
        stopped: false,
    };
    for event in Parser::new_from_str(text) {
        match event {
            Ok((event, span)) => builder.on_event(event, span),
            Err(error) => {
                builder
                    .diagnostics
                    .push(scan_error(source, &offsets, &error));
                return Err(builder.diagnostics);
            }
        }
        if builder.stopped {
            return Err(builder.diagnostics);
        }
    }
    if !builder.diagnostics.is_empty() {
        return Err(builder.diagnostics);
    }
    Ok(builder
        .root
        .unwrap_or_else(|| Node::new(Span::new(source, 0..0), Value::Null)))
}

fn scan_error(source: SourceId, offsets: &CharOffsets, error: &ScanError) -> Diagnostic {
    let at = offsets.byte(error.marker().index());
    let end = offsets.byte(error.marker().index() + 1).max(at);
    let diagnostic = Diagnostic::error(format!("invalid YAML: {}", error.info()))
        .at(Span::new(source, at..end), "here");
    if error.info() == "recursion limit exceeded" {
        diagnostic.note("YAML flow collections (`[` and `{`) nest at most 255 deep")
    } else {
        diagnostic
    }
}

/// Maps saphyr's character indices to byte offsets.
struct CharOffsets {
    /// `None` when the text is ASCII and the two agree.
    bytes: Option<Vec<usize>>,
    len: usize,
}

impl CharOffsets {
    fn new(text: &str) -> Self {
        let bytes = (!text.is_ascii()).then(|| text.char_indices().map(|(i, _)| i).collect());
        CharOffsets {
            bytes,
            len: text.len(),
        }
    }

    fn byte(&self, char_index: usize) -> usize {
        match &self.bytes {
            None => char_index.min(self.len),
            Some(bytes) => bytes.get(char_index).copied().unwrap_or(self.len),
        }
    }
}

/// How big a finished node is: its nodes (itself included) and its levels.
#[derive(Clone, Copy, Debug, Default)]
struct Extent {
    nodes: usize,
    height: usize,
}

impl Extent {
    const LEAF: Extent = Extent {
        nodes: 1,
        height: 1,
    };

    /// A collection's extent, from the extents of its items so far.
    fn add_child(&mut self, child: Extent) {
        self.nodes = self.nodes.saturating_add(child.nodes);
        self.height = self.height.max(child.height + 1);
    }
}

enum Frame {
    Seq {
        start: usize,
        anchor: usize,
        items: Vec<Node>,
        extent: Extent,
    },
    Map {
        start: usize,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        /// Where each key is in `entries`, so that a map of many keys is checked for duplicates
        /// in linear time.
        index: HashMap<String, usize>,
        key: Option<Key>,
        /// Keys that came from a `<<` merge: explicit keys may override these.
        merged: HashSet<String>,
        extent: Extent,
    },
}

struct Builder<'a> {
    source: SourceId,
    text: &'a str,
    offsets: &'a CharOffsets,
    stack: Vec<Frame>,
    /// Each anchor's node and its extent.
    anchors: HashMap<usize, (Node, Extent)>,
    documents: usize,
    root: Option<Node>,
    diagnostics: Vec<Diagnostic>,
    /// Nodes as written in the file: scalars, collections, aliases.
    written: usize,
    /// Nodes created by copying: by aliases, and by anchors keeping their node.
    copied: usize,
    /// A limit was hit: the rest of the file is not read.
    stopped: bool,
}

impl Builder<'_> {
    fn span(&self, span: saphyr_parser::Span) -> Span {
        Span::new(
            self.source,
            self.offsets.byte(span.start.index())..self.offsets.byte(span.end.index()),
        )
    }

    /// Counts `nodes` more copies against [`alias_budget`]; false (with the error) past it.
    /// `alias`: the copy is an alias's (else an anchor keeping its node).
    fn copy(&mut self, nodes: usize, span: Span, alias: bool) -> bool {
        self.copied = self.copied.saturating_add(nodes);
        let budget = alias_budget(self.written);
        // An anchor's copy is counted, but the error is an alias's to give, as aliases are what
        // multiply: an anchor stops the parse only far past the budget (nested anchors, each
        // keeping a copy of the one inside it, multiply too).
        let limit = if alias {
            budget
        } else {
            budget.saturating_mul(2)
        };
        if self.copied <= limit {
            return true;
        }
        let (message, at, label) = if alias {
            let name = self.text.get(span.range()).unwrap_or("").trim();
            (
                format!("YAML alias `{name}` makes the document too large"),
                span,
                format!(
                    "copies {} nodes, bringing the copies to {}",
                    thousands(nodes),
                    thousands(self.copied)
                ),
            )
        } else {
            (
                "a YAML anchor makes the document too large".to_owned(),
                Span::new(span.source, span.start..span.start),
                format!(
                    "this anchored value, kept to be copied, brings the copies to {}",
                    thousands(self.copied)
                ),
            )
        };
        self.diagnostics.push(
            Diagnostic::error(message)
                .at(at, label)
                .note(format!(
                    "anchors and aliases may copy at most {ALIAS_NODES_PER_NODE} times the nodes written before them (at least {}, at most {}); {} nodes are written before this one, so {} copies may be made",
                    thousands(MIN_ALIAS_NODES),
                    thousands(MAX_ALIAS_NODES),
                    thousands(self.written),
                    thousands(budget),
                ))
                .help("nested aliases multiply: write the repeated values out, or use fewer levels of aliases"),
        );
        self.stopped = true;
        false
    }

    /// Refuses to go deeper than [`MAX_DEPTH`]; `height` more levels below the current one.
    fn deepen(&mut self, height: usize, span: Span) -> bool {
        if self.stack.len() + height <= MAX_DEPTH {
            return true;
        }
        self.diagnostics.push(
            Diagnostic::error(format!(
                "YAML nested too deep: a pipeline file may nest lists and maps at most {MAX_DEPTH} levels deep"
            ))
            .at(span, "nested too deep here"),
        );
        self.stopped = true;
        false
    }

    fn on_event(&mut self, event: Event<'_>, span: saphyr_parser::Span) {
        let span = self.span(span);
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents == 2 {
                    self.diagnostics.push(
                        Diagnostic::error(
                            "a pipeline file holds one YAML document, this is a second",
                        )
                        .at(span, "second document starts here"),
                    );
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.written += 1;
                if !self.deepen(1, span) {
                    return;
                }
                let node = self.scalar(&text, style, tag.as_deref(), span);
                self.push(node, Extent::LEAF, anchor);
            }
            Event::Alias(anchor) => {
                self.written += 1;
                let (node, extent) = match self.anchors.get(&anchor).map(|(_, e)| *e) {
                    Some(extent) => {
                        // Counted before the copy is made: a copy past the budget never is.
                        if !self.deepen(extent.height, span) || !self.copy(extent.nodes, span, true)
                        {
                            return;
                        }
                        match self.anchors.get(&anchor) {
                            Some((node, _)) => (node.clone(), extent),
                            None => return,
                        }
                    }
                    None => {
                        self.diagnostics.push(
                            Diagnostic::error("unknown YAML alias")
                                .at(span, "no anchor of this name"),
                        );
                        (Node::new(span, Value::Null), Extent::LEAF)
                    }
                };
                self.push(node, extent, 0);
            }
            Event::SequenceStart(anchor, _) => {
                self.written += 1;
                if !self.deepen(1, span) {
                    return;
                }
                self.stack.push(Frame::Seq {
                    start: span.start,
                    anchor,
                    items: Vec::new(),
                    extent: Extent::LEAF,
                })
            }
            Event::MappingStart(anchor, _) => {
                self.written += 1;
                if !self.deepen(1, span) {
                    return;
                }
                self.stack.push(Frame::Map {
                    start: span.start,
                    anchor,
                    entries: Vec::new(),
                    index: HashMap::new(),
                    key: None,
                    merged: HashSet::new(),
                    extent: Extent::LEAF,
                })
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return;
                };
                let (start, anchor, value, last_end, extent) = match frame {
                    Frame::Seq {
                        start,
                        anchor,
                        items,
                        extent,
                    } => {
                        let end = items.last().map(|n| n.span.end);
                        (start, anchor, Value::Seq(items), end, extent)
                    }
                    Frame::Map {
                        start,
                        anchor,
                        entries,
                        extent,
                        ..
                    } => {
                        let end = entries.last().map(|(_, n)| n.span.end);
                        (start, anchor, Value::Map(entries), end, extent)
                    }
                };
                // Block collections end where their last item ends; flow ones at their bracket.
                let end = match last_end {
                    Some(end)
                        if span.end <= end
                            || self
                                .text
                                .as_bytes()
                                .get(span.start)
                                .is_none_or(|b| !matches!(b, b']' | b'}')) =>
                    {
                        end
                    }
                    _ => span.end.max(start),
                };
                let node = Node::new(Span::new(self.source, start..end), value);
                self.push(node, extent, anchor);
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }

    fn scalar(
        &self,
        text: &str,
        style: ScalarStyle,
        tag: Option<&saphyr_parser::Tag>,
        span: Span,
    ) -> Node {
        let tagged_str = tag.is_some_and(|t| t.suffix == "str");
        if style == ScalarStyle::Plain && !tagged_str {
            if let Some(value) = resolve_plain(text) {
                return Node::new(span, value);
            }
        }
        let source = self.text.get(span.range()).unwrap_or("");
        let verbatim_at = if source == text {
            Some(span.start)
        } else if matches!(style, ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted)
            && source.len() >= 2
            && source.get(1..source.len() - 1) == Some(text)
        {
            Some(span.start + 1)
        } else {
            None
        };
        Node::new(
            span,
            Value::String(YamlString {
                text: text.to_owned(),
                verbatim_at,
            }),
        )
    }

    fn push(&mut self, node: Node, extent: Extent, anchor: usize) {
        if anchor != 0 {
            // The anchor keeps a copy of its node, which counts as copies do.
            if !self.copy(extent.nodes, node.span, false) {
                return;
            }
            self.anchors.insert(anchor, (node.clone(), extent));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq {
                items, extent: e, ..
            }) => {
                e.add_child(extent);
                items.push(node)
            }
            Some(Frame::Map {
                entries,
                index,
                key,
                merged,
                extent: e,
                ..
            }) => {
                e.add_child(extent);
                match key.take() {
                    None => {
                        let name = match &node.value {
                            Value::String(s) => s.text.clone(),
                            Value::Null => "null".to_owned(),
                            Value::Bool(b) => b.to_string(),
                            Value::Int(i) => i.to_string(),
                            Value::Float(f) => f.to_string(),
                            Value::Seq(_) | Value::Map(_) => {
                                self.diagnostics.push(
                                    Diagnostic::error(
                                        "a map key must be a plain value, not a list or map",
                                    )
                                    .at(node.span, "complex key"),
                                );
                                String::new()
                            }
                        };
                        *key = Some(Key {
                            name,
                            span: node.span,
                        });
                    }
                    Some(k) => {
                        if k.name == "<<" {
                            merge_into(entries, index, merged, node);
                        } else if merged.remove(&k.name) {
                            if let Some(&at) = index.get(&k.name) {
                                entries[at] = (k, node);
                            }
                        } else if let Some(&at) = index.get(&k.name) {
                            self.diagnostics.push(
                                Diagnostic::error(format!("key `{}` is given twice", k.name))
                                    .at(k.span, "given again here")
                                    .also(entries[at].0.span, "first given here"),
                            );
                        } else {
                            index.insert(k.name.clone(), entries.len());
                            entries.push((k, node));
                        }
                    }
                }
            }
        }
    }
}

/// `1234567` as `1,234,567`, for counts in messages.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// YAML's merge key (`<<: *defaults`): keys of the merged maps that the map lacks.
fn merge_into(
    entries: &mut Vec<(Key, Node)>,
    index: &mut HashMap<String, usize>,
    merged_names: &mut HashSet<String>,
    node: Node,
) {
    let maps = match node.value {
        Value::Seq(items) => items,
        _ => vec![node],
    };
    for map in maps {
        if let Value::Map(merged) = map.value {
            for (k, v) in merged {
                if !index.contains_key(&k.name) {
                    merged_names.insert(k.name.clone());
                    index.insert(k.name.clone(), entries.len());
                    entries.push((k, v));
                }
            }
        }
    }
}

/// YAML 1.2 core schema resolution of a plain scalar; `None` means it is a string.
fn resolve_plain(text: &str) -> Option<Value> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        "true" | "True" | "TRUE" => return Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Value::Bool(false)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Some(Value::Float(f64::INFINITY))
        }
        "-.inf" | "-.Inf" | "-.INF" => return Some(Value::Float(f64::NEG_INFINITY)),
        ".nan" | ".NaN" | ".NAN" => return Some(Value::Float(f64::NAN)),
        _ => {}
    }
    let bytes = text.as_bytes();
    let digits = bytes
        .strip_prefix(b"-")
        .or_else(|| bytes.strip_prefix(b"+"))
        .unwrap_or(bytes);
    if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
        return text
            .parse::<i64>()
            .ok()
            .map(Value::Int)
            .or_else(|| text.parse().ok().map(Value::Float));
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok().map(Value::Int);
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return i64::from_str_radix(oct, 8).ok().map(Value::Int);
    }
    let looks_numeric = digits
        .first()
        .is_some_and(|b| b.is_ascii_digit() || *b == b'.')
        && digits
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits.iter().any(u8::is_ascii_digit);
    if looks_numeric {
        return text.parse::<f64>().ok().map(Value::Float);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Sources;

    fn load(text: &str) -> (Sources, Result<Node, Vec<Diagnostic>>) {
        let mut sources = Sources::default();
        let id = sources.add("t.yaml", text);
        let node = parse(id, text);
        (sources, node)
    }

    #[test]
    fn scalars_resolve_by_the_core_schema() {
        let (_, node) = load("a: 1\nb: 1.5\nc: '1'\nd: true\ne: ~\nf: 2024-01\ng: 1e3\nh: -7\n");
        let json = node.expect("valid").to_json();
        assert_eq!(
            json,
            serde_json::json!({"a": 1, "b": 1.5, "c": "1", "d": true, "e": null, "f": "2024-01", "g": 1000.0, "h": -7})
        );
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let text = "stages:\n  clean:\n    cmd: echo hi\n";
        let (sources, node) = load(text);
        let node = node.expect("valid");
        let cmd = node.pointer("/stages/clean/cmd").expect("cmd");
        assert_eq!(sources.slice(cmd.span), "echo hi");
        let (key, _) = node.get("stages").unwrap().entry("clean").unwrap();
        assert_eq!(sources.slice(key.span), "clean");
        match &cmd.value {
            Value::String(s) => assert_eq!(s.verbatim_at, Some(text.find("echo").unwrap())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quoted_strings_know_where_their_text_is() {
        let text = "a: \"x {{ y }}\"\n";
        let (_, node) = load(text);
        let node = node.expect("valid");
        match &node.get("a").unwrap().value {
            Value::String(s) => assert_eq!(s.verbatim_at, Some(4)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_ascii_spans_are_byte_offsets() {
        let text = "é: ü\nb: x\n";
        let (sources, node) = load(text);
        let b = node.expect("valid").pointer("/b").cloned().unwrap();
        assert_eq!(sources.slice(b.span), "x");
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_places() {
        let (sources, node) = load("a: 1\nb: 2\na: 3\n");
        let errors = node.expect_err("duplicate");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].message, "key `a` is given twice");
        assert_eq!(
            sources.line_col(
                errors[0].labels[0].span.source,
                errors[0].labels[0].span.start
            ),
            (3, 1)
        );
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let (_, node) = load("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n");
        let json = node.expect("valid").to_json();
        assert_eq!(json["c"], serde_json::json!({"y": 3, "x": 1}));
    }

    #[test]
    fn the_alias_budget_grows_with_the_file_within_bounds() {
        assert_eq!(alias_budget(0), MIN_ALIAS_NODES);
        assert_eq!(alias_budget(500), 50_000);
        assert_eq!(alias_budget(5_000), MAX_ALIAS_NODES);
        assert_eq!(alias_budget(usize::MAX), MAX_ALIAS_NODES);
    }

    #[test]
    fn aliases_that_multiply_stop_at_the_alias() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for (prev, next) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            text.push_str(&format!(
                "{next}: &{next} [{}]\n",
                vec![format!("*{prev}"); 9].join(", ")
            ));
        }
        let started = std::time::Instant::now();
        let (sources, node) = load(&text);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let errors = node.expect_err("too large");
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].message,
            "YAML alias `*d` makes the document too large"
        );
        let span = errors[0].primary_span().unwrap();
        assert_eq!(sources.line_col(span.source, span.start), (5, 8));
    }

    #[test]
    fn aliases_within_the_budget_expand() {
        // A map of defaults merged into 200 stages, and a list aliased in each.
        let mut text = String::from(
            "defaults: &d {a: 1, b: [1, 2, 3], c: {x: y}}\nlist: &l [1, 2, 3, 4]\nstages:\n",
        );
        for i in 0..200 {
            text.push_str(&format!("  s{i}: {{<<: *d, b: 2, tags: *l}}\n"));
        }
        let (_, node) = load(&text);
        let json = node.expect("valid").to_json();
        assert_eq!(
            json["stages"]["s199"],
            serde_json::json!({"a": 1, "b": 2, "c": {"x": "y"}, "tags": [1, 2, 3, 4]})
        );
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_an_error() {
        let ok = format!("{}1", "- ".repeat(MAX_DEPTH - 1));
        assert!(load(&ok).1.is_ok());
        let deep = format!("{}1", "- ".repeat(MAX_DEPTH));
        let errors = load(&deep).1.expect_err("too deep");
        assert!(
            errors[0].message.starts_with("YAML nested too deep"),
            "{errors:?}"
        );
        // An alias stacks its anchor's levels on where it is used.
        let anchored = format!(
            "a: &a {}1{}\nb: [[[[*a]]]]\n",
            "[".repeat(MAX_DEPTH - 3),
            "]".repeat(MAX_DEPTH - 3)
        );
        let errors = load(&anchored).1.expect_err("too deep");
        assert!(
            errors[0].message.starts_with("YAML nested too deep"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_map_of_many_keys_is_checked_in_linear_time() {
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(&format!("k{i}: {i}\n"));
        }
        text.push_str("k5: again\n");
        let started = std::time::Instant::now();
        let errors = load(&text).1.expect_err("duplicate");
        assert_eq!(errors[0].message, "key `k5` is given twice");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn merged_keys_may_be_overridden_once() {
        let (_, node) = load("base: &b {x: 1}\nc:\n  <<: *b\n  x: 2\n  x: 3\n");
        let errors = node.expect_err("twice");
        assert_eq!(errors[0].message, "key `x` is given twice");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let (sources, node) = load("a: [1, 2\nb: 3\n");
        let errors = node.expect_err("unclosed");
        let span = errors[0].primary_span().unwrap();
        assert!(errors[0].message.starts_with("invalid YAML"));
        assert!(sources.line_col(span.source, span.start).0 >= 2);
    }

    #[test]
    fn empty_text_is_null() {
        let (_, node) = load("# only a comment\n");
        assert!(matches!(node.expect("valid").value, Value::Null));
    }
}
