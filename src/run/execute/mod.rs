//! Executing one stage on local inputs into staging paths: the step of the lifecycle that could
//! run on another machine. It takes no lock, touches no store and knows no scheduler; what it
//! writes is the staged outputs and the stage's logs.

use std::path::{Path, PathBuf};

use imba_stages::Registry;
use serde_json::Value as Json;
use tokio::sync::watch;

mod builtin;
pub mod job;
mod remote;
pub use remote::Orphans;
mod shell;
mod slurm;
mod spark;

pub use crate::state::record::JobRecord;

pub(crate) use spark::{checks_on_cluster, ClusterChecks};

use super::failure::StageFailure;
use crate::interrupt::Stop;
use crate::model::{Stage, StageKind};
use crate::state::record::CheckRecord;

/// One stage, ready to execute.
pub struct Execution<'a> {
    pub stage: &'a Stage,
    /// Where commands run and relative paths resolve.
    pub workdir: &'a Path,
    /// The local path of each input, in the stage's input order.
    pub inputs: &'a [PathBuf],
    /// Where each output is to be written, in output order; nothing else is committed.
    pub staged: &'a [PathBuf],
    /// The folder for the commands' stdout and stderr.
    pub logs: &'a Path,
    pub run_id: &'a str,
    pub registry: &'a Registry,
    /// How to reach the engines (`engines:`).
    pub engines: &'a crate::model::EngineSettings,
    /// The executors stages may run on (`executors:`).
    pub executors: &'a std::collections::BTreeMap<String, crate::model::ExecutorSettings>,
    /// At [`Stop::Cancel`] a command gets SIGTERM (SIGKILL at [`Stop::Kill`]) and a built-in
    /// its cancel flag.
    pub cancel: watch::Receiver<Stop>,
    /// Which attempt this is (1 for the first; `retries:`).
    pub attempt: u32,
    /// Where a job of an executor ran, as soon as it is known (kept on failure too).
    pub job: &'a std::sync::Mutex<Option<JobRecord>>,
    /// The attempt's `timeout`, which a job counts from when it starts running, not from its
    /// submission (the queue is not the stage's time).
    pub timeout: Option<std::time::Duration>,
    /// The workdir's state folder (`.imba/`), whose path tags the jobs of its runs.
    pub state: &'a Path,
    /// Jobs of earlier runs, cancelled before this run's first job on each executor.
    pub orphans: &'a remote::Orphans,
    /// Says something to the user as the run goes (a warning).
    pub warn: &'a (dyn Fn(String) + Send + Sync),
}

/// What an execution reports besides its staged outputs.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Executed {
    /// The last command's exit status (0): shell stages only.
    pub exit_status: Option<i32>,
    /// The stage's stderr log: shell stages only.
    pub log: Option<PathBuf>,
    /// A built-in's own checks.
    pub checks: Vec<CheckRecord>,
    /// A built-in's report: its summary, warnings and duration.
    pub report: Option<Json>,
    /// A built-in's warnings, for the person running imba.
    pub warnings: Vec<String>,
}

/// Stages that ask an executor for more CPUs or memory than any node it may use has: an error
/// at their `resources:`, before anything runs. An executor that cannot be asked (no Slurm
/// client here) is not checked: submitting will say why.
pub fn check_nodes(pipeline: &crate::model::Pipeline) -> Vec<crate::diagnostic::Diagnostic> {
    let mut largest = std::collections::BTreeMap::new();
    let mut found = Vec::new();
    for stage in &pipeline.stages {
        let Some(name) = &stage.executor else {
            continue;
        };
        let limits = &stage.limits;
        if limits.cpus.is_none() && limits.memory.is_none() {
            continue;
        }
        let node =
            largest
                .entry(name.clone())
                .or_insert_with(|| match pipeline.executors.get(name) {
                    Some(crate::model::ExecutorSettings::Slurm(settings)) => {
                        slurm::largest_node(settings).ok()
                    }
                    None => None,
                });
        let Some((cpus, memory)) = *node else {
            continue;
        };
        let mut over = Vec::new();
        if let Some(asked) = limits.cpus.filter(|c| *c > cpus) {
            over.push(format!("{asked} CPUs (its largest node has {cpus})"));
        }
        if let Some(asked) = limits.memory.filter(|m| *m > memory) {
            over.push(format!(
                "{} of memory (its largest node has {})",
                crate::run::admit::size(asked),
                crate::run::admit::size(memory)
            ));
        }
        if over.is_empty() {
            continue;
        }
        let message = format!(
            "stage `{}` asks executor `{name}` for {}",
            stage.name,
            over.join(" and ")
        );
        let diagnostic = crate::diagnostic::Diagnostic::error(message)
            .help("no job of it could ever start: ask for less, or use another partition");
        found.push(match limits.resources_span {
            Some(span) => diagnostic.at(span, "more than any node has"),
            None => diagnostic,
        });
    }
    found
}

/// Runs the stage's command or built-in.
pub async fn execute(ex: &Execution<'_>) -> Result<Executed, StageFailure> {
    if let Some(name) = &ex.stage.executor {
        return match ex.executors.get(name) {
            Some(crate::model::ExecutorSettings::Slurm(settings)) => {
                remote::run(ex, &slurm::Slurm { settings }, name).await
            }
            None => Err(StageFailure::Other(format!(
                "the pipeline declares no executor `{name}`"
            ))),
        };
    }
    match &ex.stage.kind {
        StageKind::Shell {
            templates, argv, ..
        } => shell::run(ex, templates, *argv).await,
        StageKind::Builtin { name, params, .. } => match ex.stage.engine {
            crate::model::Engine::Local => builtin::run(ex, name, params).await,
            crate::model::Engine::Spark => spark::run(ex, name, params).await,
        },
    }
}
