//! Built-in stages (`uses:`), run on a blocking thread of the runtime.

use std::time::Instant;

use std::path::PathBuf;

use imba_stages::StageIo;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{Executed, Execution};
use crate::interrupt::Stop;
use crate::run::failure::StageFailure;
use crate::state::record::CheckRecord;

/// Runs a built-in stage on a blocking thread; a cancelled run sets its cancel flag.
pub(super) async fn run(
    ex: &Execution<'_>,
    name: &str,
    params: &Json,
) -> Result<Executed, StageFailure> {
    let work = plan(ex, name, params);
    run_planned(ex.registry, &work, &ex.cancel).await
}

/// A built-in's work with its paths resolved: what a node runs for it (`imba exec-stage`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Builtin {
    pub name: String,
    /// Normalised.
    pub params: Json,
    /// Each input's name and local path, in the stage's order.
    pub inputs: Vec<(Option<String>, PathBuf)>,
    /// Each output's name and staging path.
    pub outputs: Vec<(Option<String>, PathBuf)>,
    /// The first output as the lock shows it: what the built-in's own checks are shown against.
    pub shown: String,
}

pub(super) fn plan(ex: &Execution<'_>, name: &str, params: &Json) -> Builtin {
    let stage = ex.stage;
    Builtin {
        name: name.to_owned(),
        params: params.clone(),
        inputs: stage
            .inputs
            .iter()
            .zip(ex.inputs)
            .map(|(p, path)| (p.name.clone(), path.clone()))
            .collect(),
        outputs: stage
            .outputs
            .iter()
            .zip(ex.staged)
            .map(|(p, s)| (p.name.clone(), s.clone()))
            .collect(),
        shown: stage
            .outputs
            .first()
            .map(|p| p.declared.location.display(ex.workdir))
            .unwrap_or_default(),
    }
}

/// Runs a planned built-in on a blocking thread, its cancel flag set when `cancel` says so.
pub(super) async fn run_planned(
    registry: &imba_stages::Registry,
    work: &Builtin,
    cancel: &tokio::sync::watch::Receiver<Stop>,
) -> Result<Executed, StageFailure> {
    let name = work.name.as_str();
    let Some(builtin) = registry.get(name).cloned() else {
        return Err(StageFailure::Other(format!(
            "built-in stage `{name}` is not in this build of imba"
        )));
    };
    let io = StageIo {
        inputs: work.inputs.clone(),
        outputs: work.outputs.clone(),
        cancel: imba_stages::Cancel::default(),
    };
    let params = work.params.clone();
    let started = Instant::now();
    // A cancelled run sets the stage's flag; a long stage (MICE) stops at its next iteration.
    let flag = io.cancel.clone();
    let mut stop = cancel.clone();
    let watcher = tokio::spawn(async move {
        if stop.wait_for(|c| *c >= Stop::Cancel).await.is_ok() {
            flag.cancel();
        }
    });
    let ran = tokio::task::spawn_blocking(move || builtin.run(&params, &io)).await;
    watcher.abort();
    let report = ran
        .map_err(|e| StageFailure::Other(format!("internal error: {e}")))?
        .map_err(|e| {
            if e.message == imba_stages::CANCELLED {
                StageFailure::Cancelled
            } else {
                StageFailure::Builtin {
                    message: e.message,
                    param: e.param,
                }
            }
        })?;
    // The stage's own checks are about its outputs as a whole: shown against the first.
    let output = work.shown.clone();
    let checks = report
        .checks
        .iter()
        .map(|c| CheckRecord {
            name: c.name.clone(),
            check: serde_json::json!({ "builtin": name }),
            severity: c.severity,
            output: output.clone(),
            status: c.status,
            value: c.value.clone(),
            expected: c.expected.clone(),
            detail: c.detail.clone(),
        })
        .collect();
    Ok(Executed {
        checks,
        report: Some(serde_json::json!({
            "summary": report.summary,
            "warnings": report.warnings,
            "duration_ms": started.elapsed().as_millis() as u64,
        })),
        warnings: report.warnings,
        ..Executed::default()
    })
}
