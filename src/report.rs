//! The one printer: every line a person reads goes through here.
//!
//! Data (a drawing, a schema, completions) goes to stdout; diagnostics and status go to stderr.
//! Color only on a terminal, never with `NO_COLOR`.

use std::io::{IsTerminal, Write};

use crate::diagnostic::{self, Diagnostic, RenderOptions, Sources};

/// When to color stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

pub struct Printer {
    color: bool,
    quiet: bool,
}

impl Printer {
    pub fn new(choice: ColorChoice, quiet: bool) -> Self {
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::stderr().is_terminal()
            }
        };
        Printer { color, quiet }
    }

    /// Writes data to stdout. A closed pipe (`imba dag | head`) is not an error.
    pub fn data(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// A short status line on stderr, unless `-q`.
    pub fn status(&self, text: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        }
    }

    /// `error: …` on stderr.
    pub fn error(&self, message: &str) {
        let prefix = if self.color {
            "\x1b[1;31merror\x1b[0m\x1b[1m:"
        } else {
            "error:"
        };
        let suffix = if self.color { "\x1b[0m" } else { "" };
        let _ = writeln!(std::io::stderr().lock(), "{prefix} {message}{suffix}");
    }

    /// Config diagnostics with their spans, then a one-line count.
    pub fn diagnostics(&self, sources: &Sources, diagnostics: &[Diagnostic]) {
        let rendered =
            diagnostic::render(sources, diagnostics, RenderOptions { color: self.color });
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&rendered);
        let errors = diagnostics
            .iter()
            .filter(|d| d.severity == diagnostic::Severity::Error)
            .count();
        if errors > 1 {
            let _ = err.flush();
            drop(err);
            self.error(&format!(
                "{errors} problems in the pipeline; nothing was run"
            ));
        }
    }
}
