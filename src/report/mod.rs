//! The one printer: every line a person reads goes through here.
//!
//! Data (a drawing, a schema, completions) goes to stdout; diagnostics and status go to stderr.
//! Color only on a terminal, never with `NO_COLOR`.
//!
//! Text printed here often holds bytes from files (column names, values, paths, a command's
//! stderr): its control characters are escaped ([`imba_stages::safe::escape_message`]) before
//! it is written, so that no file can clear the screen or retitle the terminal. The printer's own
//! colors are added after.

pub mod diff;
pub mod metrics;
pub mod partitions;
pub mod tables;
pub mod versions;

use std::io::{IsTerminal, Write};

use imba_stages::safe::escape_message as safe;

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
    pub color: bool,
    pub quiet: bool,
}

impl ColorChoice {
    /// Whether stderr gets color: `always`, `never`, or on a terminal without `NO_COLOR`.
    pub fn for_stderr(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::stderr().is_terminal()
            }
        }
    }
}

impl Printer {
    pub fn new(choice: ColorChoice, quiet: bool) -> Self {
        Printer {
            color: choice.for_stderr(),
            quiet,
        }
    }

    /// Writes data to stdout. A closed pipe (`imba dag | head`) is not an error.
    pub fn data(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(safe(text).as_bytes());
        let _ = out.flush();
    }

    /// A short status line on stderr, unless `-q`.
    pub fn status(&self, text: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "{}", safe(text));
        }
    }

    /// A progress bar of bytes moved, on a terminal (nothing otherwise).
    pub fn transfer_bar(&self) -> TransferBar {
        let bar = (std::io::stderr().is_terminal() && !self.quiet).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {binary_bytes} moved in {elapsed} ({binary_bytes_per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        TransferBar { bar }
    }

    /// `warning: …` on stderr.
    pub fn warning(&self, message: &str) {
        let prefix = if self.color {
            "\x1b[1;33mwarning\x1b[0m:"
        } else {
            "warning:"
        };
        let _ = writeln!(std::io::stderr().lock(), "{prefix} {}", safe(message));
    }

    /// `error: …` on stderr.
    /// Prints `message` as an error and gives the exit status `code`: the end of a command
    /// that failed.
    pub fn fail(&self, message: &str, code: u8) -> std::process::ExitCode {
        self.error(message);
        std::process::ExitCode::from(code)
    }

    pub fn error(&self, message: &str) {
        let prefix = if self.color {
            "\x1b[1;31merror\x1b[0m\x1b[1m:"
        } else {
            "error:"
        };
        let suffix = if self.color { "\x1b[0m" } else { "" };
        let _ = writeln!(
            std::io::stderr().lock(),
            "{prefix} {}{suffix}",
            safe(message)
        );
    }

    /// Why a pipeline could not be loaded: one line, or every diagnostic.
    pub fn load_error(&self, sources: &Sources, error: &crate::config::LoadError) {
        match error {
            crate::config::LoadError::Unreadable(message) => self.error(message),
            crate::config::LoadError::Invalid(diagnostics) => {
                self.diagnostics(sources, diagnostics)
            }
        }
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

impl Printer {
    /// What `imba watch` is doing, on stderr. Stage lines come from a [`RunPrinter`].
    pub fn watch(&self, event: &crate::watch::Event) {
        use crate::watch::Event;
        let listing = |what: &[String]| match what {
            [] => "nothing".to_owned(),
            [one] => one.clone(),
            [first @ .., last] => format!("{} and {last}", first.join(", ")),
        };
        match event {
            Event::Watching {
                files,
                dirs,
                s3,
                config,
            } => {
                let mut parts = Vec::new();
                let count = |n: usize, one: &str, many: &str| match n {
                    1 => format!("1 {one}"),
                    n => format!("{n} {many}"),
                };
                if *files > 0 {
                    parts.push(count(*files, "input file", "input files"));
                }
                if *dirs > 0 {
                    parts.push(count(*dirs, "input directory", "input directories"));
                }
                if *s3 > 0 {
                    parts.push(count(*s3, "S3 input (polled)", "S3 inputs (polled)"));
                }
                parts.push(match config.saturating_sub(1) {
                    0 => "the pipeline file".to_owned(),
                    1 => "the pipeline file and 1 vars file".to_owned(),
                    n => format!("the pipeline file and {n} vars files"),
                });
                self.status(&format!(
                    "watching {} for changes (Ctrl-C to stop)",
                    listing(&parts)
                ));
            }
            Event::Changed { what, stages } if what.is_empty() => {
                self.status(&format!("running {} (out of date)", listing(stages)));
            }
            Event::Changed { what, stages } => self.status(&format!(
                "{} changed: running {}",
                listing(what),
                listing(stages)
            )),
            Event::Unchanged { what } => self.status(&format!(
                "{} written, content unchanged: nothing to run",
                listing(what)
            )),
            Event::Waiting { what, removed } => {
                if *removed {
                    self.status(&format!("{what} is gone; waiting for it to come back"));
                } else {
                    self.status(&format!("{what} is still being written; waiting"));
                }
            }
            Event::Discovered { set, keys } => self.status(&format!(
                "new {} of `{set}`: {}",
                if keys.len() == 1 {
                    "partition"
                } else {
                    "partitions"
                },
                keys.join(", ")
            )),
            Event::Reloaded { what } => {
                self.status(&format!("{} changed: pipeline reloaded", listing(what)))
            }
            Event::Invalid { sources, error } => {
                self.load_error(sources, error);
                self.warning("the edited pipeline is invalid; the last valid one stays in force until it is fixed");
            }
            Event::Queued { what } => self.status(&format!(
                "{} changed during the run; it runs again when this one ends",
                listing(what)
            )),
            Event::Restarting { what } => self.status(&format!(
                "{} changed: cancelling the run to start again",
                listing(what)
            )),
            Event::Finished(summary) => {
                let line = run_summary(&summary.record);
                if summary.interrupted {
                    self.error(&format!("interrupted: {line}"));
                } else if summary.failed {
                    self.error(&format!(
                        "the pipeline failed: {line}; a change that fixes it runs it again"
                    ));
                } else {
                    self.status(&line);
                }
            }
            Event::RunError(error) => self.error(&error.to_string()),
            Event::Stopping { running } => {
                if *running {
                    self.status("stopping: cancelling the run (again to kill it)");
                } else {
                    self.status("stopped");
                }
            }
            Event::Warning(message) => self.warning(message),
        }
    }
}

/// One line about a finished run: how many stages ran, were up to date, failed, did not run.
pub fn run_summary(record: &crate::state::record::RunRecord) -> String {
    use crate::state::record::Decision;
    let count = |d| record.count(d);
    // Restored stages are counted only when there are some: most runs have none.
    let restored = match count(Decision::Restored) {
        0 => String::new(),
        n => format!("{n} restored, "),
    };
    let line = format!(
        "{} ran, {restored}{} up to date, {} failed, {} not run ({:.2}s; run {})",
        count(Decision::Ran),
        count(Decision::Skipped) + count(Decision::Cached),
        count(Decision::Failed),
        count(Decision::Blocked) + count(Decision::Cancelled),
        record.duration_ms as f64 / 1000.0,
        record.id
    );
    // Which partitions failed, in the order they ran: the ones to look at (and to run again).
    let mut failed: Vec<&str> = Vec::new();
    for stage in &record.stages {
        if let (Decision::Failed, Some(key)) = (stage.decision, &stage.partition) {
            if !failed.contains(&key.as_str()) {
                failed.push(key);
            }
        }
    }
    match failed.as_slice() {
        [] => line,
        [one] => format!("{line}; partition {one} failed"),
        many => format!(
            "{line}; {} partitions failed: {}",
            many.len(),
            many.join(", ")
        ),
    }
}

/// Rows of cells as aligned columns (two spaces apart, the last column ragged), one line per
/// row: the tables of `imba checks` and `imba versions`.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    columns(&rows)
}

/// [`table`] for rows whose length is known only at run time (the partition grid); a short row
/// leaves its last cells empty.
pub fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            line.push_str(cell);
            if i + 1 < n {
                line.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes moved to or from a remote run cache, live on a terminal.
pub struct TransferBar {
    bar: Option<indicatif::ProgressBar>,
}

impl TransferBar {
    pub fn add(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Prints run events on stderr: a live progress line on a terminal, one line per event otherwise.
pub struct RunPrinter {
    /// The pipeline's sources, to show the param a failing built-in names.
    sources: Option<std::sync::Arc<Sources>>,
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    color: bool,
    running: std::sync::Mutex<Vec<String>>,
}

impl RunPrinter {
    pub fn new(printer: &Printer, sources: Option<std::sync::Arc<Sources>>) -> Self {
        let bar = (std::io::stderr().is_terminal() && !printer.quiet).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{pos}/{len}] {elapsed} {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        RunPrinter {
            sources,
            bar,
            quiet: printer.quiet,
            color: printer.color,
            running: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{text}");
            }
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn set_running(&self, update: impl FnOnce(&mut Vec<String>)) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        update(&mut running);
        if let Some(bar) = &self.bar {
            bar.set_message(format!("running: {}", running.join(", ")));
        }
    }

    fn tick(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }
}

impl crate::watch::Listener for Printer {
    fn watch(&self, event: &crate::watch::Event) {
        Printer::watch(self, event)
    }

    fn run_events(
        &self,
        sources: std::sync::Arc<Sources>,
    ) -> std::sync::Arc<dyn crate::run::Events> {
        std::sync::Arc::new(RunPrinter::new(self, Some(sources)))
    }
}

impl crate::run::Events for RunPrinter {
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn event(&self, event: crate::run::Event) {
        use crate::run::Event;
        match event {
            Event::Waiting { pid } => {
                let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                self.line(format!(
                    "waiting for another imba run{who} of this workdir to finish…"
                ));
            }
            Event::Started { stages, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_length(stages as u64);
                }
            }
            Event::StageRunning { name, reasons } => {
                self.set_running(|r| r.push(safe(&name).into_owned()));
                if !self.quiet {
                    self.line(format!(
                        "{} {} ({})",
                        self.paint("1;36", "  run "),
                        safe(&name),
                        safe(&reasons.join("; "))
                    ));
                }
            }
            Event::StageSkipped { name } => {
                self.tick();
                if !self.quiet {
                    self.line(format!(
                        "{} {} (up to date)",
                        self.paint("2", "  skip"),
                        safe(&name)
                    ));
                }
            }
            Event::StageCached { name } => {
                self.tick();
                if !self.quiet {
                    self.line(format!(
                        "{} {} (up to date (cached): its outputs already hold what the run cache has for it)",
                        self.paint("2", "  skip"),
                        safe(&name)
                    ));
                }
            }
            Event::StageRestoring { name, reasons } => {
                self.set_running(|r| r.push(safe(&name).into_owned()));
                if !self.quiet {
                    self.line(format!(
                        "{} {} ({}; restoring from the run cache)",
                        self.paint("1;36", "  run "),
                        safe(&name),
                        safe(&reasons.join("; "))
                    ));
                }
            }
            Event::StageDone {
                name,
                duration,
                unchanged,
                checks_passed,
                restored,
            } => {
                self.tick();
                self.set_running(|r| r.retain(|n| *n != safe(&name)));
                if !self.quiet {
                    let took = match restored {
                        Some(computed) => format!(
                            "restored from the run cache in {:.2}s, computed in {:.2}s",
                            duration.as_secs_f64(),
                            computed.as_secs_f64()
                        ),
                        None => format!("{:.2}s", duration.as_secs_f64()),
                    };
                    let same = if unchanged { ", outputs unchanged" } else { "" };
                    let checks = match checks_passed {
                        0 => String::new(),
                        1 => ", 1 check passed".to_owned(),
                        n => format!(", {n} checks passed"),
                    };
                    self.line(format!(
                        "{} {} ({took}{same}{checks})",
                        self.paint("1;32", "  done"),
                        safe(&name),
                    ));
                }
            }
            Event::StageFailed {
                name,
                error,
                log,
                param,
            } => {
                self.tick();
                self.set_running(|r| r.retain(|n| *n != safe(&name)));
                let log = log
                    .map(|l| format!("\n  full log: {}", l.display()))
                    .unwrap_or_default();
                // The error may quote a file (a column name, the tail of a command's stderr).
                self.line(format!(
                    "{} stage `{}` failed: {}",
                    self.paint("1;31", "error:"),
                    safe(&name),
                    safe(&format!("{error}{log}"))
                ));
                if let (Some(span), Some(sources)) = (param, &self.sources) {
                    let note = Diagnostic::context("the param is set here").at(span, "this param");
                    let text =
                        diagnostic::render(sources, &[note], RenderOptions { color: self.color });
                    self.line(String::from_utf8_lossy(&text).trim_end().to_owned());
                }
            }
            Event::StageQueued {
                name,
                demand,
                in_use,
                budget,
            } => {
                if !self.quiet {
                    self.line(format!(
                        "{} {} (needs {demand}; {in_use} of the budget's {} CPUs and {} in use: `--cpus`, `--memory`)",
                        self.paint("33", "  wait"),
                        safe(&name),
                        budget.cpus,
                        crate::run::admit::size(budget.memory)
                    ));
                }
            }
            Event::StageRetrying {
                name,
                attempt,
                attempts,
                error,
                wait,
            } => {
                // A failure worth a retry is worth a line, even with `--quiet`.
                let first = error.lines().next().unwrap_or_default();

                let again = if wait.is_zero() {
                    "trying again".to_owned()
                } else {
                    format!("again in {}", humantime::format_duration(wait))
                };
                self.line(format!(
                    "{} {} (attempt {attempt} of {attempts} failed: {}; {again})",
                    self.paint("33", " retry"),
                    safe(&name),
                    safe(first)
                ));
            }
            Event::StageWaiting {
                name,
                holder,
                since,
            } => {
                if !self.quiet {
                    self.line(format!(
                        "{} {} ({} has been computing it since {since}; waiting for its result)",
                        self.paint("33", "  wait"),
                        safe(&name),
                        safe(&holder)
                    ));
                }
            }
            Event::StageBlocked { name, by } => {
                self.tick();
                if !self.quiet {
                    self.line(format!(
                        "{} {} (upstream {} failed)",
                        self.paint("33", "  skip"),
                        safe(&name),
                        safe(&by)
                    ));
                }
            }
            Event::StageCancelled { name } => {
                self.tick();
                self.set_running(|r| r.retain(|n| *n != safe(&name)));
                if !self.quiet {
                    self.line(format!("{} {}", self.paint("33", "cancel"), safe(&name)));
                }
            }
            Event::Warning(message) => self.line(format!(
                "{} {}",
                self.paint("1;33", "warning:"),
                safe(&message)
            )),
        }
    }
}
