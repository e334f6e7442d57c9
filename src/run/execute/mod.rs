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
mod shell;
mod slurm;
mod spark;

pub use remote::JobRecord;

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
    /// Where it ran as a job (`executor:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
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
