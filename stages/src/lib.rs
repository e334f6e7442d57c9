//! imba's built-in stages: pure transforms with typed params, and the registry that names them.
//!
//! A built-in stage knows nothing of YAML, lock files, storage or the command line. It declares
//! a name, an implementation version and a params type; the orchestrator validates a stage's
//! `params:` against that type before anything runs.

pub mod aggregate;
pub mod chart;
pub mod checks;
pub mod clean;
pub mod diagnose;
pub mod feature;
pub mod impute;
pub mod io;
pub mod memory;
pub mod pointer;
pub mod ports;
mod registry;
pub mod safe;
pub mod spark;
pub mod spark_sql;
pub mod stats;
pub mod steps;
pub mod threads;

pub use registry::{
    Builtin, BuiltinStage, Cancel, InputColumn, OutputColumns, ParamsError, Registry, StageError,
    StageIo, StageReport, CANCELLED,
};

/// The polars the stages are built on, for callers that read their tables.
pub use polars;
