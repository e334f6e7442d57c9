//! What happens between a stage writing its outputs and imba committing them: the stage's
//! `checks:`, the quarantine of outputs that failed them, and the `on_failure` hook.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imba_stages::checks::{self, Status};
use serde_json::json;

use crate::config::checks::{Hook, Severity, StageCheck};
use crate::config::Stage;
use crate::location::Location;
use crate::record::{CheckRecord, HookRecord, StageRecord};

/// How long an `on_failure` hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Evaluates the stage's checks on its staged outputs (`staged`, in output order), each table
/// read once, against what is committed at the final locations (`committed` gives a local copy
/// of a committed S3 output, only asked for when a `change` check needs it). Records come back
/// in the order the checks are written.
pub fn evaluate(
    stage: &Stage,
    staged: &[PathBuf],
    workdir: &Path,
    committed: &dyn Fn(&crate::config::Port) -> Option<PathBuf>,
) -> Vec<CheckRecord> {
    // Checks of the same table, together.
    let mut tables: BTreeMap<(usize, Option<&str>), Vec<usize>> = BTreeMap::new();
    for (i, check) in stage.checks.iter().enumerate() {
        tables
            .entry((check.output, check.file.as_deref()))
            .or_default()
            .push(i);
    }
    let mut records: Vec<Option<CheckRecord>> = vec![None; stage.checks.len()];
    for ((output, file), indices) in tables {
        let port = &stage.outputs[output];
        let mut shown = port.declared.location.display(workdir);
        let mut table = staged[output].clone();
        let needs_baseline = indices
            .iter()
            .any(|&i| matches!(stage.checks[i].check, checks::Check::Change { .. }));
        let mut committed = if needs_baseline {
            committed(port)
        } else {
            None
        };
        if let Some(file) = file {
            shown = format!("{}/{file}", shown.trim_end_matches('/'));
            table = table.join(file);
            committed = committed.map(|c| c.join(file));
        }
        let list: Vec<checks::Check> = indices
            .iter()
            .map(|&i| stage.checks[i].check.clone())
            .collect();
        let verdicts = if table.is_file() {
            let baseline = committed.as_deref().filter(|c| c.is_file());
            checks::evaluate(&list, &table, baseline)
        } else {
            let detail = format!("the stage did not write `{shown}`");
            list.iter()
                .map(|_| checks::Verdict {
                    status: Status::Error,
                    value: serde_json::Value::Null,
                    detail: detail.clone(),
                })
                .collect()
        };
        for (&i, verdict) in indices.iter().zip(verdicts) {
            records[i] = Some(record_of(&stage.checks[i], &shown, verdict));
        }
    }
    records.into_iter().flatten().collect()
}

fn record_of(check: &StageCheck, output: &str, verdict: checks::Verdict) -> CheckRecord {
    CheckRecord {
        name: check.name.clone(),
        check: check.check.to_json(),
        severity: check.severity,
        output: output.to_owned(),
        status: verdict.status,
        value: verdict.value,
        expected: check.check.expected(),
        detail: verdict.detail,
    }
}

/// One line for a check that did not pass: `rows: 3 rows, expected ≥ 1000`.
pub fn describe(record: &CheckRecord) -> String {
    let status = match (record.status, record.severity) {
        (Status::Error, _) => " could not be evaluated",
        (Status::Undefined, _) => " is undefined",
        (_, Severity::Warn) => " missed (warn)",
        _ => "",
    };
    format!(
        "check `{}`{status} on {}: {}",
        record.name, record.output, record.detail
    )
}

/// Moves the staged outputs under `quarantine/`, each at its path relative to the workdir (so
/// `out/cleaned/orders.parquet` lands at `quarantine/out/cleaned/orders.parquet`).
pub fn quarantine(
    stage: &Stage,
    staged: &[PathBuf],
    workdir: &Path,
    quarantine: &Path,
) -> std::io::Result<()> {
    for (i, (port, path)) in stage.outputs.iter().zip(staged).enumerate() {
        if !path.exists() {
            continue;
        }
        let relative = match &port.declared.location {
            Location::Local(target) => target
                .strip_prefix(workdir)
                .ok()
                .filter(|r| !r.as_os_str().is_empty())
                .map(Path::to_path_buf),
            Location::S3 { bucket, key } => Some(Path::new("s3").join(bucket).join(key)),
        };
        let relative = relative.unwrap_or_else(|| {
            Path::new(&i.to_string()).join(path.file_name().unwrap_or_default())
        });
        let target = quarantine.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(path, &target)?;
    }
    Ok(())
}

/// What a hook is told, as JSON on its stdin.
pub fn hook_payload(pipeline: &Path, run: &str, record: &StageRecord) -> serde_json::Value {
    json!({
        "event": "stage_failed",
        "pipeline": pipeline.display().to_string(),
        "run": run,
        "stage": record.name,
        "error": record.error,
        "reasons": record.reasons,
        "checks": record.checks,
        "quarantine": record.quarantine,
        "log": record.log,
    })
}

/// Runs `hook` in `workdir` with `payload` on stdin, its output appended to `log`. Never fails:
/// what went wrong comes back in the record, to be reported next to the failure it was for.
pub async fn run_hook(
    hook: &Hook,
    payload: &serde_json::Value,
    workdir: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> HookRecord {
    use tokio::io::AsyncWriteExt;
    let mut record = HookRecord {
        command: hook.command.clone(),
        exit_status: None,
        error: None,
        log: log.display().to_string(),
    };
    let open = || {
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Ok::<_, std::io::Error>((file.try_clone()?, file))
    };
    let (stdout, stderr) = match open() {
        Ok(files) => files,
        Err(e) => {
            record.error = Some(format!("cannot open its log {}: {e}", log.display()));
            return record;
        }
    };
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&hook.command)
        .current_dir(workdir)
        .stdin(std::process::Stdio::piped())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            record.error = Some(format!("cannot start `sh`: {e}"));
            return record;
        }
    };
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        let mut text = payload.to_string();
        text.push('\n');
        // A hook that does not read its stdin closes the pipe early; that is its business.
        let _ = stdin.write_all(text.as_bytes()).await;
    }
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            record.exit_status = status.code();
            if !status.success() {
                record.error = Some(match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exit status {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    _ => "failed".to_owned(),
                });
            }
        }
        Ok(Err(e)) => record.error = Some(format!("cannot wait for it: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                // The whole process group: the shell and whatever it started.
                unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            record.error = Some(format!(
                "timed out after {} s and was killed",
                HOOK_TIMEOUT.as_secs()
            ));
        }
    }
    record
}
