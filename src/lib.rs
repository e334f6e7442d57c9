//! imba: a declarative DAG orchestrator for data and feature pipelines.
//!
//! The binary is glue around these pieces: [`config`] reads a pipeline file into a validated
//! [`config::Pipeline`], [`dag`] turns it into a checked graph, [`draw`] shows the graph, and
//! [`report`] prints everything a person reads. Built-in stages live in the `imba-stages` crate.

pub mod budget;
pub mod checks;
pub mod cli;
pub mod columns;
pub mod config;
pub mod dag;
pub mod diagnostic;
pub mod draw;
pub mod exec;
pub mod fsutil;
pub mod hash;
pub mod interrupt;
pub mod location;
pub mod lock;
pub mod plan;
pub mod record;
pub mod report;
pub mod schema;
pub mod state;
pub mod storage;
pub mod versions;
pub mod watch;
