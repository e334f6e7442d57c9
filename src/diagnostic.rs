//! Config diagnostics: which source a problem is in, where, and how it is shown to a person.
//!
//! Every config problem becomes a [`Diagnostic`] with labelled [`Span`]s into a [`Sources`]
//! registry (the pipeline file, each `--vars` file, each `--set` argument). They are collected,
//! never thrown one at a time, and rendered together with `codespan-reporting`.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term;

/// One source text that spans point into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceId(usize);

/// A byte range in one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub source: SourceId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(source: SourceId, range: Range<usize>) -> Self {
        Span {
            source,
            start: range.start,
            end: range.end,
        }
    }

    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }

    /// A sub-range, given relative to the start of this span.
    pub fn sub(&self, range: Range<usize>) -> Span {
        let start = (self.start + range.start).min(self.end);
        let end = (self.start + range.end).clamp(start, self.end);
        Span {
            source: self.source,
            start,
            end,
        }
    }
}

/// The texts that diagnostics point into.
#[derive(Default, Debug, Clone)]
pub struct Sources {
    files: Vec<(String, Arc<str>)>,
}

impl Sources {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<Arc<str>>) -> SourceId {
        self.files.push((name.into(), text.into()));
        SourceId(self.files.len() - 1)
    }

    pub fn name(&self, id: SourceId) -> &str {
        &self.files[id.0].0
    }

    pub fn text(&self, id: SourceId) -> &str {
        &self.files[id.0].1
    }

    /// The text a span covers.
    pub fn slice(&self, span: Span) -> &str {
        self.text(span.source).get(span.range()).unwrap_or("")
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, id: SourceId, offset: usize) -> (usize, usize) {
        let text = self.text(id);
        let offset = offset.min(text.len());
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
    Note,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub message: String,
    pub primary: bool,
}

/// One problem, with where it is and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Context for an error reported elsewhere (e.g. the param a failing stage names).
    pub fn context(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Note,
            ..Diagnostic::error(message)
        }
    }

    pub fn warning(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(message)
        }
    }

    /// The main place the problem is, with a short label under it.
    pub fn at(mut self, span: Span, label: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: label.into(),
            primary: true,
        });
        self
    }

    /// A second place that explains the first.
    pub fn also(mut self, span: Span, label: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: label.into(),
            primary: false,
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.notes.push(format!("help: {}", help.into()));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(format!("note: {}", note.into()));
        self
    }

    pub fn primary_span(&self) -> Option<Span> {
        self.labels.iter().find(|l| l.primary).map(|l| l.span)
    }
}

/// Sorts diagnostics by where they are, so that output is stable and reads top to bottom.
pub fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by_key(|d| {
        d.primary_span()
            .map(|s| (0, s.source, s.start, s.end))
            .unwrap_or((1, SourceId::default(), 0, 0))
    });
}

/// How diagnostics are drawn.
#[derive(Clone, Copy, Debug)]
pub struct RenderOptions {
    pub color: bool,
}

/// Renders diagnostics as a person reads them: message, `file:line:col`, the lines, a caret.
pub fn render(sources: &Sources, diagnostics: &[Diagnostic], options: RenderOptions) -> Vec<u8> {
    let mut files = SimpleFiles::new();
    for (name, text) in &sources.files {
        files.add(name.as_str(), text.as_ref());
    }
    let config = term::Config::default();
    let mut out = termcolor::Buffer::no_color();
    if options.color {
        out = termcolor::Buffer::ansi();
    }
    for diagnostic in diagnostics {
        let converted = convert(diagnostic);
        if term::emit_to_write_style(&mut out, &config, &files, &converted).is_err() {
            // A span outside its source is a bug in imba; still say what went wrong.
            let _ = writeln!(PlainBuf(&mut out), "error: {}", diagnostic.message);
        }
    }
    out.into_inner()
}

/// Renders without color, as tests and logs see it.
pub fn render_plain(sources: &Sources, diagnostics: &[Diagnostic]) -> String {
    String::from_utf8_lossy(&render(
        sources,
        diagnostics,
        RenderOptions { color: false },
    ))
    .into()
}

struct PlainBuf<'a>(&'a mut termcolor::Buffer);

impl std::fmt::Write for PlainBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        use std::io::Write;
        self.0.write_all(s.as_bytes()).map_err(|_| std::fmt::Error)
    }
}

fn convert(diagnostic: &Diagnostic) -> cs::Diagnostic<usize> {
    let base = match diagnostic.severity {
        Severity::Error => cs::Diagnostic::error(),
        Severity::Warning => cs::Diagnostic::warning(),
        Severity::Note => cs::Diagnostic::note(),
    };
    base.with_message(&diagnostic.message)
        .with_labels(
            diagnostic
                .labels
                .iter()
                .map(|l| {
                    let style = if l.primary {
                        cs::LabelStyle::Primary
                    } else {
                        cs::LabelStyle::Secondary
                    };
                    cs::Label::new(style, l.span.source.0, l.span.range()).with_message(&l.message)
                })
                .collect(),
        )
        .with_notes(diagnostic.notes.clone())
}

/// The closest of `candidates` to `word`, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let budget = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| {
            (
                strsim::damerau_levenshtein(word, c),
                strsim::jaro_winkler(word, c),
                c,
            )
        })
        .filter(|(distance, similarity, _)| *distance <= budget || *similarity > 0.85)
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let mut sources = Sources::default();
        let id = sources.add("p.yaml", "a: 1\nbé: xy\n");
        assert_eq!(sources.line_col(id, 0), (1, 1));
        assert_eq!(sources.line_col(id, 5), (2, 1));
        // 'x' is after "bé: " = 5 bytes, 4 characters.
        assert_eq!(sources.line_col(id, 10), (2, 5));
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        let keys = ["inputs", "outputs", "params"];
        assert_eq!(did_you_mean("inptus", keys), Some("inputs"));
        assert_eq!(did_you_mean("paramz", keys), Some("params"));
        assert_eq!(did_you_mean("zebra", keys), None);
    }
}
