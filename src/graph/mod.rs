//! The stage graph: building and checking it ([`dag`]), drawing it ([`draw`]), and the columns
//! each table output will have ([`columns`]).

pub mod columns;
pub mod dag;
pub mod draw;

pub use dag::Dag;

use std::path::Path;

use imba_stages::Registry;

use crate::config::{self, LoadError, Overrides};
use crate::diagnostic::Sources;
use dag::BuildOptions;

/// Loads the pipeline at `path` and builds its checked graph: the file, the graph, the
/// columns of checks. With errors in the file, the stages without errors still have their
/// graph, paths and columns checked (the others' outputs count as written), so that every
/// problem comes back at once.
pub fn load(
    path: &Path,
    overrides: &Overrides,
    registry: &Registry,
) -> (Sources, Result<Dag, LoadError>) {
    let (sources, loaded) = config::load_partial(path, overrides, registry);
    let (pipeline, left_out, mut diagnostics) = match loaded {
        Ok(pipeline) => (pipeline, config::resolve::LeftOut::default(), Vec::new()),
        Err((LoadError::Invalid(diagnostics), Some(partial))) => {
            (partial.pipeline, partial.left_out, diagnostics)
        }
        Err((error, _)) => return (sources, Err(error)),
    };
    let options = BuildOptions {
        written_elsewhere: left_out.outputs.clone(),
        unknown_writers: left_out.unknown,
        ..BuildOptions::default()
    };
    let (dag, found) = dag::build_partial(pipeline, options);
    let whole = found.is_empty();
    diagnostics.extend(found);
    if let Some(dag) = &dag {
        // Tables that stages left out (for their errors, or on a cycle) write are unknown.
        diagnostics.extend(columns::check(dag, registry, dag.written_elsewhere()));
    }
    match dag {
        Some(dag) if whole && diagnostics.is_empty() => (sources, Ok(dag)),
        _ => {
            crate::diagnostic::sort(&mut diagnostics);
            (sources, Err(LoadError::Invalid(diagnostics)))
        }
    }
}
