//! The pipeline file: reading it, applying overrides, checking its shape, resolving it.
//!
//! `load` is the only road from a YAML file to a [`Pipeline`]: parse (keeping spans) →
//! `--vars`/`--set` → shape ([`raw`]) → vars, templates, matrices, paths, params ([`resolve`]).
//! Each step collects every problem it finds. A stage with a problem in one step is left out of
//! the later ones, the other stages go on, and [`load_partial`] gives what resolved, so that
//! the graph, paths and check columns of the rest are checked in the same round.

pub mod checks;
pub mod confine;
pub mod executors;
pub mod limits;
pub mod metrics;
pub mod overrides;
pub mod params;
pub mod partitions;
pub mod raw;
pub mod resolve;
pub mod schema;
pub mod shell;
pub mod template;
pub mod yaml;

use std::io;
use std::path::Path;

use imba_stages::Registry;

use crate::diagnostic::{Diagnostic, Sources};
use crate::model::Pipeline;

pub use overrides::Overrides;

/// Why a pipeline could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read at all: one line, no spans.
    Unreadable(String),
    /// The file was read; these are its problems, all of them.
    Invalid(Vec<Diagnostic>),
}

/// A pipeline with errors, as far as it resolved: the stages without errors, and where the
/// others write. `validate` checks its graph, paths and check columns too, so that every
/// problem comes in one round.
pub struct Partial {
    pub pipeline: Pipeline,
    pub left_out: resolve::LeftOut,
}

/// Reads, overrides, checks and resolves the pipeline at `path`.
/// The [`Sources`] come back either way, for rendering diagnostics.
pub fn load(
    path: &Path,
    overrides: &Overrides,
    registry: &Registry,
) -> (Sources, Result<Pipeline, LoadError>) {
    let (sources, loaded) = load_partial(path, overrides, registry);
    (sources, loaded.map_err(|(error, _)| error))
}

/// [`load`], giving with its errors the part of the pipeline that resolved (none when the
/// file could not be read or parsed, or its top level has the wrong shape).
pub fn load_partial(
    path: &Path,
    overrides: &Overrides,
    registry: &Registry,
) -> (Sources, Result<Pipeline, (LoadError, Option<Partial>)>) {
    let mut sources = Sources::default();
    crate::diagnostic::reset_suggestions();
    let text = match read_text(path, "pipeline file") {
        Ok(text) => text,
        Err(message) => return (sources, Err((LoadError::Unreadable(message), None))),
    };
    let id = sources.add(path.display().to_string(), text.as_str());
    let mut diagnostics = Vec::new();
    let mut root = match yaml::parse(id, &text) {
        Ok(root) => root,
        Err(errors) => return (sources, Err((LoadError::Invalid(errors), None))),
    };
    overrides::apply(&mut root, overrides, &mut sources, &mut diagnostics);
    let raw = raw::check(root, &mut diagnostics);
    // Stages with shape errors are left out of `raw`; the others are still resolved, so that
    // one run reports as much as it can.
    let resolved = raw.map(|raw| {
        resolve::resolve(
            path,
            &raw,
            registry,
            &overrides.discovered,
            overrides.engine,
            overrides.executor.as_deref(),
            &mut diagnostics,
        )
    });
    if let Some((pipeline, _)) = &resolved {
        confine::check(pipeline, &overrides.vars_files, &mut diagnostics);
    }
    match resolved {
        Some((mut pipeline, _)) if diagnostics.is_empty() => {
            pipeline.overrides = overrides.shown();
            (sources, Ok(pipeline))
        }
        resolved => {
            crate::diagnostic::sort(&mut diagnostics);
            let partial = resolved.map(|(pipeline, left_out)| Partial { pipeline, left_out });
            (sources, Err((LoadError::Invalid(diagnostics), partial)))
        }
    }
}

/// The text of a file (`what`: "pipeline file", "vars file"), or a one-line reason it cannot be had.
/// Only a regular file is read: a directory, FIFO, socket or device is refused at once (reading a
/// FIFO would wait for a writer, forever).
pub(crate) fn read_text(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let reason = |error: io::Error| {
        let reason = match imba_stages::safe::NotAFile::of(&error) {
            Some(not) if not.kind == "a directory" => "it is a directory".to_owned(),
            Some(not) => format!("it is {}, not a regular file", not.kind),
            None => match error.kind() {
                io::ErrorKind::NotFound => "no such file".to_owned(),
                io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
                _ => error.to_string(),
            },
        };
        format!("cannot read {what} `{shown}`: {reason}")
    };
    let mut bytes = Vec::new();
    imba_stages::safe::open_file(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(reason)?;
    String::from_utf8(bytes).map_err(|error| {
        let at = error.utf8_error().valid_up_to();
        let line = error.as_bytes()[..at]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        format!("{what} `{shown}` is not valid UTF-8 (line {line}, byte {at})")
    })
}

/// Whether a key's name says it holds a secret (`secret_access_key`, `aws_session_token`,
/// `password`, `api_key`): the value of such a `--set` is never shown in a message. Narrower
/// than the `storage:` check, where any `…key…` is refused: a bare `key` is a common param name.
pub fn looks_secret(name: &str) -> bool {
    let lower = name.to_ascii_lowercase().replace('-', "_");
    [
        "secret",
        "token",
        "password",
        "passwd",
        "credential",
        "access_key",
        "accesskey",
        "api_key",
        "apikey",
        "private_key",
    ]
    .iter()
    .any(|s| lower.contains(s))
}
