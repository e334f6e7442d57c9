//! imba: a declarative DAG orchestrator for data and feature pipelines.
//!
//! The modules form layers; each uses only the layers below it (`tests/layers.rs` keeps it so):
//!
//! - [`cli`]: the command line: clap and dispatch.
//! - [`ui`]: `imba ui`, the local web app over the layers below.
//! - [`report`]: the one printer, and every table and message a person reads.
//! - [`watch`]: re-running what a change affects.
//! - [`run`]: the scheduler and the stage lifecycle (decide, stage, execute, verify, gate, commit).
//! - [`plan`]: fingerprints, reasons, selection, status: what is stale and why.
//! - [`state`]: the workdir's `.imba/`: the run mutex, the lock file and its journal, run records.
//! - [`store`]: where data lives: the [`store::Store`] trait, local and S3, content hashes,
//!   versions; atomic commits happen here and nowhere else.
//! - [`graph`]: the stage DAG, its drawings, column inference.
//! - [`config`]: from pipeline files to a [`model::Pipeline`]: YAML, overrides, templates.
//! - [`model`]: what a pipeline is: stages, ports, locations, checks, settings.
//! - [`diagnostic`], [`budget`], [`interrupt`]: foundations (error rendering, memory budget,
//!   signals) that any layer may use.
//!
//! Built-in stages live in the `imba-stages` crate.

pub mod budget;
pub mod cli;
pub mod config;
pub mod diagnostic;
pub mod graph;
pub mod interrupt;
pub mod model;
pub mod plan;
pub mod report;
pub mod run;
pub mod state;
pub mod store;
pub mod ui;
pub mod watch;
