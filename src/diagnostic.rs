//! Config diagnostics: which source a problem is in, where, and how it is shown to a person.
//!
//! Every config problem becomes a [`Diagnostic`] with labelled [`Span`]s into a [`Sources`]
//! registry (the pipeline file, each `--vars` file, each `--set` argument). They are collected,
//! never thrown one at a time, and rendered together with `codespan-reporting`.
//!
//! What is rendered is safe to print on a terminal: the lines of a source are shown with their
//! control characters escaped (a pipeline file holding `\x1b[2J` cannot clear the screen), so are
//! messages, labels and notes, and a span marked secret ([`Diagnostic::masking`],
//! [`Sources::mask`]) is shown as `********`, never as the value it holds.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::term;
use imba_stages::safe::escape_message;

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
    /// Spans never shown: secrets ([`Sources::mask`]).
    masks: Vec<Span>,
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

    /// Marks `span` as secret: every rendering of its source shows `********` in its place. The
    /// text itself is kept, for the code that reads it.
    pub fn mask(&mut self, span: Span) {
        if span.start < span.end {
            self.masks.push(span);
        }
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
    /// Spans whose text is a secret: shown as `********` wherever this diagnostic is rendered.
    pub masks: Vec<Span>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
            masks: Vec::new(),
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

    /// Hides the text under `span` (a secret) wherever the diagnostic shows its source: the
    /// line is rendered with `********` in its place, and labels there point at the stars.
    pub fn masking(mut self, span: Span) -> Self {
        if span.start < span.end {
            self.masks.push(span);
        }
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
/// Control characters in any of it are escaped and secret spans masked (see the module docs).
pub fn render(sources: &Sources, diagnostics: &[Diagnostic], options: RenderOptions) -> Vec<u8> {
    let masks: Vec<Span> = sources
        .masks
        .iter()
        .chain(diagnostics.iter().flat_map(|d| &d.masks))
        .copied()
        .collect();
    let files = ShownFiles {
        files: sources
            .files
            .iter()
            .enumerate()
            .map(|(id, (name, text))| {
                let masked: Vec<Range<usize>> = masks
                    .iter()
                    .filter(|m| m.source.0 == id)
                    .map(Span::range)
                    .collect();
                Shown::new(name, text, &masked)
            })
            .collect(),
    };
    let config = term::Config::default();
    let mut out = termcolor::Buffer::no_color();
    if options.color {
        out = termcolor::Buffer::ansi();
    }
    for diagnostic in diagnostics {
        let converted = convert(diagnostic, &files);
        if term::emit_to_write_style(&mut out, &config, &files, &converted).is_err() {
            // A span outside its source is a bug in imba; still say what went wrong.
            let _ = writeln!(
                PlainBuf(&mut out),
                "error: {}",
                escape_message(&diagnostic.message)
            );
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

/// What a secret is shown as, whatever its length.
const MASK: &str = "********";

/// One stretch of a source that is shown as other text: a control character as its escape, a
/// secret as [`MASK`].
#[derive(Clone, Debug, PartialEq)]
struct Edit {
    source: Range<usize>,
    shown: Range<usize>,
}

/// A source as it is shown, with the map between offsets in it and in the source. Line breaks
/// are never edited, so lines keep their numbers.
struct Shown {
    name: String,
    source: Arc<str>,
    text: Arc<str>,
    /// Sorted; empty when the text is shown as it is.
    edits: Vec<Edit>,
    /// Where each line of `text` starts.
    line_starts: Vec<usize>,
}

impl Shown {
    fn new(name: &str, source: &Arc<str>, masks: &[Range<usize>]) -> Shown {
        let mut edits = Vec::new();
        let mut text = String::new();
        let mut copied = 0;
        let mut masks: Vec<Range<usize>> = masks
            .iter()
            .map(|m| {
                floor_char_boundary(source, m.start)
                    ..floor_char_boundary(source, m.end.min(source.len()))
            })
            .filter(|m| m.start < m.end)
            .collect();
        masks.sort_by_key(|m| m.start);
        let mut masks = masks.into_iter().peekable();
        let mut edit = |text: &mut String, copied: &mut usize, range: Range<usize>, with: &str| {
            text.push_str(&source[*copied..range.start]);
            let start = text.len();
            text.push_str(with);
            edits.push(Edit {
                source: range.clone(),
                shown: start..text.len(),
            });
            *copied = range.end;
        };
        let bytes = source.as_bytes();
        for (at, c) in source.char_indices() {
            if at < copied {
                continue;
            }
            // A secret: each of its lines becomes the mask.
            while masks.peek().is_some_and(|m| m.end <= at) {
                masks.next();
            }
            if let Some(mask) = masks.peek().filter(|m| m.start <= at).cloned() {
                let mut line_start = at;
                for (i, b) in source[at..mask.end].bytes().enumerate() {
                    if b == b'\n' {
                        if line_start < at + i {
                            edit(&mut text, &mut copied, line_start..at + i, MASK);
                        }
                        line_start = at + i + 1;
                    }
                }
                if line_start < mask.end {
                    edit(&mut text, &mut copied, line_start..mask.end, MASK);
                }
                masks.next();
                continue;
            }
            let line_break = c == '\n' || (c == '\r' && bytes.get(at + 1) == Some(&b'\n'));
            if imba_stages::safe::needs_escape(c) && !line_break && c != '\t' {
                let mut escaped = String::new();
                imba_stages::safe::escape_char(c, &mut escaped);
                edit(&mut text, &mut copied, at..at + c.len_utf8(), &escaped);
            }
        }
        let text: Arc<str> = if edits.is_empty() {
            source.clone()
        } else {
            text.push_str(&source[copied..]);
            text.into()
        };
        let line_starts = codespan_reporting::files::line_starts(&text).collect();
        Shown {
            name: imba_stages::safe::escape(name).into_owned(),
            source: source.clone(),
            text,
            edits,
            line_starts,
        }
    }

    /// Where offset `at` of the source is in the shown text. An offset inside an edit is its
    /// start, or its end for the end of a range (`end`), so that a label covers what it covered.
    fn shown(&self, at: usize, end: bool) -> usize {
        let i = self
            .edits
            .partition_point(|e| e.source.start < at + usize::from(!end));
        let Some(e) = i.checked_sub(1).map(|i| &self.edits[i]) else {
            return at;
        };
        if at >= e.source.end {
            e.shown.end + (at - e.source.end)
        } else if end {
            e.shown.end
        } else {
            e.shown.start
        }
    }

    /// Where offset `at` of the shown text is in the source (the start of an edit it is in).
    fn source_offset(&self, at: usize) -> usize {
        let i = self.edits.partition_point(|e| e.shown.start <= at);
        let Some(e) = i.checked_sub(1).map(|i| &self.edits[i]) else {
            return at;
        };
        if at >= e.shown.end {
            e.source.end + (at - e.shown.end)
        } else {
            e.source.start
        }
    }
}

/// The sources as codespan sees them: shown texts, with columns counted in the source itself.
struct ShownFiles {
    files: Vec<Shown>,
}

impl ShownFiles {
    fn get(&self, id: usize) -> Result<&Shown, codespan_reporting::files::Error> {
        self.files
            .get(id)
            .ok_or(codespan_reporting::files::Error::FileMissing)
    }
}

impl<'a> codespan_reporting::files::Files<'a> for ShownFiles {
    type FileId = usize;
    type Name = &'a str;
    type Source = &'a str;

    fn name(&'a self, id: usize) -> Result<&'a str, codespan_reporting::files::Error> {
        Ok(&self.get(id)?.name)
    }

    fn source(&'a self, id: usize) -> Result<&'a str, codespan_reporting::files::Error> {
        Ok(&self.get(id)?.text)
    }

    fn line_index(
        &'a self,
        id: usize,
        at: usize,
    ) -> Result<usize, codespan_reporting::files::Error> {
        let file = self.get(id)?;
        Ok(file
            .line_starts
            .binary_search(&at)
            .unwrap_or_else(|next| next - 1))
    }

    fn line_range(
        &'a self,
        id: usize,
        line: usize,
    ) -> Result<Range<usize>, codespan_reporting::files::Error> {
        let file = self.get(id)?;
        let start = |line: usize| match line.cmp(&file.line_starts.len()) {
            std::cmp::Ordering::Less => Ok(file.line_starts[line]),
            std::cmp::Ordering::Equal => Ok(file.text.len()),
            std::cmp::Ordering::Greater => Err(codespan_reporting::files::Error::LineTooLarge {
                given: line,
                max: file.line_starts.len() - 1,
            }),
        };
        Ok(start(line)?..start(line + 1)?)
    }

    /// The column in the file as it is, not as shown: `file:line:col` is where an editor goes.
    fn column_number(
        &'a self,
        id: usize,
        _line: usize,
        at: usize,
    ) -> Result<usize, codespan_reporting::files::Error> {
        let file = self.get(id)?;
        let at = floor_char_boundary(&file.source, file.source_offset(at).min(file.source.len()));
        let line_start = file.source[..at].rfind('\n').map_or(0, |i| i + 1);
        Ok(file.source[line_start..at].chars().count() + 1)
    }
}

fn convert(diagnostic: &Diagnostic, files: &ShownFiles) -> cs::Diagnostic<usize> {
    let base = match diagnostic.severity {
        Severity::Error => cs::Diagnostic::error(),
        Severity::Warning => cs::Diagnostic::warning(),
        Severity::Note => cs::Diagnostic::note(),
    };
    base.with_message(escape_message(&diagnostic.message))
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
                    let range = match files.files.get(l.span.source.0) {
                        Some(shown) => {
                            let start = shown.shown(l.span.start, false);
                            start..shown.shown(l.span.end, true).max(start)
                        }
                        None => l.span.range(),
                    };
                    cs::Label::new(style, l.span.source.0, range)
                        .with_message(escape_message(&l.message))
                })
                .collect(),
        )
        .with_notes(
            diagnostic
                .notes
                .iter()
                .map(|n| escape_message(n).into_owned())
                .collect(),
        )
}

/// How many character pairs [`did_you_mean`] may compare, in all, between two calls of
/// [`reset_suggestions`]: a suggestion is a courtesy, and a pipeline of 9,000 missing inputs and
/// 9,000 outputs would otherwise compare every pair (81 million), for minutes.
const SUGGESTION_WORK: usize = 20_000_000;

static SUGGESTION_SPENT: AtomicUsize = AtomicUsize::new(0);

/// Gives [`did_you_mean`] its whole budget again: at the start of each load of a pipeline.
pub fn reset_suggestions() {
    SUGGESTION_SPENT.store(0, Ordering::Relaxed);
}

/// The closest of `candidates` to `word`, when it is close enough to be a likely typo. Once the
/// work budget of all suggestions is spent (see [`SUGGESTION_WORK`]), the best found so far, or
/// none.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let length = word.chars().count();
    let budget = (length / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .take_while(|c| {
            let work = length.max(1) * c.len().max(1);
            SUGGESTION_SPENT.fetch_add(work, Ordering::Relaxed) + work <= SUGGESTION_WORK
        })
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

/// The path of `candidates` a missing `path` most likely meant: one with the same file name in
/// another folder, or one within a small edit distance (a fifth of the path's length, at least
/// one). Nothing when none is that close: a far-fetched suggestion misleads.
pub fn did_you_mean_path<'a>(
    path: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let trimmed = |p: &'a str| p.trim_end_matches('/');
    let word = path.trim_end_matches('/');
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
    let budget = (word.chars().count() / 5).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let c = trimmed(candidate);
        if c == word || c.is_empty() {
            continue;
        }
        // The same file name passes whatever its folder; the closest whole path wins.
        let distance = strsim::damerau_levenshtein(word, c);
        let close = distance <= budget || name(c) == name(word);
        if close && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
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
    fn a_masked_span_is_never_rendered() {
        let mut sources = Sources::default();
        let text = "storage:\n  secret_access_key: wJalrXUtnFEMI # the key\n  region: x\n";
        let id = sources.add("p.yaml", text);
        let key = text.find("secret_access_key").unwrap();
        let value = text.find("wJalr").unwrap();
        let diagnostic = Diagnostic::error("a secret")
            .at(Span::new(id, key..key + 17), "remove this")
            .masking(Span::new(id, value..value + 13));
        let rendered = render_plain(&sources, std::slice::from_ref(&diagnostic));
        assert!(!rendered.contains("wJalr"), "{rendered}");
        assert_eq!(
            rendered,
            "error: a secret\n  ┌─ p.yaml:2:3\n  │\n2 │   secret_access_key: ******** # the key\n  │   ^^^^^^^^^^^^^^^^^ remove this\n\n"
        );
        // A label on the secret points at the stars; one after it, past them.
        let on_it = Diagnostic::error("e")
            .at(Span::new(id, value..value + 13), "here")
            .also(Span::new(id, value + 16..value + 19), "after")
            .masking(Span::new(id, value..value + 13));
        let rendered = render_plain(&sources, &[on_it]);
        assert!(rendered.contains("p.yaml:2:22"), "{rendered}");
        assert!(
            rendered.contains("  │                      ^^^^^^^^   --- after"),
            "{rendered}"
        );
        // Masked in the sources, it is masked for every diagnostic.
        sources.mask(Span::new(id, value..value + 13));
        let other = Diagnostic::error("other").at(Span::new(id, key..key + 3), "x");
        assert!(!render_plain(&sources, &[other]).contains("wJalr"));
    }

    #[test]
    fn a_masked_block_keeps_its_lines() {
        let mut sources = Sources::default();
        let text = "key: |\n  line one\n  line two\nnext: 1\n";
        let id = sources.add("p.yaml", text);
        let secret = text.find("  line one").unwrap()..text.find("next").unwrap() - 1;
        let next = text.find("next").unwrap();
        let diagnostic = Diagnostic::error("e")
            .at(Span::new(id, next..next + 4), "here")
            .masking(Span::new(id, secret));
        let rendered = render_plain(&sources, &[diagnostic]);
        assert!(rendered.contains("p.yaml:4:1"), "{rendered}");
        assert!(!rendered.contains("line"), "{rendered}");
    }

    #[test]
    fn control_characters_in_a_source_are_shown_escaped() {
        let mut sources = Sources::default();
        let text = "a:\n  x\x1b[2J\x07: 1 \u{202e}ü\r\nb: 2\r\n";
        let id = sources.add("p\x1b.yaml", text);
        let one = text.find("1 ").unwrap();
        let diagnostic = Diagnostic::error("bad \x1b[31m")
            .at(Span::new(id, one..one + 1), "label \x07")
            .note("note\nsecond \x1b line");
        let rendered = render_plain(&sources, &[diagnostic]);
        assert!(!rendered.contains('\x1b'), "{rendered:?}");
        assert!(!rendered.contains('\x07'), "{rendered:?}");
        assert!(!rendered.contains('\u{202e}'), "{rendered:?}");
        assert_eq!(
            rendered,
            // The column is the file's (`1` is the 11th character of its line), the caret is
            // under it as shown.
            "error: bad \\x1b[31m\n  ┌─ p\\x1b.yaml:2:11\n  │\n2 │   x\\x1b[2J\\x07: 1 \\u{202e}ü\n  │                 ^ label \\x07\n  │\n  = note: note\n    second \\x1b line\n\n"
        );
    }

    #[test]
    fn offsets_map_through_edits() {
        let source: Arc<str> = "ab\x1bcd".into();
        let shown = Shown::new("f", &source, &[]);
        assert_eq!(&*shown.text, "ab\\x1bcd");
        assert_eq!(shown.shown(0, false), 0);
        assert_eq!(shown.shown(2, false), 2);
        assert_eq!(shown.shown(3, false), 6);
        assert_eq!(shown.shown(3, true), 6);
        assert_eq!(shown.shown(2, true), 2);
        assert_eq!(shown.source_offset(4), 2);
        assert_eq!(shown.source_offset(6), 3);
        let plain = Shown::new("f", &"plain".into(), &[]);
        assert!(plain.edits.is_empty());
    }

    #[test]
    fn a_path_is_suggested_only_when_close() {
        let written = [
            "out/imputed/",
            "out/cleaned/orders.parquet",
            "data/orders.csv",
        ];
        assert_eq!(did_you_mean_path("nope.csv", written), None);
        assert_eq!(
            did_you_mean_path("orders.csv", written),
            Some("data/orders.csv")
        );
        assert_eq!(
            did_you_mean_path("out/cleaned/order.parquet", written),
            Some("out/cleaned/orders.parquet")
        );
        assert_eq!(
            did_you_mean_path("out/imputd", written),
            Some("out/imputed/")
        );
        assert_eq!(did_you_mean_path("out/x", written), None);
        let twins = ["out/test/features.parquet", "out/train/features.parquet"];
        assert_eq!(
            did_you_mean_path("out/trian/features.parquet", twins),
            Some("out/train/features.parquet")
        );
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        let keys = ["inputs", "outputs", "params"];
        assert_eq!(did_you_mean("inptus", keys), Some("inputs"));
        assert_eq!(did_you_mean("paramz", keys), Some("params"));
        assert_eq!(did_you_mean("zebra", keys), None);
    }
}
