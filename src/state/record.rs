//! Run records: one JSON file per run under `.imba/runs/`, for `imba log` and `imba show`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::hash::ContentHash;

/// How a run ended (or that it has not: `running`, also the status of a run killed outright).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Ok,
    Failed,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What became of one stage in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// It was stale, ran, and its outputs were committed.
    Ran,
    /// Up to date: nothing ran.
    Skipped,
    /// Stale by the lock file, but its outputs already held what the run cache recorded for
    /// its fingerprint: nothing ran (`up to date (cached)`).
    Cached,
    /// Stale, and its outputs were restored from the run cache and committed instead of run.
    Restored,
    /// It ran, or tried to, and failed: nothing of it was committed.
    Failed,
    /// An upstream stage failed, so it never started.
    Blocked,
    /// The run was cancelled before it finished.
    Cancelled,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Ran => "ran",
            Decision::Skipped => "skipped",
            Decision::Cached => "cached",
            Decision::Restored => "restored",
            Decision::Failed => "failed",
            Decision::Blocked => "blocked",
            Decision::Cancelled => "cancelled",
        }
    }

    /// Whether its outputs are in place as the lock says (dependents may go on).
    pub fn succeeded(self) -> bool {
        matches!(
            self,
            Decision::Ran | Decision::Skipped | Decision::Cached | Decision::Restored
        )
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The pipeline's resolved vars as records show them: a secret-looking name's value masked.
pub fn shown_vars(pipeline: &crate::model::Pipeline) -> serde_json::Map<String, serde_json::Value> {
    pipeline
        .vars
        .iter()
        .map(|(name, value)| {
            let value = if crate::config::looks_secret(name) {
                serde_json::Value::String("***".to_owned())
            } else {
                value.clone()
            };
            (name.clone(), value)
        })
        .collect()
}

/// The time now, as records write it (RFC 3339, seconds).
pub(crate) fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Now, to the millisecond (RFC 3339): when stages started, to order them.
pub(crate) fn now_millis() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// What one run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    /// The pipeline file, as given.
    pub pipeline: String,
    pub started: String,
    #[serde(default)]
    pub finished: Option<String>,
    pub status: RunStatus,
    #[serde(default)]
    pub duration_ms: u64,
    /// The `--vars` and `--set` arguments it ran with (a secret-looking key's value masked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
    /// The pipeline's vars as they were resolved for it (a secret-looking name's value masked).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// In topological order.
    pub stages: Vec<StageRecord>,
}

impl RunRecord {
    /// The record of a run starting now.
    pub fn start(id: &str, pipeline: &crate::model::Pipeline) -> Self {
        let vars = shown_vars(pipeline);
        RunRecord {
            id: id.to_owned(),
            pipeline: pipeline.file.display().to_string(),
            started: now(),
            finished: None,
            status: RunStatus::Running,
            duration_ms: 0,
            overrides: pipeline.overrides.clone(),
            vars,
            stages: Vec::new(),
        }
    }

    /// The run ended now, after `took`, with these stages (in the pipeline's order).
    pub fn finish(&mut self, stages: Vec<StageRecord>, status: RunStatus, took: Duration) {
        self.stages = stages;
        self.status = status;
        self.finished = Some(now());
        self.duration_ms = took.as_millis() as u64;
    }

    /// How many of its stages were decided so.
    pub fn count(&self, decision: Decision) -> usize {
        self.stages
            .iter()
            .filter(|s| s.decision == decision)
            .count()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    /// The partition key of a partitioned stage's instance (`2017-05`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    pub decision: Decision,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default)]
    pub duration_ms: u64,
    /// When it started computing (RFC 3339, milliseconds), after waiting for the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Ran, and every output came out identical to the last run (dependents may skip).
    #[serde(default)]
    pub unchanged: bool,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub outputs: std::collections::BTreeMap<String, ContentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// What a built-in stage reported (its summary, the time it took).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    /// The stage's checks, as evaluated on its new outputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckRecord>,
    /// The stage's `metrics:`, measured on its new outputs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: std::collections::BTreeMap<String, crate::state::lock::Measured>,
    /// Where the outputs of a stage whose checks failed were kept instead of committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// The `on_failure` hook run for this stage's failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookRecord>,
    /// Its quarantined outputs were committed by hand (`imba accept`), after a person looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Accepted>,
    /// Where it ran as a job (`executor:`): the executor, job id, node and the job's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
    /// Each attempt, when the stage may be tried more than once (`retries:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
}

/// Where a stage's job ran, for the run record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The executor's name in the pipeline (`slurm`).
    pub executor: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How the scheduler says it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The job's own stdout and stderr.
    pub log: String,
}

/// One attempt of a stage that may be retried.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    /// 1 for the first.
    pub attempt: u32,
    /// When it started (RFC 3339).
    pub started: String,
    pub duration_ms: u64,
    /// Why it failed; none for the attempt that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Where it ran as a job (`executor:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
}

/// A person accepted a stage's quarantined outputs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Accepted {
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

impl Accepted {
    pub fn now(reason: &str) -> Self {
        Accepted {
            reason: reason.to_owned(),
            at: now(),
        }
    }
}

/// One check, evaluated.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckRecord {
    /// `name:`, or a label such as `not_null(user_id)`.
    pub name: String,
    /// The check as written.
    pub check: serde_json::Value,
    pub severity: crate::model::Severity,
    /// The table checked, as shown in the lock file.
    pub output: String,
    pub status: imba_stages::checks::Status,
    /// What was measured (`null` when undefined).
    pub value: serde_json::Value,
    /// What passing means: `≥ 1000`, `≤ 20%`…
    pub expected: String,
    pub detail: String,
}

impl CheckRecord {
    /// Missed (or could not be evaluated) with severity `fail`: the outputs must not be committed.
    pub fn blocks(&self) -> bool {
        matches!(
            self.status,
            imba_stages::checks::Status::Fail | imba_stages::checks::Status::Error
        ) && self.severity == crate::model::Severity::Fail
    }
}

/// What the `on_failure` hook did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HookRecord {
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Why the hook itself failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub log: String,
}

pub fn save(runs: &Path, record: &RunRecord) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(record).map_err(std::io::Error::other)?;
    text.push('\n');
    crate::store::fs::write_atomic(&runs.join(format!("{}.json", record.id)), text.as_bytes())
}

/// Records in `runs`, newest first; unreadable files are skipped.
pub fn list(runs: &Path) -> Vec<RunRecord> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(runs)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths.reverse();
    paths
        .into_iter()
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as imba wrote them before decisions and statuses were typed.
    const OLD: &str = r#"{
      "id": "20261124T221003.123Z-1a2b", "pipeline": "p.yaml",
      "started": "2026-11-24T22:10:03Z", "finished": "2026-11-24T22:10:04Z",
      "status": "failed", "duration_ms": 812,
      "stages": [
        {"name": "a", "decision": "ran", "duration_ms": 5},
        {"name": "b", "decision": "skipped"},
        {"name": "c", "decision": "failed", "error": "boom"},
        {"name": "d", "decision": "blocked", "reasons": ["upstream c failed"]},
        {"name": "e", "decision": "cancelled"}
      ]
    }"#;

    #[test]
    fn records_written_before_typed_states_read_and_write_the_same_words() {
        let record: RunRecord = serde_json::from_str(OLD).unwrap();
        assert_eq!(record.status, RunStatus::Failed);
        let decisions: Vec<Decision> = record.stages.iter().map(|s| s.decision).collect();
        assert_eq!(
            decisions,
            [
                Decision::Ran,
                Decision::Skipped,
                Decision::Failed,
                Decision::Blocked,
                Decision::Cancelled
            ]
        );
        let written = serde_json::to_value(&record).unwrap();
        let old: serde_json::Value = serde_json::from_str(OLD).unwrap();
        assert_eq!(written["status"], old["status"]);
        for (new, old) in written["stages"]
            .as_array()
            .unwrap()
            .iter()
            .zip(old["stages"].as_array().unwrap())
        {
            assert_eq!(new["decision"], old["decision"]);
            assert_eq!(
                new["decision"].as_str().unwrap(),
                serde_json::from_value::<Decision>(old["decision"].clone())
                    .unwrap()
                    .to_string()
            );
        }
        for status in ["running", "ok", "failed", "interrupted"] {
            let typed: RunStatus = serde_json::from_value(serde_json::json!(status)).unwrap();
            assert_eq!(typed.to_string(), status);
        }
        assert_eq!(record.count(Decision::Failed), 1);
    }
}
