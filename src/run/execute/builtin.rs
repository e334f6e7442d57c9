//! Built-in stages (`uses:`), run on a blocking thread of the runtime.

use std::time::Instant;

use imba_stages::StageIo;
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
    let stage = ex.stage;
    let Some(builtin) = ex.registry.get(name).cloned() else {
        return Err(StageFailure::Other(format!(
            "built-in stage `{name}` is not in this build of imba"
        )));
    };
    let io = StageIo {
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
        cancel: imba_stages::Cancel::default(),
    };
    let params = params.clone();
    let started = Instant::now();
    // A cancelled run sets the stage's flag; a long stage (MICE) stops at its next iteration.
    let flag = io.cancel.clone();
    let mut stop = ex.cancel.clone();
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
    let output = stage
        .outputs
        .first()
        .map(|p| p.declared.location.display(ex.workdir))
        .unwrap_or_default();
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
